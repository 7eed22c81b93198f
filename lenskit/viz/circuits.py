"""circuitsvis components as offline `Figure`s: the bundle the circuitsvis package ships, inlined.

circuitsvis' own HTML either imports its script from a CDN (``str()``) or inlines the whole 1.3 MB
bundle into every figure (notebooks, after probing the internet). Here the bundle is one shared
classic ``<script>`` (it defines the global ``CircuitsVis``) that `lenskit.viz.page` inlines once
per page, and each figure is a ``<div>`` plus a short script that renders a component into it.
"""

from __future__ import annotations

import functools
import html
import json
import re
import uuid
from pathlib import Path

import circuitsvis
from circuitsvis.utils.convert_props import PythonProperty, convert_props

from lenskit.viz.figure import Figure, safe_in_script

BUNDLE_PATH = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
NOT_LOADED = "circuitsvis did not load here: run lenskit.viz.forget_sent_scripts() and show the figure again"


@functools.cache
def bundle_script() -> str:
    """The circuitsvis bundle as one inline ``<script>`` element (without its source-map reference)."""
    source = BUNDLE_PATH.read_text(encoding="utf-8")
    source = re.sub(r"//# sourceMappingURL=\S*\s*$", "", source)
    # "</script" may only close the element; in the bundle it sits in string literals, where "<\/" reads as "</".
    source = re.sub(r"</(script)", r"<\\/\1", source, flags=re.IGNORECASE)
    return f"<script>{source}</script>"


def circuitsvis_figure(component: str, props: dict[str, PythonProperty], title: str = "") -> Figure:
    """A `Figure` that renders ``CircuitsVis.<component>`` with `props` (tensors become nested lists)."""
    heading = f'<h4 style="margin:4px 0">{html.escape(title)}</h4>' if title else ""
    return Figure(
        f'<div class="lenskit-circuitsvis">{heading}{rendered(component, props)}</div>',
        title,
        scripts=(bundle_script(),),
    )


def rendered(component: str, props: dict[str, PythonProperty]) -> str:
    """An empty ``<div>`` and the script that renders the component into it once the bundle has loaded.

    Where the bundle did not load (see `lenskit.viz.figure`), the ``<div>`` says so instead.
    """
    div_id = json.dumps(f"lenskit-cv-{uuid.uuid4().hex[:12]}")
    return (
        f"<div id={div_id}></div><script>(function () {{"
        f"if (window.CircuitsVis) CircuitsVis.render({div_id}, CircuitsVis.{component}, {script_json(props)});"
        f" else document.getElementById({div_id}).textContent = {json.dumps(NOT_LOADED)};"
        "})();</script>"
    )


def script_json(props: dict[str, PythonProperty]) -> str:
    """`props` as a JavaScript object literal that is safe inside ``<script>`` (see `safe_in_script`)."""
    return safe_in_script(convert_props(props))
