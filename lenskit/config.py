"""The config a text model is built from: every field checked before TransformerLens sees it.

check_config(fields, "model/hooked_transformer.json")   # ModelFileError naming the field and its valid range
model = build_model(fields, tokenizer, source)           # a HookedTransformer, offline
as_dtype("bfloat16"); as_device("cuda:1")                # the dtype / device arguments every loader takes
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

from lenskit import backend
from lenskit.errors import InputError, ModelFileError
from lenskit.offline import hf_offline

if not backend.TL4:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

CONFIG_NEEDS_TL3 = "it builds a HookedTransformer from HookedTransformerConfig fields, which TransformerLens 4 removed"
"""Why lenskit folders, config files, the zoo and llama2.c checkpoints need TransformerLens 3.9."""

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
"""The dtypes a model is loaded in, by name (``dtype=`` and a config's "dtype")."""

_SIZES = {  # field -> (smallest valid value, other values with a meaning)
    "n_layers": (1, ()),
    "d_model": (1, ()),
    "d_head": (1, ()),
    "n_ctx": (1, ()),
    "n_heads": (1, (-1,)),
    "d_vocab": (1, (-1,)),
    "d_vocab_out": (1, (-1,)),
    "d_mlp": (1, (None,)),
    "n_key_value_heads": (1, (None,)),
    "rotary_dim": (2, (None,)),
    "window_size": (1, (None,)),
    "num_experts": (1, (None,)),
    "experts_per_token": (1, (None,)),
    "n_devices": (1, ()),
}
_CHOICES = {
    "act_fn": tuple(SUPPORTED_ACTIVATIONS),
    "normalization_type": (None, "LN", "LNPre", "RMS", "RMSPre"),
    "positional_embedding_type": ("standard", "rotary", "shortformer", "alibi"),
    "attention_dir": ("causal", "bidirectional"),
    "init_mode": ("gpt2", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "muP"),
}
_REQUIRED = ("d_model", "d_head", "n_layers", "n_ctx")


def check_config(fields: dict[str, Any], source: str | os.PathLike) -> None:
    """Raise ModelFileError naming the first `HookedTransformerConfig` field of `fields` (read from
    `source`) that cannot build a model: its value and the valid range.

    Checked: the required shape fields are there; each field has its annotated type (a whole number,
    a finite number, true / false, a string, a dtype name); sizes are positive (-1 and None where
    TransformerLens derives them); names are ones TransformerLens knows; n_heads divides d_model,
    n_key_value_heads divides n_heads, rotary_dim is even and at most d_head.
    """

    def refuse(name: str, valid: str) -> None:
        raise ModelFileError(f"lenskit.load: {source}: {name}={fields[name]!r} is not valid; {valid}")

    missing = [name for name in _REQUIRED if name not in fields]
    if missing:
        raise ModelFileError(
            f"lenskit.load: {source} lacks the config fields {', '.join(missing)} "
            f"(every model needs {', '.join(_REQUIRED)})"
        )
    annotations = {f.name: str(f.type) for f in dataclasses.fields(HookedTransformerConfig)}
    for name, value in fields.items():
        kind = annotations.get(name, "")
        if value is None and (kind.startswith("Optional") or name == "act_fn" and fields.get("attn_only")):
            continue
        if name == "dtype":
            if not (
                value in DTYPES.values()
                if isinstance(value, torch.dtype)
                else isinstance(value, str) and value.removeprefix("torch.") in DTYPES
            ):
                refuse(name, f"valid: {', '.join(DTYPES)}")
        elif name == "device":
            if not isinstance(value, (str, torch.device)) or _device_or_none(value) is None:
                refuse(name, "valid: a torch device such as 'cpu', 'cuda' or 'cuda:1'")
        elif kind in ("int", "Optional[int]") and not _is_int(value):
            refuse(name, "valid: a whole number")
        elif "float" in kind and not (_is_number(value) and math.isfinite(value)):
            refuse(name, "valid: a finite number")
        elif kind in ("bool", "Optional[bool]") and not isinstance(value, bool):
            refuse(name, "valid: true or false")
        elif kind in ("str", "Optional[str]") and not isinstance(value, str):
            refuse(name, "valid: a string")
        elif kind == "Optional[List]" and not isinstance(value, list):
            refuse(name, "valid: a list")
    for name, (smallest, special) in _SIZES.items():
        value = fields.get(name, dataclasses.MISSING)
        if value is not dataclasses.MISSING and value not in special and value < smallest:
            also = " or ".join(str(s).replace("None", "null") for s in special)
            refuse(name, f"valid: a whole number of at least {smallest}{f' (or {also})' if also else ''}")
    for name, choices in _CHOICES.items():
        if name in fields and fields[name] not in choices and not (name == "act_fn" and fields.get("attn_only")):
            refuse(name, f"valid: {', '.join(map(str, choices))}")
    if "eps" in fields and fields["eps"] <= 0:
        refuse("eps", "valid: a number above 0")
    d_model, d_head, n_heads = fields["d_model"], fields["d_head"], fields.get("n_heads", -1)
    if n_heads == -1 and d_model % d_head:
        refuse("d_head", f"without n_heads, d_head must divide d_model={d_model}")
    if n_heads != -1 and d_model % n_heads:
        refuse("n_heads", f"n_heads must divide d_model={d_model}")
    n_heads = d_model // d_head if n_heads == -1 else n_heads
    if fields.get("n_key_value_heads") is not None and n_heads % fields["n_key_value_heads"]:
        refuse("n_key_value_heads", f"it must divide n_heads={n_heads}")
    if fields.get("positional_embedding_type") == "rotary":
        name = "d_head" if fields.get("rotary_dim") is None else "rotary_dim"  # TL rotates all of d_head by default
        if fields[name] % 2 or fields[name] > d_head:
            refuse(
                name, f"rotary embeddings turn pairs of dimensions: valid: an even number of at most d_head={d_head}"
            )
    if fields.get("num_experts") is not None and (fields.get("experts_per_token") or 0) > fields["num_experts"]:
        refuse("experts_per_token", f"valid: at most num_experts={fields['num_experts']}")


def build_model(fields: dict[str, Any], tokenizer, source: str | os.PathLike) -> HookedTransformer:
    """A HookedTransformer from config `fields` read from `source` (checked by `check_config`), offline;
    anything TransformerLens still refuses is a ModelFileError naming `source`."""
    backend.needs_tl3(f"a model built from config fields ({source})", CONFIG_NEEDS_TL3)
    check_config(fields, source)
    fields = {**fields, "dtype": as_dtype(fields.get("dtype", torch.float32))}
    try:
        with hf_offline(), quiet_deprecation():
            return HookedTransformer(HookedTransformerConfig.from_dict(fields), tokenizer)
    except (AssertionError, ValueError, TypeError, RuntimeError) as error:  # TL asserts; torch cannot allocate
        raise ModelFileError(f"lenskit.load: cannot build a model from {source}: {error}") from error


def as_dtype(dtype: Any, what: str = "dtype") -> torch.dtype:
    """A torch floating dtype from a torch.dtype or its name ("float16", "torch.bfloat16"); InputError otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise InputError(f"{what}={dtype!r} is not a dtype lenskit loads models in; valid: {', '.join(DTYPES)}")


def as_device(device: Any) -> str | None:
    """`device` as the string TransformerLens keeps (None stays None); InputError when torch does not know it."""
    if device is None:
        return None
    parsed = _device_or_none(device) if isinstance(device, (str, torch.device)) else None
    if parsed is None:
        raise InputError(f"device={device!r} is not a torch device; valid: 'cpu', 'cuda', 'cuda:1', 'mps', ...")
    return str(parsed)


def _device_or_none(device: str | torch.device) -> torch.device | None:
    try:
        return torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@contextmanager
def quiet_deprecation() -> Iterator[None]:
    """Hide TransformerLens's 'HookedTransformer is deprecated' warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer", category=DeprecationWarning)
        yield
