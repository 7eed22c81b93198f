"""Token-level pictures (circuitsvis, offline): tokens coloured by a value, and top-k next tokens per position.

circuitsvis writes token strings into the page as HTML, so they are HTML-escaped here: a token "<b>"
shows as "<b>" (not as markup), though the hover box of a coloured token spells it "&lt;b&gt;".
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.errors import InputError
from lenskit.viz.circuits import bundle_script, circuitsvis_figure, rendered
from lenskit.viz.figure import Figure

LOG_PROB_FLOOR = torch.finfo(torch.float32).tiny  # probabilities that underflowed read as log(tiny) = -87.3
LABEL_STYLE = "text-align:right;padding:2px 8px;white-space:nowrap;font:12px monospace"


def colored_tokens(
    tokens: Sequence[str],
    values: Float[Tensor, " pos"] | Sequence[float],
    title: str = "",
    min_value: float | None = None,
    max_value: float | None = None,
) -> Figure:
    """`tokens` coloured by one value each (negative red, positive blue); hover shows the value.

    min_value, max_value: the values that get the full colour (default: the smallest and largest).
    """
    values = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
    if values.shape != (len(tokens),):
        raise InputError(
            f"colored_tokens: {len(tokens)} tokens but values of shape {tuple(values.shape)}; give one value per token"
        )
    if not values.isfinite().all():
        raise InputError(f"colored_tokens: values must be finite, got {values.tolist()}")
    return circuitsvis_figure(
        "ColoredTokens",
        {"tokens": _escaped(tokens), "values": values, "minValue": min_value, "maxValue": max_value},
        title,
    )


def top_k_tokens(
    prompt: Sequence[str],
    top_strings: Sequence[Sequence[Sequence[str]]] | np.ndarray,
    top_probs: Float[Tensor, "row pos-1 k"],
    next_probs: Float[Tensor, "row pos-1"],
    next_ranks: Int[Tensor, "row pos-1"],
    rows: Sequence[str],
    row_notes: Sequence[str] | None = None,
    title: str = "",
) -> Figure:
    """Guesses of the next token at every position, one row of guesses per reader (circuitsvis TokenLogProbs).

    Each row shows `prompt` [pos] from its second token on, each token coloured by the probability
    the row gave it (`next_probs`, with its rank from 0 in `next_ranks`, both [row, pos - 1]);
    hovering a token shows the row's top-k guesses for it: `top_strings` and `top_probs`
    [row, pos - 1, k], most probable first. `rows` label the rows, `row_notes` add a small second line.
    """
    if len(prompt) < 2:
        raise InputError(
            f"top_k_tokens: the prompt has {len(prompt)} tokens; it needs at least two tokens, "
            "each position being scored on the token that follows it"
        )
    top_probs, next_probs, next_ranks = (torch.as_tensor(v).detach().cpu() for v in (top_probs, next_probs, next_ranks))
    expected = (len(rows), len(prompt) - 1)
    values = {"top_strings": top_strings, "top_probs": top_probs, "next_probs": next_probs, "next_ranks": next_ranks}
    for name, value in values.items():
        if tuple(np.shape(value)[:2]) != expected:
            raise InputError(
                f"top_k_tokens: {name} has shape {tuple(np.shape(value))}, but {len(rows)} rows and a prompt "
                f"of {len(prompt)} tokens need [{expected[0]}, {expected[1]}, ...]"
            )
    if row_notes is not None and len(row_notes) != len(rows):
        raise InputError(f"top_k_tokens: {len(row_notes)} row notes for {len(rows)} rows")
    lines = []
    for i, label in enumerate(rows):
        note = "" if row_notes is None else f"<br><small>{html.escape(row_notes[i])}</small>"
        props = {
            "prompt": _escaped(prompt),
            "topKLogProbs": _log(top_probs[i]),
            "topKTokens": [_escaped(strings) for strings in top_strings[i]],
            "correctTokenRank": next_ranks[i],
            "correctTokenLogProb": _log(next_probs[i]),
        }
        lines.append(
            f'<tr><th style="{LABEL_STYLE}">{html.escape(label)}{note}</th>'
            f"<td>{rendered('TokenLogProbs', props)}</td></tr>"
        )
    # TokenLogProbs pads itself by 350 px for its hover box; one padding under the last row is enough.
    style = "<style>.lenskit-lens-topk [id^=lenskit-cv-] > div { padding-bottom: 0 !important; }</style>"
    heading = f'<h4 style="margin:4px 0">{html.escape(title)}</h4>' if title else ""
    fragment = (
        f'<div class="lenskit-lens-topk" style="padding-bottom:360px">{style}{heading}'
        f'<table style="border-collapse:collapse">{"".join(lines)}</table></div>'
    )
    return Figure(fragment, title, scripts=(bundle_script(),))


def _escaped(strings: Sequence[str]) -> list[str]:
    return [html.escape(str(s), quote=False) for s in strings]


def _log(probs: Tensor) -> Tensor:
    return probs.float().clamp_min(LOG_PROB_FLOOR).log()
