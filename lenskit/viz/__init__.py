"""Pictures of lenskit results, as self-contained HTML that renders offline (nothing fetched at view time).

    >>> fig = heatmap(torch.randn(3, 4), rows=["L0", "L1", "L2"], cols=["a", "b", "c", "d"])
    >>> attn = attention_patterns(pattern, ["<bos>", "When", " Mary"], head_names=["L1H0", "L1H1"])
    >>> fig            # shows in a notebook
    >>> save_page([fig, attn, colored_tokens(["a", " b"], [0.5, -1.0])], "report.html")

viz draws numbers and strings it is given: it never runs a model nor imports an analysis. The
analyses' results draw themselves with it (``logit_lens(...).plot()`` / ``.plot_topk()``,
``Run(model, tokens).attention_patterns(layer)``, ``flow(...).plot()``).

Heatmaps are plain HTML tables; `route_graph` draws information-flow graphs (`lenskit.flow`) as
inline SVG. The circuitsvis pictures (attention patterns, coloured tokens, top-k next tokens)
use the script bundle that ships inside the circuitsvis package: a page inlines it once, a
notebook session receives it with the first such figure (see `figure`).
"""

from lenskit.viz.attention import attention_patterns
from lenskit.viz.figure import Figure, Pictured, forget_sent_scripts, page, save_page
from lenskit.viz.graph import route_graph
from lenskit.viz.heatmap import heatmap
from lenskit.viz.tokens import colored_tokens, top_k_tokens

__all__ = [
    "Figure",
    "Pictured",
    "heatmap",
    "attention_patterns",
    "colored_tokens",
    "top_k_tokens",
    "route_graph",
    "page",
    "save_page",
    "forget_sent_scripts",
]
