"""The residual stream in memory, as labelled stacks taken from one run (the disk store is `lenskit.shards`).

    residual_stream(model, tokens, kind="pre")     LabelledTensor [component, batch, pos, d_model]
    decompose_residual(model, tokens)              LabelledTensor [component, batch, pos, d_model]

`tokens` may be a `lenskit.Run`: what it holds is reused, and what it lacks is cached by one
forward pass that stops after the last block the hooks sit in (`Run.require`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from lenskit import checks, sites
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.labelled import LabelledTensor
from lenskit.run import Run, as_run
from lenskit.tokens import Prompts

RESIDUAL_DIMS = ("component", "batch", "pos", "d_model")


def residual_stream(
    model: Model,
    tokens: Prompts | Run,
    kind: Literal["pre", "mid", "post", "all"] = "pre",
    layers: Iterable[int] | None = None,
) -> LabelledTensor:
    """The residual stream at each layer, stacked: [component, batch, pos, d_model].

    Components are labelled by hook name, as `sites.residual_names(model, kind, layers)` lists them:
      kind="pre":  blocks.{l}.hook_resid_pre for each layer l, then the final stream
                   blocks.{L-1}.hook_resid_post (as `ActivationCache.accumulated_resid`);
      kind="mid":  blocks.{l}.hook_resid_mid;   kind="post": blocks.{l}.hook_resid_post;
      kind="all":  resid_pre 0, resid_mid 0, resid_pre 1, ..., resid_mid L-1, final resid_post
                   (as `accumulated_resid(incl_mid=True)`).
    `layers` picks layer indices: 0..L-1 for "mid" and "post"; 0..L for "pre" and "all", where
    L stands for the final stream. Only those hooks are cached, and the forward pass stops
    after the last block they need.
    """
    return _stacked(as_run(model, tokens), sites.residual_names(model, kind, layers))


def decompose_residual(model: Model, tokens: Prompts | Run, layer: int | None = None) -> LabelledTensor:
    """What each component wrote into the residual stream entering block `layer`: [component, batch, pos, d_model].

    Components, labelled by hook name: hook_embed; hook_pos_embed when the model adds a learned
    positional embedding to the stream (not rotary, ALiBi or shortformer); then
    blocks.{l}.hook_attn_out and blocks.{l}.hook_mlp_out for each l < layer. They sum to
    blocks.{layer}.hook_resid_pre; layer=None (or L) means the final stream
    blocks.{L-1}.hook_resid_post, before the final norm.
    """
    n_layers = model.cfg.n_layers
    layer = n_layers if layer is None else checks.integer(layer, "layer")
    if not 0 <= layer <= n_layers:
        raise InputError(f"layer {layer} out of range: 0..{n_layers}, where {n_layers} is the final residual stream")
    names = sites.embedding_names(model)
    for block in range(layer):
        names.append(sites.act_name("attn_out", block))
        if not model.cfg.attn_only:
            names.append(sites.act_name("mlp_out", block))
    return _stacked(as_run(model, tokens), names)


def _stacked(run: Run, names: list[str]) -> LabelledTensor:
    """The activations `names` of `run`, stacked along a leading component axis labelled by name."""
    cached = run.require(names)
    return LabelledTensor(torch.stack([cached[name] for name in names]), RESIDUAL_DIMS, {"component": names})
