"""Information-flow routes (Ferrando & Voita 2024): the LM Transparency Tool's graph, exact and fast.

    graph = flow(model, "When Mary and John went to the store, John gave a drink to")
    graph.edges, graph.nodes                 # tidy DataFrames of the routes into the last token
    graph.heads_for(edge), graph.top_neurons(layer, pos), graph.top_tokens(layer, pos)
    graph.show()                             # interactive, offline picture

    proximity.py   the contribution measure (proximity shares), dense and for attention's parts
    routes.py      flow(), FlowGraph: the forward pass, the shares, threshold, pruning, views
"""

from lenskit.flow.proximity import head_source_proximity, proximity, shares
from lenskit.flow.routes import Decomposition, FlowGraph, Routes, flow

__all__ = ["flow", "FlowGraph", "Decomposition", "Routes", "proximity", "head_source_proximity", "shares"]
