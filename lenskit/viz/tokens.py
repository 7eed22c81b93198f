"""Token-level pictures (circuitsvis, offline): tokens coloured by a value, and the lens' top-k per position.

circuitsvis writes token strings into the page as HTML, so they are HTML-escaped here: a token "<b>"
shows as "<b>" (not as markup), though the hover box of a coloured token spells it "&lt;b&gt;".
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from lenskit.tokens import as_tokens
from lenskit.viz.circuits import bundle_script, circuitsvis_figure, rendered
from lenskit.viz.figure import Figure

LOG_PROB_FLOOR = torch.finfo(torch.float32).tiny  # probabilities that underflowed read as log(tiny) = -87.3
LABEL_STYLE = "text-align:right;padding:2px 8px;white-space:nowrap;font:12px monospace"


def colored_tokens(
    tokens: Sequence[str],
    values: Float[Tensor, "pos"] | Sequence[float],
    title: str = "",
    min_value: float | None = None,
    max_value: float | None = None,
) -> Figure:
    """`tokens` coloured by one value each (negative red, positive blue); hover shows the value.

    min_value, max_value: the values that get the full colour (default: the smallest and largest).
    """
    values = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
    if values.shape != (len(tokens),):
        raise ValueError(f"colored_tokens: {len(tokens)} tokens but values of shape {tuple(values.shape)}; "
                         "give one value per token")
    if not values.isfinite().all():
        raise ValueError(f"colored_tokens: values must be finite, got {values.tolist()}")
    return circuitsvis_figure(
        "ColoredTokens",
        {"tokens": _escaped(tokens), "values": values, "minValue": min_value, "maxValue": max_value},
        title,
    )


def lens_topk(
    model: HookedTransformer,
    tokens: str | Sequence[str] | Int[Tensor, "batch pos"] | Int[Tensor, "pos"],
    k: int = 10,
    layers: int | Sequence[int] | None = None,
    batch: int = 0,
    title: str = "logit lens: top tokens per position",
    progress: bool = True,
) -> Figure:
    """The logit lens' top-k next tokens at every position, one row per layer (circuitsvis TokenLogProbs).

    Each row shows the input tokens from the second on, coloured by the probability the lens gives
    them at that layer; hovering a token shows the lens' top-k guesses for it (probability, log
    probability) and its rank. Layers are `lenskit.logit_lens` layers: l in 0..L-1 reads
    ``blocks.{l}.hook_resid_pre``, L the final residual stream.

    progress: show `logit_lens`' progress bar over layers.
    """
    from lenskit.lens import logit_lens  # lenskit.lens draws with lenskit.viz: imported here, not at the top

    tokens = as_tokens(model, tokens)
    if not -len(tokens) <= batch < len(tokens):
        raise ValueError(f"batch {batch} out of range: the tokens have {len(tokens)} batch rows (0..{len(tokens) - 1})")
    row = tokens[batch][None]
    if row.shape[1] < 2:
        raise ValueError("lens_topk needs at least two tokens: each position is scored on the token that follows it")
    following, which = row[0, 1:].cpu().unique(return_inverse=True)
    lens = logit_lens(model, row, targets=following, top_k=k, layers=layers, progress=progress)
    positions = torch.arange(row.shape[1] - 1)
    rows = []
    for i, name in enumerate(lens.layer_names):
        props = {
            "prompt": _escaped(lens.input_strings[0]),
            "topKLogProbs": _log(lens.top_probs[i, 0, :-1]),
            "topKTokens": [_escaped(strings) for strings in lens.top_strings[i, 0, :-1]],
            "correctTokenRank": lens.target_ranks[i, 0, positions, which],
            "correctTokenLogProb": _log(lens.target_probs[i, 0, positions, which]),
        }
        rows.append(f'<tr><th style="{LABEL_STYLE}">layer {lens.layers[i]}<br><small>{name}</small></th>'
                    f"<td>{rendered('TokenLogProbs', props)}</td></tr>")
    # TokenLogProbs pads itself by 350 px for its hover box; one padding under the last row is enough.
    style = "<style>.lenskit-lens-topk [id^=lenskit-cv-] > div { padding-bottom: 0 !important; }</style>"
    heading = f'<h4 style="margin:4px 0">{html.escape(title)}</h4>' if title else ""
    fragment = (f'<div class="lenskit-lens-topk" style="padding-bottom:360px">{style}{heading}'
                f'<table style="border-collapse:collapse">{"".join(rows)}</table></div>')
    return Figure(fragment, title, scripts=(bundle_script(),))


def _escaped(strings: Sequence[str]) -> list[str]:
    return [html.escape(str(s), quote=False) for s in strings]


def _log(probs: Tensor) -> Tensor:
    return probs.float().clamp_min(LOG_PROB_FLOOR).log()
