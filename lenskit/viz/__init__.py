"""Pictures of lenskit results, as self-contained HTML that renders offline (no script, no CDN).

    >>> fig = heatmap(torch.randn(3, 4), rows=["L0", "L1", "L2"], cols=["a", "b", "c", "d"])
    >>> fig            # shows in a notebook
    >>> fig.save("grid.html")
"""

from lenskit.viz.figure import Figure
from lenskit.viz.heatmap import heatmap

__all__ = ["Figure", "heatmap"]
