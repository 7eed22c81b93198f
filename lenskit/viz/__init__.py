"""Pictures of lenskit results, as self-contained HTML that renders offline (nothing fetched at view time).

    >>> fig = heatmap(torch.randn(3, 4), rows=["L0", "L1", "L2"], cols=["a", "b", "c", "d"])
    >>> attn = attention_patterns(model, "When Mary and John went to the store", layer=1)
    >>> fig            # shows in a notebook
    >>> save_page([fig, attn, lens_topk(model, "Once upon a time")], "report.html")

Heatmaps are plain HTML tables; `route_graph` draws information-flow graphs (`lenskit.flow`) as
inline SVG. The circuitsvis pictures (attention patterns, coloured tokens, the lens' top-k tokens)
use the script bundle that ships inside the circuitsvis package: a page inlines it once, a
notebook session receives it with the first such figure (see `figure`).
"""

from lenskit.viz.attention import attention_patterns
from lenskit.viz.figure import Figure, forget_sent_scripts, page, save_page
from lenskit.viz.graph import route_graph
from lenskit.viz.heatmap import heatmap
from lenskit.viz.tokens import colored_tokens, lens_topk

__all__ = ["Figure", "heatmap", "attention_patterns", "colored_tokens", "lens_topk", "route_graph", "page",
           "save_page", "forget_sent_scripts"]
