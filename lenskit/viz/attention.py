"""Attention patterns of one layer, every head, with token labels (circuitsvis AttentionHeads, offline).

A pure renderer: `lenskit.run.Run.attention_patterns` reads a layer's pattern from a run and draws it here.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor

from lenskit.errors import InputError
from lenskit.viz.circuits import circuitsvis_figure
from lenskit.viz.figure import Figure


def attention_patterns(
    pattern: Float[Tensor, "head query_pos key_pos"],
    tokens: Sequence[str],
    head_names: Sequence[str] | None = None,
    title: str = "attention patterns",
) -> Figure:
    """Every head's attention `pattern` [head, query_pos, key_pos] over `tokens` [pos] (the axis labels).

    head_names: one per head (default H0, H1, ...).
    """
    n_pos = len(tokens)
    if pattern.ndim != 3 or tuple(pattern.shape[1:]) != (n_pos, n_pos):
        raise InputError(
            f"attention_patterns: pattern of shape {tuple(pattern.shape)} for {n_pos} tokens; "
            f"expected [head, {n_pos}, {n_pos}] (head, query_pos, key_pos)"
        )
    head_names = [f"H{head}" for head in range(pattern.shape[0])] if head_names is None else list(head_names)
    if len(head_names) != pattern.shape[0]:
        raise InputError(f"attention_patterns: {len(head_names)} head names for {pattern.shape[0]} heads")
    return circuitsvis_figure(
        "AttentionHeads",
        {"attention": pattern.detach().float().cpu(), "tokens": list(tokens), "attentionHeadNames": head_names},
        title=title,
    )
