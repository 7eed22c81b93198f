"""Which TransformerLens is installed, and the few places its two model types differ.

lenskit runs on TransformerLens 3.9 (``HookedTransformer``) and on 4.x (``TransformerBridge``, which
wraps the Hugging Face modules; lenskit loads it in compatibility mode). Both keep ``HookPoint``,
``hook_dict`` and TransformerLens' hook names; a bridge's HookPoint answers to several names (its
own, ``blocks.0.hook_in``, and the legacy alias, ``blocks.0.hook_resid_pre``). lenskit speaks the
legacy names, so hook functions attached through `fwd_hooks` see ``hook.name`` as registered.

    if backend.is_bridge(model): ...
    model.hooks(fwd_hooks=backend.fwd_hooks(model, pairs))  # one call per HookPoint, legacy names
"""

from __future__ import annotations

from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import Tensor

from lenskit.errors import BackendError

TL4 = int(version("transformer-lens").split(".")[0]) >= 4
"""True when TransformerLens 4.x (the bridge) is installed."""

if TYPE_CHECKING or not TL4:
    from transformer_lens import HookedTransformer as Model
else:
    from transformer_lens.model_bridge import TransformerBridge as Model

__all__ = ["TL4", "Model", "is_bridge", "needs_tl3", "fwd_hooks", "legacy_names", "bias", "architecture", "flag"]

LEGACY_LEAVES = frozenset(
    "hook_embed hook_pos_embed hook_tokens hook_resid_pre hook_resid_mid hook_resid_post hook_attn_out hook_mlp_out "
    "hook_q hook_k hook_v hook_z hook_pattern hook_attn_scores hook_rot_q hook_rot_k hook_result hook_pre hook_post "
    "hook_pre_linear hook_scale hook_normalized hook_q_input hook_k_input hook_v_input hook_attn_in hook_mlp_in".split()
)
"""The last part of HookedTransformer's hook names."""

BRIDGE_PARTS = frozenset({"q", "k", "v", "o", "qkv", "in", "out", "gate"})
"""Bridge submodules (attn.q, mlp.gate, ...) whose hooks are not HookedTransformer's."""


def is_bridge(model: Any) -> bool:
    """True for a TransformerLens 4 TransformerBridge."""
    return TL4 and isinstance(model, Model)


def needs_tl3(feature: str, why: str) -> None:
    """Raise BackendError when TransformerLens 4 is installed: `feature` needs 3.9 because `why`."""
    if TL4:
        raise BackendError(
            f"{feature} needs TransformerLens 3.9 (installed: {version('transformer-lens')}): {why}; "
            'install it with pip install "transformer-lens>=3.9,<4"'
        )


def _is_legacy(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] in LEGACY_LEAVES and (len(parts) < 2 or parts[-2] not in BRIDGE_PARTS)


def legacy_names(model: Model) -> dict[str, str]:
    """A bridge's own HookPoint names -> the legacy alias (blocks.0.hook_in -> blocks.0.hook_resid_pre)."""
    out: dict[str, str] = {}
    for name, point in model.hook_dict.items():
        if not _is_legacy(point.name) and _is_legacy(name):
            out.setdefault(point.name, name)
    return out


def use_legacy_names(model: Model) -> None:
    """Name each of a bridge's HookPoints by its legacy alias, so that hook functions see
    ``blocks.0.hook_resid_pre`` however they were attached (TransformerLens' own run_with_hooks too)."""
    points = model.hook_dict
    for own, legacy in legacy_names(model).items():
        points[own].name = legacy


class _Named:
    """A HookPoint seen under another name (what a hook function reads as ``hook.name``)."""

    def __init__(self, point, name: str):
        self._point, self.name = point, name

    def __getattr__(self, attr: str):
        return getattr(self._point, attr)


def _renamed(fn: Callable, name_of: Callable[[str], str]) -> Callable:
    return lambda activation, hook: fn(activation, _Named(hook, name_of(hook.name)))


def fwd_hooks(model: Model, pairs: Iterable[tuple[Any, Callable]]) -> list[tuple[Any, Callable]]:
    """`pairs` as ``model.hooks(fwd_hooks=...)`` should get them.

    On a bridge: an exact name is attached to its HookPoint's own name (attaching an alias in
    compatibility mode calls the function once per name) and the function sees the name given;
    a filter is passed on (the bridge calls it once per HookPoint, skipping gated ones) and the
    function sees the legacy name. On TransformerLens 3.9: unchanged.
    """
    if not is_bridge(model):
        return list(pairs)
    names, points = legacy_names(model), model.hook_dict
    return [
        (points[sel].name, _renamed(fn, lambda _, sel=sel: sel))
        if isinstance(sel, str)
        else (sel, _renamed(fn, lambda own: names.get(own, own)))
        for sel, fn in pairs
    ]


def bias(module: torch.nn.Module, name: str, shape: tuple[int, ...]) -> Tensor:
    """``module.<name>``, or zeros of `shape` where the bridge has no bias (HookedTransformer keeps zeros)."""
    value = getattr(module, name, None)
    if value is not None:
        return value
    weight = next(module.parameters())
    return torch.zeros(shape, dtype=weight.dtype, device=weight.device)


def architecture(cfg: Any) -> str | None:
    """The Hugging Face architecture name (``original_architecture`` on 3.9, ``architecture`` on a bridge)."""
    return getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None)


def flag(cfg: Any, name: str) -> bool:
    """A boolean config switch, False where this backend's config lacks it (the bridge has no
    ``use_attention_sinks`` or ``ungroup_grouped_query_attention``)."""
    return bool(getattr(cfg, name, False))
