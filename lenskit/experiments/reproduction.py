"""`Reproduction`: what an experiment hands back — a table in the original experiment's terms, and pictures."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from transformer_lens import HookedTransformer

from lenskit.models import load
from lenskit.viz import Figure


@dataclass
class Reproduction:
    title: str
    table: pd.DataFrame
    figures: list[Figure] = field(default_factory=list)
    notes: str = ""

    def __str__(self) -> str:
        text = f"{self.title}\n\n{self.table.to_string(index=False)}"
        return f"{text}\n\n{self.notes}" if self.notes else text

    def _repr_html_(self) -> str:
        notes = f"<p>{self.notes}</p>" if self.notes else ""
        return f"<h3>{self.title}</h3>{self.table.to_html(index=False)}{notes}" + "".join(f._repr_html_() for f in self.figures)


def resolve_model(model: HookedTransformer | str | None, default: str) -> HookedTransformer:
    """`model` itself, or loaded by name (`default` when None)."""
    return model if isinstance(model, HookedTransformer) else load(model or default)
