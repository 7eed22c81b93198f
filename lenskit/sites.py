"""The hook-site vocabulary: where in a model an analysis reads or writes, declared once.

Names are TransformerLens' (``utils.get_act_name``): ``act_name("z", 3) == "blocks.3.attn.hook_z"``.
Layouts say where the position and head axes of each hook's activation are:

    [batch, pos, d]                    resid_pre / mid / post, attn_out, mlp_out, mlp pre / post
    [batch, pos, head, d_head]         q, k, v, z, result (and rot_q, rot_k, *_input)
    [batch, head, query_pos, key_pos]  pattern, attn_scores

Under grouped-query attention k and v (and rot_k, k_input, v_input) have n_key_value_heads heads,
each read by a group of query heads; every other per-head site has n_heads. The same leaf names
serve HookedWhisper's ``encoder.blocks.*`` and ``decoder.blocks.*`` hooks.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformer_lens import HookedRootModule
from transformer_lens.utilities import get_act_name

from lenskit import checks
from lenskit.errors import InputError

PER_HEAD = frozenset(
    {
        "hook_q",
        "hook_k",
        "hook_v",
        "hook_z",
        "hook_result",
        "hook_rot_q",
        "hook_rot_k",
        "hook_q_input",
        "hook_k_input",
        "hook_v_input",
        "hook_attn_in",
    }
)
"""Leaf names of hooks whose activations are [batch, pos, head, ...]."""

KEY_VALUE = frozenset({"hook_k", "hook_v", "hook_rot_k", "hook_k_input", "hook_v_input"})
"""Per-head leaf names whose head axis holds key/value heads (fewer under grouped-query attention)."""

PER_HEAD_PAIR = frozenset({"hook_pattern", "hook_attn_scores"})
"""Leaf names of hooks whose activations are [batch, head, query_pos, key_pos]."""

RESIDUAL_KINDS = ("pre", "mid", "post", "all")


def act_name(site: str, layer: int | None = None, stack: str | None = None, attention: str = "attn") -> str:
    """TransformerLens' hook name of `site` in block `layer`: ``act_name("resid_pre", 2)`` -> ``blocks.2.hook_resid_pre``.

    HookedWhisper's stacks and its cross-attention: ``act_name("z", 1, "decoder", "cross_attn")`` ->
    ``decoder.blocks.1.cross_attn.hook_z``.
    """
    name = get_act_name(site, layer)
    if attention != "attn":
        name = name.replace(".attn.", f".{attention}.")
    return name if stack is None else f"{stack}.{name}"


def leaf(name: str) -> str:
    """The last part of a hook name: ``"blocks.3.attn.hook_z"`` -> ``"hook_z"``."""
    return name.rsplit(".", 1)[-1]


def layout(name: str) -> tuple[int, int | None]:
    """(position axis, head axis or None) of a hook's activation, batch axis 0 included."""
    if leaf(name) in PER_HEAD_PAIR:
        return 2, 1
    if leaf(name) in PER_HEAD:
        return 1, 2
    return 1, None


def is_key_value(name: str) -> bool:
    """Whether the hook's head axis counts key/value heads."""
    return leaf(name) in KEY_VALUE


def is_pair(name: str) -> bool:
    """Whether the hook holds attention pairs [batch, head, query_pos, key_pos]."""
    return leaf(name) in PER_HEAD_PAIR


def layer_of(name: str) -> int | None:
    """The block number in a hook name (``blocks.3.hook_resid_pre`` -> 3); None outside the blocks."""
    parts = name.split(".")
    for stack, number in zip(parts, parts[1:]):
        if stack == "blocks" and number.isdigit():
            return int(number)
    return None


def n_key_value_heads(model: HookedRootModule) -> int:
    """How many heads hook_k and hook_v have: n_key_value_heads under grouped-query attention (unless
    ``cfg.ungroup_grouped_query_attention``), otherwise n_heads."""
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None)
    if n_kv is None or getattr(cfg, "ungroup_grouped_query_attention", False):
        return cfg.n_heads
    return n_kv


def n_heads_at(model: HookedRootModule, name: str) -> int:
    """Heads along the head axis of hook `name` (key/value heads for k and v)."""
    return n_key_value_heads(model) if is_key_value(name) else model.cfg.n_heads


def residual_names(model: HookedRootModule, kind: str = "pre", layers: Iterable[int] | None = None) -> list[str]:
    """Residual-stream hook names, one per layer (the final stream counts as layer L for "pre" and "all").

    kind="pre":  blocks.{l}.hook_resid_pre for l in 0..L-1, and the final blocks.{L-1}.hook_resid_post as L;
    kind="mid":  blocks.{l}.hook_resid_mid;   kind="post": blocks.{l}.hook_resid_post;
    kind="all":  resid_pre 0, resid_mid 0, resid_pre 1, ..., resid_mid L-1, final resid_post.
    """
    n_layers = model.cfg.n_layers
    if kind not in RESIDUAL_KINDS:
        raise InputError(f"kind must be one of {RESIDUAL_KINDS}, not {kind!r}")
    if kind in ("mid", "all") and act_name("resid_mid", 0) not in model.hook_dict:
        why = (
            "attention and MLP both read resid_pre (parallel_attn_mlp)"
            if model.cfg.parallel_attn_mlp
            else "it is attention-only"
        )
        raise InputError(f"kind={kind!r} needs blocks.*.hook_resid_mid, which this model has not: {why}")
    top = n_layers if kind in ("pre", "all") else n_layers - 1
    layers = list(range(top + 1)) if layers is None else checks.integers(layers, "layers")
    outside = [layer for layer in layers if not 0 <= layer <= top]
    if outside:
        final = f", where {n_layers} is the final residual stream" if top == n_layers else ""
        raise InputError(f"layers {outside} out of range: kind={kind!r} takes layers 0..{top}{final}")
    names = []
    for layer in layers:
        if layer == n_layers:
            names.append(final_residual(model))
            continue
        if kind in ("pre", "all"):
            names.append(act_name("resid_pre", layer))
        if kind in ("mid", "all"):
            names.append(act_name("resid_mid", layer))
        if kind == "post":
            names.append(act_name("resid_post", layer))
    return names


def final_residual(model: HookedRootModule) -> str:
    """The hook of the final residual stream, before the final norm: ``blocks.{L-1}.hook_resid_post``."""
    return act_name("resid_post", model.cfg.n_layers - 1)


def block_input(layer: int) -> str:
    """The stream entering block `layer` as seen after the previous block (resid_post of layer - 1;
    the embeddings, resid_pre of block 0, for layer 0)."""
    return act_name("resid_pre", 0) if layer == 0 else act_name("resid_post", layer - 1)


def embedding_names(model: HookedRootModule) -> list[str]:
    """The embeddings written into the stream: hook_embed, and hook_pos_embed for learned absolute positions."""
    return ["hook_embed", *(["hook_pos_embed"] if model.cfg.positional_embedding_type == "standard" else [])]
