"""`Reproduction`: what an experiment hands back — a table in the original experiment's terms, and pictures."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import pandas as pd

from lenskit import backend
from lenskit.backend import Model
from lenskit.models import load
from lenskit.viz import Figure


@dataclass
class Reproduction:
    """The main `table` (its numbers: `rows`), pictures, notes, and any further named `tables`."""

    title: str
    table: pd.DataFrame
    figures: list[Figure] = field(default_factory=list)
    notes: str = ""
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    numbers: dict = field(default_factory=dict)
    """Named results beyond the tables, JSON-ready (e.g. ioi's "name_movers": [[layer, head], ...])."""

    @property
    def rows(self) -> list[dict]:
        """The main table as JSON-ready records (NaN and missing values as None)."""
        return _records(self.table)

    def to_dict(self) -> dict:
        """title, rows, notes, each further table's records and the named `numbers`: JSON-ready values."""
        return {
            "title": self.title,
            "rows": self.rows,
            "notes": self.notes,
            "tables": {
                name: _records(table.reset_index() if table.index.name else table)
                for name, table in self.tables.items()
            },
            **self.numbers,
        }

    def __str__(self) -> str:
        text = f"{self.title}\n\n{self.table.to_string(index=False, max_colwidth=100)}"
        for name, table in self.tables.items():  # long ones cut in the middle: `tables` and `to_dict` hold all
            text += f"\n\n{name}\n{table.to_string(index=table.index.name is not None, max_colwidth=100, max_rows=40)}"
        return f"{text}\n\n{self.notes}" if self.notes else text

    def _repr_html_(self) -> str:
        esc = html.escape
        notes = f"<p>{esc(self.notes)}</p>" if self.notes else ""
        more = "".join(
            f"<h4>{esc(name)}</h4>{table.to_html(index=table.index.name is not None)}"
            for name, table in self.tables.items()
        )
        return f"<h3>{esc(self.title)}</h3>{self.table.to_html(index=False)}{notes}{more}" + "".join(
            f._repr_html_() for f in self.figures
        )


def _records(table: pd.DataFrame) -> list[dict]:
    """Rows as dicts of plain Python values: numpy scalars unwrapped, NaN / NA as None, tuples as lists."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if hasattr(value, "item"):
            value = value.item()
        try:
            if pd.isna(value):
                return None
        except (TypeError, ValueError):
            pass
        return value

    return [{str(key): plain(value) for key, value in row.items()} for row in table.to_dict("records")]


def model_label(model: Model, name: str | None = None) -> str:
    """What to call the model in a report: the name it was loaded by, else its TransformerLens name (unless
    that is a content hash, as for GGUF files), else its architecture."""
    if name:
        return name
    given = model.cfg.model_name or ""
    if given and not (len(given) == 64 and all(c in "0123456789abcdef" for c in given)):
        return given
    return f"a {backend.architecture(model.cfg) or 'transformer'} model"


def resolve_model(model: Model | str | None, default: str) -> Model:
    """`model` itself, or loaded by name (`default` when None)."""
    return model if isinstance(model, Model) else load(model or default)
