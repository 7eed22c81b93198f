"""Attention patterns of one layer, every head, with token labels (circuitsvis AttentionHeads, offline)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import HookedTransformer

from lenskit import hooks
from lenskit.tokens import as_tokens
from lenskit.viz.circuits import circuitsvis_figure
from lenskit.viz.figure import Figure


def attention_patterns(
    model: HookedTransformer,
    tokens: str | Sequence[str] | Int[Tensor, "batch pos"] | Int[Tensor, "pos"],
    layer: int,
    cache: Mapping[str, Tensor] | None = None,
    batch: int = 0,
    title: str | None = None,
) -> Figure:
    """The attention patterns [head, query_pos, key_pos] of `layer` for batch row `batch`.

    tokens: a text, a list of texts, or token ids; they label the axes.
    cache: an ``ActivationCache`` or dict holding ``blocks.{layer}.attn.hook_pattern``
        ([batch, head, query_pos, key_pos]) from a run on `tokens`; without it, the model runs
        up to `layer` with a cache hook on that pattern.
    """
    tokens = as_tokens(model, tokens)
    n_batch, n_pos = tokens.shape
    n_layers = model.cfg.n_layers
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    if not -n_batch <= batch < n_batch:
        raise ValueError(f"batch {batch} out of range: the tokens have {n_batch} batch rows (0..{n_batch - 1})")
    layer %= n_layers
    name = f"blocks.{layer}.attn.hook_pattern"
    if cache is None:
        saved = hooks.cache(name)
        with torch.no_grad():
            saved.run(model, tokens, stop_at_layer=layer + 1)
        cache = saved.store
    try:
        pattern = cache[name]
    except KeyError:
        raise ValueError(f"the cache holds no {name!r}; cache it (model.run_with_cache) or pass cache=None") from None
    expected = (n_batch, model.cfg.n_heads, n_pos, n_pos)
    if tuple(pattern.shape) != expected:
        raise ValueError(f"{name} in the cache has shape {tuple(pattern.shape)}, but these tokens need {expected} "
                         "[batch, head, query_pos, key_pos]")
    labels = token_labels(model, tokens[batch])
    return circuitsvis_figure(
        "AttentionHeads",
        {"attention": pattern[batch].detach().float().cpu(), "tokens": labels,
         "attentionHeadNames": [f"L{layer}H{head}" for head in range(model.cfg.n_heads)]},
        title=f"attention patterns, layer {layer}" if title is None else title,
    )


def token_labels(model: HookedTransformer, ids: Int[Tensor, "pos"]) -> list[str]:
    """The string of each token (its id as text when the model has no tokenizer)."""
    if model.tokenizer is None:
        return [str(i) for i in ids.tolist()]
    return model.to_str_tokens(ids)
