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
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from lenskit import backend, sites
from lenskit.backend import Model

MEMORY_BUDGET = 256 * 2**20
"""Bytes of activations that one batched forward of resumed runs may use (roughly)."""

Entry = Callable[[int, int], "TransformerLensKeyValueCacheEntry | None"]
"""entry(layer, n_rows): the key/value cache entry holding a layer's earlier positions (None: there are none)."""


def run_blocks(model: Model, joins: dict[int, Tensor], entry: Entry, attention_mask: Tensor | None) -> Tensor:
    """Run the blocks from the first layer in `joins` to the end; ``joins[L]`` rows [rows, pos, d_model]
    enter before block L (``joins[n_layers]`` after the last block). Returns the final streams."""
    resid = None
    for layer in range(min(joins), model.cfg.n_layers + 1):
        if layer in joins:
            resid = joins[layer] if resid is None else torch.cat([resid, joins[layer]])
        if layer < model.cfg.n_layers:
            resid = run_block(model, layer, resid, entry, attention_mask)
    return resid


def run_block(model: Model, layer: int, resid: Tensor, entry: Entry, attention_mask: Tensor | None) -> Tensor:
    """One block on `resid` [rows, positions, d_model], after the positions held by entry(layer, rows).

    attention_mask: the run's padding mask [batch, pos] (None when nothing is padded), tiled over rows.
    """
    rows = resid.shape[0]
    past = entry(layer, rows)
    if attention_mask is not None:
        n_keys = resid.shape[1] + (0 if past is None else past.past_keys.shape[1])
        attention_mask = attention_mask[:, :n_keys].repeat(rows // attention_mask.shape[0], 1)
    if backend.is_bridge(model):
        return _run_bridge_block(model, layer, resid, past, attention_mask)
    return model.blocks[layer](resid, past_kv_cache_entry=past, attention_mask=attention_mask)


def _run_bridge_block(
    model: Model,
    layer: int,
    resid: Tensor,
    past: TransformerLensKeyValueCacheEntry | None,
    attention_mask: Tensor | None,
) -> Tensor:
    """`run_block` on a TransformerBridge, whose block is the Hugging Face layer: earlier keys and values
    go in as ``layer_past``, rotary models need their cos/sin for the new positions, and a mask must be
    4D, additive and causal (a 4D mask replaces the layer's own causal mask)."""
    n_past, n_new = (0 if past is None else past.past_keys.shape[1]), resid.shape[1]
    kwargs = {} if past is None else {"layer_past": _LayerPast(past)}
    if model.cfg.positional_embedding_type == "rotary":
        positions = torch.arange(n_past, n_past + n_new, device=resid.device).expand(len(resid), -1)
        kwargs["position_embeddings"] = model.rotary_emb(resid, positions)
    if attention_mask is not None:
        causal = torch.ones(n_new, n_past + n_new, dtype=torch.bool, device=resid.device).tril(n_past)
        allowed = causal & attention_mask.bool()[:, None, None, :]  # [rows, 1, query, key]
        kwargs["attention_mask"] = torch.zeros(allowed.shape, dtype=resid.dtype, device=resid.device).masked_fill(
            ~allowed, float("-inf")
        )
    out = model.blocks[layer](resid, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _LayerPast:
    """A Hugging Face cache layer (``update(k, v, layer_idx)``, keys [rows, head, pos, d_head]) over a
    TransformerLens entry ([rows, pos, head, d_head]); the bridge hands keys after rotary embedding,
    as TransformerLens 3.9 stores them."""

    def __init__(self, entry: TransformerLensKeyValueCacheEntry):
        self.entry = entry

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        entry = self.entry
        keys = torch.cat([entry.past_keys, keys.transpose(1, 2)], 1)
        values = torch.cat([entry.past_values, values.transpose(1, 2)], 1)
        if not entry.frozen:
            entry.past_keys, entry.past_values = keys, values
        return keys.transpose(1, 2), values.transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.entry.past_keys.shape[1]


def empty_entry(model: Model, resid: Tensor) -> TransformerLensKeyValueCacheEntry:
    """An empty key/value cache entry for a batch like `resid`, with as many heads as hook_k has
    (TransformerLens' init_cache_entry ignores ``ungroup_grouped_query_attention``)."""
    cfg = model.cfg
    empty = torch.empty(len(resid), 0, sites.n_key_value_heads(model), cfg.d_head, device=resid.device, dtype=cfg.dtype)
    return TransformerLensKeyValueCacheEntry(empty, empty.clone())
