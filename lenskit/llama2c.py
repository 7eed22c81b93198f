"""Load a llama2.c checkpoint (legacy version-0 ``.bin``) and its ``tok*.bin`` as a `HookedTransformer`.

llama2.c (Karpathy) stores a Llama-style model as a header of 7 little-endian int32
``(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)`` followed by float32
matrices in a fixed order (see `read_llama2c_checkpoint`). A negative ``vocab_size`` means the
output matrix ``wcls`` is stored separately after the RoPE tables; otherwise it is the token
embedding. The architecture: pre-norm RMSNorm (eps 1e-5), grouped-query attention, rotary
embeddings on adjacent pairs ``(x[2i], x[2i+1])``, SwiGLU MLP ``w2(silu(w1 x) * w3 x)``, no biases.

    >>> model = load_llama2c("stories260K/stories260K.bin")   # finds tok512.bin beside it
    >>> model.to_str_tokens("Once upon a time")
    ['<s>', ' Once', ' upon', ' a', ' time']
"""

from __future__ import annotations

import math
import re
import struct
import warnings
from pathlib import Path

import einops
import numpy as np
import torch
from jaxtyping import Float
from transformers import PreTrainedTokenizer

from lenskit import backend
from lenskit.config import CONFIG_NEEDS_TL3, as_device, as_dtype
from lenskit.errors import InputError, MissingFileError, ModelFileError

if not backend.TL4:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
HEADER_BYTES = 4 * len(HEADER_FIELDS)
VERSIONED_EXPORT_MAGIC = 0x616B3432  # "ak42": llama2.c's version-1/2 exports, not supported here
BYTE_FALLBACK_OFFSET = 3  # ids 3..258 are the byte tokens <0x00>..<0xFF>
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# --- tokenizer --------------------------------------------------------------------------


def _read_tokenizer_file(path: Path) -> tuple[list[str], list[float]]:
    """Pieces and merge scores of a llama2.c ``tok*.bin``: int32 max_token_length, then per token
    float32 score, int32 byte length, bytes."""
    raw = path.read_bytes()
    pieces, scores = [], []
    offset = 4
    while offset < len(raw):
        if offset + 8 > len(raw):
            raise ModelFileError(f"{path}: truncated tokenizer file at token {len(pieces)} (byte {offset})")
        score, length = struct.unpack_from("<fi", raw, offset)
        offset += 8
        if length < 0 or offset + length > len(raw):
            raise ModelFileError(f"{path}: truncated tokenizer file at token {len(pieces)} ({length} bytes)")
        pieces.append(raw[offset : offset + length].decode("utf-8", errors="replace"))
        scores.append(score)
        offset += length
    return pieces, scores


class Llama2cTokenizer(PreTrainedTokenizer):
    """llama2.c's tokenizer: run.c's ``encode`` (score-ordered pair merges with byte fallback) and a
    raw-piece decode.

    Encoding prepends a dummy ``" "`` to non-empty text, starts from one token per UTF-8 codepoint
    (or one byte token per byte when the codepoint is not in the vocabulary), then repeatedly merges
    the leftmost adjacent pair with the best-scoring concatenation in the vocabulary. The tokenizer
    adds BOS (id 1) itself when ``add_special_tokens`` (as ``run.c`` does with ``bos=1``); text such
    as ``"<s>"`` is encoded literally, never as a special token.

    Decoding concatenates the pieces as they are, turning byte tokens ``<0xNN>`` into bytes and
    reading the result as UTF-8: the leading space of the dummy prefix is kept, so tokens read
    ``' Once'``, ``' upon'``. Ids 0, 1, 2 are named ``<unk>``, ``<s>``, ``</s>`` (the file stores
    the latter two as ``"\\n<s>\\n"`` and ``"\\n</s>\\n"``); ``</s>`` doubles as the pad token.
    """

    vocab_files_names = {"vocab_file": "tokenizer.bin"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | Path, add_bos_token: bool = True, **kwargs) -> None:
        self.vocab_file = Path(vocab_file)
        if not self.vocab_file.is_file():
            raise MissingFileError(f"llama2.c tokenizer not found: {self.vocab_file}")
        self.pieces, self.scores = _read_tokenizer_file(self.vocab_file)
        if len(self.pieces) < BYTE_FALLBACK_OFFSET + 256:
            raise ModelFileError(
                f"{self.vocab_file}: {len(self.pieces)} tokens; a llama2.c tokenizer has at least "
                f"{BYTE_FALLBACK_OFFSET + 256} (3 special tokens and 256 byte tokens)"
            )
        self.piece_to_id: dict[str, int] = {}
        for index, piece in enumerate(self.pieces):
            self.piece_to_id.setdefault(piece, index)
        self.tokens = ["<unk>", "<s>", "</s>", *self.pieces[3:]]
        self.token_to_id: dict[str, int] = {}
        for index, token in enumerate(self.tokens):
            self.token_to_id.setdefault(token, index)
        self.add_bos_token = add_bos_token
        defaults = dict(
            name_or_path=str(self.vocab_file),
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="</s>",
            split_special_tokens=True,
        )
        super().__init__(
            **(defaults | kwargs),
            add_bos_token=add_bos_token,  # kept in init_kwargs: TransformerLens then keeps this tokenizer
            special_tokens_pattern="bos" if add_bos_token else "none",
        )

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.token_to_id)

    def encode_ids(self, text: str) -> list[int]:
        """run.c's ``encode(text, bos=0, eos=0)``: token ids of ``text`` without BOS/EOS."""
        if not text:
            return []
        ids: list[int] = []
        for char in " " + text:
            if char in self.piece_to_id:
                ids.append(self.piece_to_id[char])
            else:
                ids.extend(byte + BYTE_FALLBACK_OFFSET for byte in char.encode("utf-8"))
        while True:
            best_score, best_index, best_id = -1e10, -1, -1
            for index in range(len(ids) - 1):
                merged = self.piece_to_id.get(self.pieces[ids[index]] + self.pieces[ids[index + 1]])
                if merged is not None and self.scores[merged] > best_score:
                    best_score, best_index, best_id = self.scores[merged], index, merged
            if best_index == -1:
                return ids
            ids[best_index : best_index + 2] = [best_id]

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self.tokens[index] for index in self.encode_ids(text)]

    def _convert_token_to_id(self, token: str) -> int:
        return self.token_to_id.get(token, 0)

    def _convert_id_to_token(self, index: int) -> str:
        return self.tokens[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Concatenate pieces, byte tokens ``<0xNN>`` as raw bytes, and read the whole as UTF-8."""
        out = bytearray()
        for token in tokens:
            byte = BYTE_PIECE.fullmatch(token)
            out += bytes([int(byte.group(1), 16)]) if byte else token.encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write the vocabulary back in llama2.c's ``tok*.bin`` format."""
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        path = Path(save_directory) / f"{prefix}{self.vocab_files_names['vocab_file']}"
        encoded = [piece.encode("utf-8") for piece in self.pieces]
        with open(path, "wb") as f:
            f.write(struct.pack("<i", max(len(piece) for piece in encoded)))
            for piece, score in zip(encoded, self.scores):
                f.write(struct.pack("<fi", score, len(piece)) + piece)
        return (str(path),)


# --- checkpoint -------------------------------------------------------------------------


def _check_header(header: dict[str, int], path: Path) -> None:
    """Raise ModelFileError naming the first header field llama2.c's architecture cannot take."""
    dim, n_heads, n_kv_heads = header["dim"], header["n_heads"], header["n_kv_heads"]
    if dim == VERSIONED_EXPORT_MAGIC:
        raise ModelFileError(f"{path}: a versioned llama2.c export (magic 'ak42'); only legacy v0 is supported")
    for field in HEADER_FIELDS:
        if field != "vocab_size" and header[field] <= 0:
            raise ModelFileError(f"{path}: header field {field}={header[field]} must be positive")
    if header["vocab_size"] == 0:
        raise ModelFileError(f"{path}: header field vocab_size=0 must be non-zero")
    if dim % n_heads:
        raise ModelFileError(f"{path}: header field dim={dim} is not divisible by n_heads={n_heads}")
    if (dim // n_heads) % 2:
        raise ModelFileError(f"{path}: header fields dim / n_heads = {dim // n_heads} must be even for rotary")
    if n_heads % n_kv_heads:
        raise ModelFileError(f"{path}: header field n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")


def _array_shapes(header: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The float32 arrays after the header, in file order, each matrix (out_features, in_features)."""
    dim, hidden, layers, vocab = header["dim"], header["hidden_dim"], header["n_layers"], header["vocab_size"]
    head_dim = dim // header["n_heads"]
    kv_dim = header["n_kv_heads"] * head_dim
    shapes = [
        ("token_embedding_table", (vocab, dim)),
        ("rms_att_weight", (layers, dim)),
        ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_dim, dim)),
        ("wv", (layers, kv_dim, dim)),
        ("wo", (layers, dim, dim)),
        ("rms_ffn_weight", (layers, dim)),
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("rms_final_weight", (dim,)),
        ("freq_cis_real", (header["seq_len"], head_dim // 2)),
        ("freq_cis_imag", (header["seq_len"], head_dim // 2)),
    ]
    if not header["shared_classifier"]:
        shapes.append(("wcls", (vocab, dim)))
    return shapes


def read_llama2c_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a legacy (version-0) llama2.c checkpoint.

    Returns:
        header: the 7 header fields, with ``vocab_size`` made positive, and ``shared_classifier``
            (True when the header's vocab_size was positive: logits use the token embedding).
        weights: float32 tensors named as in run.c, matrices (out_features, in_features):
            token_embedding_table [vocab, dim], rms_att_weight [L, dim], wq [L, dim, dim],
            wk / wv [L, kv_dim, dim], wo [L, dim, dim], rms_ffn_weight [L, dim], w1 / w3 [L, hidden, dim],
            w2 [L, dim, hidden], rms_final_weight [dim], wcls [vocab, dim] (the token embedding itself
            when shared). The legacy RoPE tables are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"llama2.c checkpoint not found: {path}")
    actual_bytes = path.stat().st_size
    if actual_bytes < HEADER_BYTES:
        raise ModelFileError(f"{path}: expected at least {HEADER_BYTES} bytes (header), got {actual_bytes} bytes")
    with open(path, "rb") as f:
        values = struct.unpack(f"<{len(HEADER_FIELDS)}i", f.read(HEADER_BYTES))
    header: dict = dict(zip(HEADER_FIELDS, values))
    _check_header(header, path)
    header["shared_classifier"] = header["vocab_size"] > 0
    header["vocab_size"] = abs(header["vocab_size"])

    shapes = _array_shapes(header)
    expected_bytes = HEADER_BYTES + 4 * sum(math.prod(shape) for _, shape in shapes)
    if actual_bytes != expected_bytes:
        raise ModelFileError(
            f"{path}: expected {expected_bytes} bytes for header {dict(zip(HEADER_FIELDS, values))}, "
            f"got {actual_bytes} bytes"
        )
    floats = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=HEADER_BYTES))
    weights, offset = {}, 0
    for name, shape in shapes:
        size = math.prod(shape)
        weights[name] = floats[offset : offset + size].view(shape)
        offset += size
    del weights["freq_cis_real"], weights["freq_cis_imag"]
    weights.setdefault("wcls", weights["token_embedding_table"])
    return header, weights


# --- conversion -------------------------------------------------------------------------


def _config(
    header: dict, model_name: str, device: str | torch.device | None, dtype: torch.dtype
) -> HookedTransformerConfig:
    d_head = header["dim"] // header["n_heads"]
    grouped = header["n_kv_heads"] != header["n_heads"]
    return HookedTransformerConfig(
        model_name=model_name,
        d_model=header["dim"],
        d_head=d_head,
        n_heads=header["n_heads"],
        n_key_value_heads=header["n_kv_heads"] if grouped else None,
        d_mlp=header["hidden_dim"],
        n_layers=header["n_layers"],
        n_ctx=header["seq_len"],
        d_vocab=header["vocab_size"],
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        eps=1e-5,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=10000,
        rotary_adjacent_pairs=True,
        final_rms=True,
        original_architecture="LlamaForCausalLM",
        default_prepend_bos=True,
        init_weights=False,
        device=device,
        dtype=dtype,
    )


def _transformer_lens_state_dict(header: dict, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llama2.c weights in HookedTransformer's layout: W_Q [head, d_model, d_head], W_O [head, d_head,
    d_model], W_in / W_gate [d_model, d_mlp], W_out [d_mlp, d_model], zero biases. K and V are
    ``_W_K`` / ``_W_V`` [kv_head, d_model, d_head] under grouped-query attention."""
    n_heads, n_kv_heads = header["n_heads"], header["n_kv_heads"]
    d_head = header["dim"] // n_heads
    kv = "_" if n_kv_heads != n_heads else ""

    def heads(w: Float[torch.Tensor, "n*d_head d_model"], n: int) -> Float[torch.Tensor, "n d_model d_head"]:
        return einops.rearrange(w, "(head d_head) d_model -> head d_model d_head", head=n)

    state_dict = {
        "embed.W_E": weights["token_embedding_table"].clone(),
        "ln_final.w": weights["rms_final_weight"].clone(),
        "unembed.W_U": weights["wcls"].T.clone(),
        "unembed.b_U": torch.zeros(header["vocab_size"]),
    }
    for layer in range(header["n_layers"]):
        block = f"blocks.{layer}"
        state_dict |= {
            f"{block}.ln1.w": weights["rms_att_weight"][layer].clone(),
            f"{block}.attn.W_Q": heads(weights["wq"][layer], n_heads),
            f"{block}.attn.{kv}W_K": heads(weights["wk"][layer], n_kv_heads),
            f"{block}.attn.{kv}W_V": heads(weights["wv"][layer], n_kv_heads),
            f"{block}.attn.W_O": einops.rearrange(
                weights["wo"][layer], "d_model (head d_head) -> head d_head d_model", head=n_heads
            ),
            f"{block}.attn.b_Q": torch.zeros(n_heads, d_head),
            f"{block}.attn.{kv}b_K": torch.zeros(n_kv_heads, d_head),
            f"{block}.attn.{kv}b_V": torch.zeros(n_kv_heads, d_head),
            f"{block}.attn.b_O": torch.zeros(header["dim"]),
            f"{block}.ln2.w": weights["rms_ffn_weight"][layer].clone(),
            f"{block}.mlp.W_gate": weights["w1"][layer].T.clone(),
            f"{block}.mlp.W_in": weights["w3"][layer].T.clone(),
            f"{block}.mlp.W_out": weights["w2"][layer].T.clone(),
            f"{block}.mlp.b_in": torch.zeros(header["hidden_dim"]),
            f"{block}.mlp.b_out": torch.zeros(header["dim"]),
        }
    return {name: tensor.contiguous() for name, tensor in state_dict.items()}


# --- loading ----------------------------------------------------------------------------


def _resolve_checkpoint(path: Path) -> Path:
    """``path`` itself, or the single non-tokenizer ``.bin`` in the folder ``path``."""
    if not path.exists():
        raise MissingFileError(f"llama2.c checkpoint not found: {path}")
    if path.is_file():
        return path
    candidates = sorted(p for p in path.glob("*.bin") if not p.name.startswith("tok"))
    if not candidates:
        raise MissingFileError(f"no llama2.c checkpoint (.bin, not tok*.bin) in {path}")
    if len(candidates) > 1:
        raise InputError(f"several llama2.c checkpoints in {path}: {[p.name for p in candidates]}; pass one")
    return candidates[0]


def _find_tokenizer(checkpoint: Path, vocab_size: int) -> Llama2cTokenizer | None:
    """The ``tok*.bin`` beside ``checkpoint`` with ``vocab_size`` tokens; None if there is no ``tok*.bin``."""
    tokenizers = {p.name: Llama2cTokenizer(p) for p in sorted(checkpoint.parent.glob("tok*.bin"))}
    if not tokenizers:
        return None
    matching = [t for t in tokenizers.values() if t.vocab_size == vocab_size]
    if len(matching) != 1:
        found = {name: t.vocab_size for name, t in tokenizers.items()}
        raise ModelFileError(
            f"{len(matching)} tokenizers beside {checkpoint.name} have its vocab_size {vocab_size} "
            f"(vocab sizes found: {found}); pass tokenizer_path"
        )
    return matching[0]


def load_llama2c(
    path: str | Path,
    tokenizer_path: str | Path | None = None,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> HookedTransformer:
    """A llama2.c checkpoint as a `HookedTransformer`, with its `Llama2cTokenizer` attached.

    Args:
        path: the checkpoint ``.bin``, or a folder holding exactly one non-``tok*`` ``.bin``.
        tokenizer_path: a llama2.c ``tok*.bin``. None: the ``tok*.bin`` beside the checkpoint whose
            vocabulary size matches the header's; if there is no ``tok*.bin`` at all, the model comes
            without a tokenizer (feed it token ids).
        fold_ln, center_writing_weights, center_unembed, fold_value_biases: TransformerLens weight
            processing (`HookedTransformer.load_and_process_state_dict`); with fold_ln the RMSNorm
            weights are folded into the next layer and the norms become ``RMSPre``.
        device, dtype: where and in which precision the model lives (dtype: a torch dtype or its name).

    Raises MissingFileError for a missing checkpoint or tokenizer, ModelFileError for one that is
    truncated or whose header llama2.c's architecture cannot take (naming the field), InputError for
    a folder holding several checkpoints or a bad device / dtype.
    """
    backend.needs_tl3("a llama2.c checkpoint", CONFIG_NEEDS_TL3)
    device, dtype = as_device(device), as_dtype(dtype)
    checkpoint = _resolve_checkpoint(Path(path))
    header, weights = read_llama2c_checkpoint(checkpoint)
    if tokenizer_path is None:
        tokenizer = _find_tokenizer(checkpoint, header["vocab_size"])
    else:
        tokenizer = Llama2cTokenizer(tokenizer_path)
        if tokenizer.vocab_size != header["vocab_size"]:
            raise ModelFileError(
                f"{Path(tokenizer_path)} has {tokenizer.vocab_size} tokens but {checkpoint.name} "
                f"has vocab_size {header['vocab_size']}"
            )

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        model = HookedTransformer(_config(header, checkpoint.stem, device, dtype), tokenizer=tokenizer)
    model.load_and_process_state_dict(
        _transformer_lens_state_dict(header, weights),
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )
    return model.eval()
