"""Resuming a run part way: the model's blocks from a cached residual stream, reusing earlier keys and values.

Patching runs the corrupted prompt once, then re-runs only what a patch can change: from the
patched layer on (the residual stream entering it is cached), and under causal attention only
from the first changed position on (earlier positions' keys and values come from the cached run
through TransformerLens' key/value cache entries). Rows of several patched runs that enter at
different layers share one batched forward: ``joins[L]`` rows join the batch before block L.

    final = run_blocks(model, {3: resid_pre_3, 5: resid_pre_5}, entry, attention_mask)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from lenskit import sites

MEMORY_BUDGET = 256 * 2**20
"""Bytes of activations that one batched forward of resumed runs may use (roughly)."""

Entry = Callable[[int, int], "TransformerLensKeyValueCacheEntry | None"]
"""entry(layer, n_rows): the key/value cache entry holding a layer's earlier positions (None: there are none)."""


def run_blocks(
    model: HookedTransformer, joins: dict[int, Tensor], entry: Entry, attention_mask: Tensor | None
) -> Tensor:
    """Run the blocks from the first layer in `joins` to the end; ``joins[L]`` rows [rows, pos, d_model]
    enter before block L (``joins[n_layers]`` after the last block). Returns the final streams."""
    resid = None
    for layer in range(min(joins), model.cfg.n_layers + 1):
        if layer in joins:
            resid = joins[layer] if resid is None else torch.cat([resid, joins[layer]])
        if layer < model.cfg.n_layers:
            resid = run_block(model, layer, resid, entry, attention_mask)
    return resid


def run_block(
    model: HookedTransformer, layer: int, resid: Tensor, entry: Entry, attention_mask: Tensor | None
) -> Tensor:
    """One block on `resid` [rows, positions, d_model], after the positions held by entry(layer, rows).

    attention_mask: the run's padding mask [batch, pos] (None when nothing is padded), tiled over rows.
    """
    rows = resid.shape[0]
    past = entry(layer, rows)
    if attention_mask is not None:
        n_keys = resid.shape[1] + (0 if past is None else past.past_keys.shape[1])
        attention_mask = attention_mask[:, :n_keys].repeat(rows // attention_mask.shape[0], 1)
    return model.blocks[layer](resid, past_kv_cache_entry=past, attention_mask=attention_mask)


def empty_entry(model: HookedTransformer, resid: Tensor) -> TransformerLensKeyValueCacheEntry:
    """An empty key/value cache entry for a batch like `resid`, with as many heads as hook_k has
    (TransformerLens' init_cache_entry ignores ``ungroup_grouped_query_attention``)."""
    cfg = model.cfg
    empty = torch.empty(len(resid), 0, sites.n_key_value_heads(model), cfg.d_head, device=resid.device, dtype=cfg.dtype)
    return TransformerLensKeyValueCacheEntry(empty, empty.clone())
