"""Information-flow routes (Ferrando & Voita 2024): the LM Transparency Tool's graph, exact and fast.

graph = flow(model, "When Mary and John went to the store, John gave a drink to")
graph.edges, graph.nodes                 # tidy DataFrames of the routes into the last token
graph.heads_for(edge), graph.top_neurons(layer, pos), graph.top_tokens(layer, pos)
graph.show()                             # interactive, offline picture

proximity.py   the contribution measure (proximity shares), dense and for attention's parts
shares.py      the forward pass (a lenskit.Run) and each block's update split into weighed parts
graph.py       flow(), FlowGraph: threshold, pruning, tidy views, the page
"""

from lenskit.flow.graph import FlowGraph, flow
from lenskit.flow.proximity import head_source_proximity, proximity
from lenskit.flow.shares import Decomposition, Routes

__all__ = ["flow", "FlowGraph", "Decomposition", "Routes", "proximity", "head_source_proximity"]
