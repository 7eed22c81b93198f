"""`Figure`: an HTML fragment that shows itself in a notebook and saves as a standalone page.

A figure may need scripts that many figures share (the circuitsvis bundle, 1.3 MB): it names them
in `scripts`, and whatever puts figures on a page sends each shared script once, inline:

- `page(figures)` / `save_page(figures, path)`: one offline HTML document, each script once in its head.
- `Figure._repr_html_` (notebooks): a script goes out with the first figure of the Python session
  that needs it, later figures use what that output defined (a browser global). Where outputs do
  not share one browser window (Google Colab runs each output in its own frame) every figure
  carries its scripts. `forget_sent_scripts()` makes the next figure send them again, e.g. after
  the output that carried them was cleared or the page reloaded without it.
"""

from __future__ import annotations

import html
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_sent_to_notebook: set[str] = set()  # shared scripts already sent to this session's notebook


_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def safe_in_script(text: str) -> str:
    """JSON or a JavaScript literal made safe to place inside ``<script>``: ``<``, ``>``, ``&``, U+2028 and
    U+2029 become ``\\uXXXX`` escapes (the same value once parsed), so no string in it can end the element
    (``</script>``), open a comment (``<!--``) or break a line of the script."""
    for char, escape in _SCRIPT_ESCAPES.items():
        text = text.replace(char, escape)
    return text


@dataclass
class Figure:
    """A self-contained HTML fragment: inline styles, inline scripts, nothing fetched at view time.

    html: the fragment itself.
    scripts: complete ``<script>`` elements the fragment needs on its page before it (shared by
        figures, sent once per page).
    """

    html: str
    title: str = ""
    scripts: tuple[str, ...] = field(default=(), repr=False)

    def _repr_html_(self) -> str:
        if "google.colab" in sys.modules:
            return "".join(self.scripts) + self.html
        unsent = [script for script in self.scripts if script not in _sent_to_notebook]
        _sent_to_notebook.update(unsent)
        return "".join(unsent) + self.html

    def page(self) -> str:
        """The figure alone as a complete offline HTML document."""
        return page([self], self.title)

    def save(self, path: str | Path) -> Path:
        """Write the standalone page to `path` and return it."""
        return save_page([self], path, self.title)


class Pictured:
    """The result protocol's page: a result that draws itself with ``plot(**options)`` saves that picture
    with ``save_html(path, **options)`` (a standalone page that works offline; returns the path)."""

    def save_html(self, path: str | Path, **options) -> Path:
        return self.plot(**options).save(path)


def forget_sent_scripts() -> None:
    """Make the next notebook figure carry its shared scripts again (see the module docstring)."""
    _sent_to_notebook.clear()


def page(figures: Sequence[Figure], title: str = "lenskit") -> str:
    """One complete HTML document holding `figures` in order, each shared script inlined once."""
    scripts = "".join(dict.fromkeys(script for figure in figures for script in figure.scripts))
    body = "".join(f'<section style="margin:12px 0">{figure.html}</section>' for figure in figures)
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"{scripts}</head><body>{body}</body></html>"
    )


def save_page(figures: Sequence[Figure], path: str | Path, title: str = "lenskit") -> Path:
    """Write `page(figures, title)` to `path` and return it."""
    path = Path(path)
    path.write_text(page(figures, title), encoding="utf-8")
    return path
