"""The logit lens the plain way: every residual stream from run_with_cache, the final norm written out
from the config, then W_U and b_U: all the logits [layer, batch, pos, vocab] at once (what lenskit.lens
avoids). Shares no code with lenskit."""

from __future__ import annotations

import torch

from lenskit.backend import Model


def final_norm_by_hand(model: Model, x: torch.Tensor) -> torch.Tensor:
    """The model's final normalisation written out from its config: LayerNorm or RMSNorm, with or without weights."""
    kind = model.cfg.normalization_type
    if kind is None:
        return x
    rms = kind.startswith("RMS") or model.cfg.final_rms
    if not rms:
        x = x - x.mean(-1, keepdim=True)
    x = x / (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    if kind in ("LN", "RMS"):
        x = x * model.ln_final.w + (0 if rms else model.ln_final.b)
    return x


def reference_logits(model: Model, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """[layer, batch, pos, vocab]: each resid_pre and the final resid_post (run_with_cache), normed, @ W_U + b_U."""
    n = model.cfg.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
        resid = torch.stack([cache[name] for name in names])
        return (final_norm_by_hand(model, resid) if normalize else resid) @ model.W_U + model.b_U


def naive_lens(model: Model, tokens: torch.Tensor, top_k: int = 5):
    """Top-k probabilities and ids [layer, batch, pos, k] from all the logits [layer, batch, pos, vocab] at once."""
    return reference_logits(model, tokens).softmax(dim=-1).topk(top_k, dim=-1)
