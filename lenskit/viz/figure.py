"""`Figure`: an HTML fragment that shows itself in a notebook and saves as a standalone page."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Figure:
    """A self-contained HTML fragment (inline styles only, nothing fetched at view time)."""

    html: str
    title: str = ""

    def _repr_html_(self) -> str:
        return self.html

    def page(self) -> str:
        """The fragment wrapped in a complete HTML document."""
        return (
            f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
            f"</head><body>{self.html}</body></html>"
        )

    def save(self, path: str | Path) -> Path:
        """Write the standalone page to `path` and return it."""
        path = Path(path)
        path.write_text(self.page(), encoding="utf-8")
        return path
