"""A layered graph over tokens, as one self-contained interactive HTML fragment (inline SVG and script).

Nodes sit on a grid, one column per token and one row per layer of nodes (inputs at the bottom).
A selector picks the traced column: the script shows what the top node of that column reaches,
going down the edges, with node sizes following the share of the traced node that flows
through them. Clicking an edge or a node shows its details. Nothing is fetched at view time.

    route_graph(tokens, rows, edges, node_details, targets=[3, 4], selected=4).save("routes.html")

Used by `lenskit.flow`'s `FlowGraph.plot`.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Mapping, Sequence

from lenskit.errors import InputError
from lenskit.viz.figure import Figure, safe_in_script

EDGE_COLOURS = {"attention": (33, 102, 172), "mlp": (214, 96, 77), "residual": (120, 120, 120)}

_SCRIPT = r"""
(function () {
  var root = document.getElementById("%(uid)s");
  var data = JSON.parse(root.querySelector("script.lenskit-data").textContent);
  var tokens = data.tokens, rows = data.rows, edges = data.edges;
  var colW = 58, rowH = 46, left = 110, top = 16, bottom = 70;
  var width = left + colW * tokens.length + 20, height = top + rowH * (rows.length - 1) + bottom;
  function x(pos) { return left + colW * pos + colW / 2; }
  function y(row) { return top + rowH * (rows.length - 1 - row); }
  function esc(text) {
    return String(text).replace(/[&<>"]/g, function (c) { return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]; });
  }
  function colour(kind, weight) {
    var base = data.colours[kind] || [0, 0, 0], amount = 0.3 + 0.7 * Math.min(1, weight);
    return "rgb(" + base.map(function (c) { return Math.round(255 + (c - 255) * amount); }).join(",") + ")";
  }
  function path(e) {
    var x1 = x(e.source[1]), y1 = y(e.source[0]), x2 = x(e.target[1]), y2 = y(e.target[0]);
    if (e.kind === "mlp") { return "M" + x1 + " " + y1 + " Q" + (x1 + colW * 0.45) + " " + (y1 + y2) / 2 + " " + x2 + " " + y2; }
    return "M" + x1 + " " + y1 + " L" + x2 + " " + y2;
  }
  var incoming = {}, nodes = {};
  edges.forEach(function (e, k) {
    var key = e.target.join(",");
    (incoming[key] = incoming[key] || []).push(k);
    nodes[key] = e.target; nodes[e.source.join(",")] = e.source;
  });
  data.targets.forEach(function (pos) { nodes[(rows.length - 1) + "," + pos] = [rows.length - 1, pos]; });

  var svg = ['<svg width="' + width + '" height="' + height + '" style="background:#fff">'];
  rows.forEach(function (label, r) {
    svg.push('<text x="' + (left - 8) + '" y="' + (y(r) + 4) + '" text-anchor="end" fill="#555">' + esc(label) + "</text>");
  });
  tokens.forEach(function (token, p) {
    svg.push('<text transform="translate(' + x(p) + "," + (y(0) + 14) + ') rotate(35)" fill="#222">' + esc(p + ": " + token) + "</text>");
  });
  edges.forEach(function (e, k) {
    svg.push('<path data-edge="' + k + '" d="' + path(e) + '" fill="none" stroke="' + colour(e.kind, e.weight) +
             '" stroke-width="' + (0.8 + 5 * e.weight).toFixed(2) + '" style="cursor:pointer"><title>' +
             esc(e.title + ": " + e.weight) + "</title></path>");
  });
  Object.keys(nodes).forEach(function (key) {
    var n = nodes[key];
    svg.push('<circle data-node="' + key + '" cx="' + x(n[1]) + '" cy="' + y(n[0]) + '" r="4" fill="#333" style="cursor:pointer"></circle>');
  });
  svg.push("</svg>");
  root.querySelector(".lenskit-canvas").innerHTML = svg.join("");

  var select = root.querySelector("select"), info = root.querySelector(".lenskit-info");
  select.innerHTML = data.targets.map(function (pos) {
    return '<option value="' + pos + '">' + pos + ": " + esc(tokens[pos]) + "</option>";
  }).join("");
  select.value = String(data.selected);
  var flow = {};

  function trace(pos) {
    flow = {}; flow[(rows.length - 1) + "," + pos] = 1;
    var shown = {};
    for (var r = rows.length - 1; r > 0; r--) {
      for (var p = 0; p < tokens.length; p++) {
        var key = r + "," + p, f = flow[key];
        if (!f) { continue; }
        (incoming[key] || []).forEach(function (k) {
          var source = edges[k].source.join(",");
          shown[k] = true;
          flow[source] = (flow[source] || 0) + f * edges[k].weight;
        });
      }
    }
    root.querySelectorAll("path[data-edge]").forEach(function (el) {
      el.style.display = shown[el.getAttribute("data-edge")] ? "" : "none";
    });
    root.querySelectorAll("circle[data-node]").forEach(function (el) {
      var f = flow[el.getAttribute("data-node")];
      el.style.display = f ? "" : "none";
      el.setAttribute("r", (2.5 + 6 * Math.sqrt(f || 0)).toFixed(2));
    });
    info.innerHTML = "Tracing position " + pos + " (" + esc(tokens[pos]) + "). Click an edge or a node.";
  }

  function table(pairs, header) {
    if (!pairs || !pairs.length) { return ""; }
    return "<table><tr><th>" + header[0] + "</th><th>" + header[1] + "</th></tr>" + pairs.map(function (pair) {
      return "<tr><td>" + esc(pair[0]) + "</td><td>" + esc(pair[1]) + "</td></tr>";
    }).join("") + "</table>";
  }

  root.querySelector(".lenskit-canvas").addEventListener("click", function (event) {
    var el = event.target;
    if (el.hasAttribute("data-edge")) {
      var e = edges[+el.getAttribute("data-edge")];
      info.innerHTML = "<b>" + esc(e.title) + "</b><br>" + esc(rows[e.source[0]]) + " @ " + e.source[1] + " " + esc(tokens[e.source[1]]) +
        " &rarr; " + esc(rows[e.target[0]]) + " @ " + e.target[1] + " " + esc(tokens[e.target[1]]) +
        "<br>weight " + e.weight + table(e.details, ["part", "weight"]);
    } else if (el.hasAttribute("data-node")) {
      var key = el.getAttribute("data-node"), n = nodes[key];
      info.innerHTML = "<b>" + esc(rows[n[0]]) + " @ " + n[1] + " " + esc(tokens[n[1]]) + "</b><br>flow " +
        (flow[key] || 0).toFixed(4) + table(data.node_details[key], ["top token", "logit"]);
    }
  });
  select.addEventListener("change", function () { trace(+select.value); });
  trace(data.selected);
  root.setAttribute("data-ready", "1");
})();
"""


def route_graph(
    tokens: Sequence[str],
    rows: Sequence[str],
    edges: Sequence[Mapping],
    node_details: Mapping[tuple[int, int], Sequence[tuple[str, float]]] | None = None,
    targets: Sequence[int] | None = None,
    selected: int | None = None,
    title: str = "",
) -> Figure:
    """An interactive graph over a rows x tokens grid.

    Args:
        tokens: column labels (one per position).
        rows: row labels, from the bottom row (inputs) to the top row (outputs).
        edges: each a mapping with source and target (row, position) pairs, kind ("attention",
            "mlp", "residual": the colour), weight in [0, 1] (width and colour intensity),
            title, and details: (label, value) pairs listed when the edge is clicked.
        node_details: {(row, position): (label, value) pairs} listed when the node is clicked.
        targets: the positions the selector offers (default: all); selected: the first shown.
    """
    targets = list(range(len(tokens))) if targets is None else list(targets)
    if not targets:
        raise InputError("route_graph: no target positions to offer")
    selected = targets[-1] if selected is None else selected
    if selected not in targets:
        raise InputError(f"route_graph: selected position {selected} is not among the targets {targets}")
    for edge in edges:
        for end in ("source", "target"):
            row, pos = edge[end]
            if not (0 <= row < len(rows) and 0 <= pos < len(tokens)):
                raise InputError(
                    f"route_graph: edge {end} {(row, pos)} is outside the {len(rows)} x {len(tokens)} grid"
                )
    data = {
        "tokens": list(tokens),
        "rows": list(rows),
        "targets": targets,
        "selected": selected,
        "colours": EDGE_COLOURS,
        "edges": [
            {
                "source": list(e["source"]),
                "target": list(e["target"]),
                "kind": e["kind"],
                "weight": float(e["weight"]),
                "title": e.get("title", e["kind"]),
                "details": [list(d) for d in e.get("details", ())],
            }
            for e in edges
        ],
        "node_details": {f"{r},{p}": [list(d) for d in details] for (r, p), details in (node_details or {}).items()},
    }
    payload = safe_in_script(json.dumps(data))
    uid = "lenskit-routes-" + hashlib.sha1(payload.encode()).hexdigest()[:12]
    fragment = (
        f'<div class="lenskit-routes" id="{uid}" style="font:12px sans-serif">'
        f'<div style="padding:4px"><b>{html.escape(title)}</b> &nbsp; traced position <select></select></div>'
        '<div style="display:flex;align-items:flex-start">'
        '<div class="lenskit-canvas" style="overflow:auto;max-width:75%;max-height:85vh;border:1px solid #ddd"></div>'
        '<div class="lenskit-info" style="padding:6px 10px;min-width:220px"></div></div>'
        f'<script type="application/json" class="lenskit-data">{payload}</script>'
        f"<script>{_SCRIPT % {'uid': uid}}</script></div>"
    )
    return Figure(fragment, title)
