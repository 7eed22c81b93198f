"""A labelled heatmap as a plain HTML table: patching grids, attributions, the logit lens.

Cells are coloured in Python (no plotting library, no JavaScript): a diverging blue-white-red scale
centred on zero when the values have both signs, white-to-blue otherwise. Each cell shows its text
(the value by default, or e.g. the lens' top token) and carries the exact value as a tooltip.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from torch import Tensor

from lenskit.errors import InputError
from lenskit.viz.figure import Figure

BLUE = (33, 102, 172)
RED = (178, 24, 43)
WHITE = (255, 255, 255)


def _mix(colour: tuple[int, int, int], amount: float) -> str:
    """`colour` blended with white: amount 0 gives white, 1 gives the colour."""
    r, g, b = (round(w + (c - w) * amount) for c, w in zip(colour, WHITE))
    return f"rgb({r},{g},{b})"


def cell_colours(values: Tensor, limit: float | None = None) -> list[list[str]]:
    """CSS colours for a [rows, cols] tensor: diverging around 0 if it has negative values, else sequential.

    limit: the absolute value that gets the full colour (default: the largest |value|).
    """
    values = values.detach().float().cpu()
    finite = values[values.isfinite()]
    limit = limit or (finite.abs().max().item() if finite.numel() else 1.0) or 1.0
    diverging = bool((finite < 0).any())
    colours = []
    for row in values.tolist():
        line = []
        for v in row:
            amount = min(abs(v) / limit, 1.0) if v == v else 0.0  # NaN stays white
            line.append(_mix(RED if (diverging and v > 0) else BLUE, amount))
        colours.append(line)
    return colours


def heatmap(
    values: Tensor,
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    text: Sequence[Sequence[str]] | None = None,
    title: str = "",
    row_title: str = "",
    col_title: str = "",
    limit: float | None = None,
    number_format: str = ".2f",
) -> Figure:
    """A heatmap of `values` [rows, cols] with row and column labels.

    text: what each cell shows (default: the value in `number_format`), e.g. the lens' top tokens.
    limit: the |value| that gets the full colour (default: the largest |value|).
    """
    values = values.detach().float().cpu()
    if values.ndim != 2 or values.shape != (len(rows), len(cols)):
        raise InputError(
            f"heatmap: values of shape {tuple(values.shape)} for {len(rows)} row and {len(cols)} column labels"
        )
    colours = cell_colours(values, limit)
    text = text or [[format(v, number_format) for v in row] for row in values.tolist()]
    esc = html.escape
    header = "".join(f'<th style="padding:2px 4px;font-weight:normal">{esc(str(c))}</th>' for c in cols)
    body = []
    for i, row_label in enumerate(rows):
        cells = "".join(
            f'<td title="{esc(str(row_label))}, {esc(str(cols[j]))}: {values[i, j].item():.6g}" '
            f'style="background:{colours[i][j]};padding:2px 4px;text-align:center;white-space:pre">'
            f"{esc(str(text[i][j]))}</td>"
            for j in range(len(cols))
        )
        body.append(
            f'<tr><th style="padding:2px 4px;text-align:right;font-weight:normal">{esc(str(row_label))}</th>{cells}</tr>'
        )
    caption = f'<caption style="font-weight:bold;padding:4px">{esc(title)}</caption>' if title else ""
    corner = f"{esc(row_title)} \\ {esc(col_title)}" if (row_title or col_title) else ""
    table = (
        f'<table class="lenskit-heatmap" style="border-collapse:collapse;font:12px monospace">{caption}'
        f'<tr><th style="padding:2px 4px;font-weight:normal;color:#666">{corner}</th>{header}</tr>{"".join(body)}</table>'
    )
    return Figure(table, title)
