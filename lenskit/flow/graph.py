"""`flow` and `FlowGraph`: the information-flow routes of one prompt (the LM Transparency Tool's graph).

The shares of every edge come from `lenskit.flow.shares` (one forward pass, each block's update
split into exact parts with their proximity shares); this module is the graph over them.

Nodes are residual streams at (layer, position): the embeddings (resid_pre of block 0), and
resid_mid and resid_post of each block. Edges run from the block's input stream to its attention
node (kind "attention", one per source position with the heads summed; kind "residual", the
position's own stream) and from resid_mid into resid_post (kinds "mlp" and "residual"). Edges
whose share is below `threshold` are dropped; with `renormalize`, the surviving shares into each
node, at each layer and position separately, are rescaled to sum to 1. The graph is then pruned
to what the target position's final residual stream reaches, down to the embeddings.

Where the LM Transparency Tool's code differs here: it thresholds each (head, source) part before
summing the heads, where lenskit thresholds edges; it merges a position's attention to itself with
its residual edge; and it reads batch index 0 only.

    graph = lenskit.flow(model, "When Mary and John went to the store, John gave a drink to")
    graph.edges                              # tidy DataFrame of the routes into the last token
    graph.heads_for(graph.edges.iloc[0])     # the heads behind an attention edge
    graph.top_neurons(layer=3, pos=-1)       # the neurons behind an MLP edge
    graph.top_tokens(layer=3, pos=-1)        # what a node, a block or a head output promotes
    graph.trace(5).show()                    # the routes into position 5, as a picture
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lenskit import backend, checks, sites, vocab
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.flow.proximity import proximity, shares
from lenskit.flow.shares import (
    EDGE_KINDS,
    Decomposition,
    NodeKind,
    Routes,
    attention_kind,
    check_index,
    check_supported,
    head_sources,
    node_rows,
    route_shares,
    row_activations,
    values,
)
from lenskit.labelled import LabelledTensor
from lenskit.readout import Readout
from lenskit.run import Run
from lenskit.tokens import Prompts, token_labels
from lenskit.viz.figure import Figure, Pictured
from lenskit.viz.graph import route_graph


def flow(
    model: Model,
    tokens: "Prompts | Run",
    threshold: float = 0.04,
    renormalize: bool = True,
    target_pos: int = -1,
    batch: int = 0,
    progress: bool = True,
) -> "FlowGraph":
    """The information-flow routes graph of one prompt, traced from the final stream at `target_pos`.

    Args:
        tokens: a prompt (a string, or token ids [pos]) or several (strings, or ids [batch, pos]),
            or a `lenskit.Run` (its cached activations are used, what it lacks is computed on the
            whole run and kept); `batch` picks the prompt to trace (given tokens, only that row is run).
        threshold: edges whose share is below it are dropped (0 keeps every edge with a share).
            A node whose parts all have proximity 0 (a zero stream) has all shares 0: no edge in.
        renormalize: rescale the surviving shares into each node to sum to 1.
        target_pos: the position whose final residual stream the graph is traced from
            (`FlowGraph.trace` re-traces from another position at no cost).
    """
    check_supported(model)
    check_threshold(threshold)
    row, activations = row_activations(model, tokens, batch)
    head_shares, routes = route_shares(model, activations, len(row), progress)
    return FlowGraph(model, row, activations, head_shares, routes, threshold, renormalize, target_pos)


@dataclass(eq=False)
class FlowGraph(Pictured):
    """The routes graph of one prompt: shares of every edge, thresholded, traced from `target_pos`.

    `nodes` and `edges` are the part of the graph the target's final stream reaches; `trace(pos)`,
    or ``dataclasses.replace(graph, threshold=..., renormalize=...)``, gives another view of the
    same shares without running the model again.
    """

    model: Model
    tokens: Int[Tensor, " pos"]
    activations: dict[str, Tensor]  # hook name -> activation of the traced prompt [pos, ...]
    head_shares: Float[Tensor, "layer pos src_pos head"]  # share of each head's part, before threshold
    routes: Routes
    threshold: float = 0.04
    renormalize: bool = True
    target_pos: int = -1

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        self.target_pos = check_index("target_pos", self.target_pos, self.n_pos)

    # --- layout ---------------------------------------------------------------------------

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @cached_property
    def str_tokens(self) -> list[str]:
        return token_labels(self.model, self.tokens)

    @cached_property
    def rows(self) -> list[tuple[NodeKind, int]]:
        """(kind, layer) of each row of nodes, from the embeddings up to the final stream."""
        return node_rows(self.model.cfg)

    def row(self, kind: NodeKind, layer: int) -> int:
        """The row of a node kind at a layer (resid_pre of layer l > 0 is resid_post of l - 1)."""
        if kind == "resid_pre" and layer > 0:
            kind, layer = "resid_post", layer - 1
        if (kind, layer) not in self.rows:
            have = sorted({k for k, _ in self.rows})
            why = " (attention and MLP run in parallel, or there is no MLP)" if kind == "resid_mid" else ""
            raise InputError(f"no {kind} node at layer {layer}{why}; node kinds here: {have}")
        return self.rows.index((kind, layer))

    # --- threshold, renormalisation, pruning --------------------------------------------

    @cached_property
    def _scale(self) -> Float[Tensor, " node"]:
        """Per target node: the factor its surviving shares are multiplied by (0: nothing survives)."""
        n_nodes = len(self.rows) * self.n_pos
        if not self.renormalize:
            return torch.ones(n_nodes)
        kept = self._kept
        total = torch.zeros(n_nodes).index_add_(0, self.routes.target[kept], self.routes.share[kept])
        return torch.where(total > 0, 1 / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)

    @cached_property
    def _kept(self) -> Tensor:
        return self.routes.share >= self.threshold  # routes hold non-zero shares only

    @cached_property
    def weights(self) -> Float[Tensor, " edge"]:
        """Weight of every edge of `routes` after threshold and renormalisation (0 if dropped)."""
        return torch.where(self._kept, self.routes.share * self._scale[self.routes.target], 0.0)

    @cached_property
    def _traced(self) -> tuple[Tensor, Tensor]:
        """(reached [node] bool, flow [node]): the nodes the target reaches, and the share of the
        target that flows through each (the product of edge weights, summed over paths)."""
        n_nodes = len(self.rows) * self.n_pos
        reached = torch.zeros(n_nodes, dtype=torch.bool)
        carried = torch.zeros(n_nodes)
        top = n_nodes - self.n_pos + self.target_pos
        reached[top], carried[top] = True, 1.0
        source, target, weight = self.routes.source, self.routes.target, self.weights
        _, counts = torch.unique_consecutive(target // self.n_pos, return_counts=True)  # edges by target row
        ends = counts.cumsum(0).tolist()
        for end, count in zip(reversed(ends), reversed(counts.tolist())):
            span = slice(end - count, end)
            live = (weight[span] > 0) & reached[target[span]]
            src, tgt = source[span][live], target[span][live]
            reached[src] = True
            carried.index_add_(0, src, carried[tgt] * weight[span][live])
        return reached, carried

    def trace(self, target_pos: int) -> "FlowGraph":
        """The same graph traced from another position's final stream (no model run)."""
        return replace(self, target_pos=target_pos)

    # --- tidy views -----------------------------------------------------------------------

    @property
    def nodes(self) -> pd.DataFrame:
        """Nodes the target reaches: layer, position, token, kind, hook, weight.

        weight is the share of the target's final stream that flows through the node (the
        products of edge weights along the paths, summed); with `renormalize` and no dead end,
        the embeddings' weights sum to 1.
        """
        reached, carried = self._traced
        ids = reached.nonzero().squeeze(1)
        kinds, layers = zip(*(self.rows[i] for i in (ids // self.n_pos).tolist()))
        positions = (ids % self.n_pos).tolist()
        return pd.DataFrame(
            {
                "layer": list(layers),
                "position": positions,
                "token": [self.str_tokens[p] for p in positions],
                "kind": list(kinds),
                "hook": [sites.act_name(k, l) for k, l in zip(kinds, layers)],
                "weight": carried[ids].numpy(),
            }
        )

    @property
    def edges(self) -> pd.DataFrame:
        """Edges the target reaches, one row each.

        Columns: layer (the block), kind ("attention", "residual", "mlp"), head (an attention
        edge's largest head, else <NA>), source_kind, source_layer, source_position, source_token,
        target_kind, target_layer, target_position, target_token, weight (after threshold and
        renormalisation) and flow (the share of the traced target that goes through the edge).
        """
        reached, carried = self._traced
        live = (self.weights > 0) & reached[self.routes.target]
        layer, kind = self.routes.layer[live], self.routes.kind[live]
        source, target, weight = self.routes.source[live], self.routes.target[live], self.weights[live]
        src_pos, tgt_pos = source % self.n_pos, target % self.n_pos
        attention = kind == EDGE_KINDS.index("attention")
        top_head = self.head_shares[layer, tgt_pos, src_pos].argmax(-1)
        frame = {
            "layer": layer.numpy(),
            "kind": [EDGE_KINDS[k] for k in kind.tolist()],
            "head": pd.array([h if a else pd.NA for h, a in zip(top_head.tolist(), attention.tolist())], dtype="Int64"),
        }
        for end, ids, pos in (("source", source, src_pos), ("target", target, tgt_pos)):
            kinds, layers = zip(*(self.rows[r] for r in (ids // self.n_pos).tolist())) if len(ids) else ((), ())
            frame |= {
                f"{end}_kind": list(kinds),
                f"{end}_layer": list(layers),
                f"{end}_position": pos.numpy(),
                f"{end}_token": [self.str_tokens[p] for p in pos.tolist()],
            }
        frame |= {"weight": weight.numpy(), "flow": (carried[target] * weight).numpy()}
        return pd.DataFrame(frame)

    def to_frame(self) -> pd.DataFrame:
        """The edges the target reaches (`edges`)."""
        return self.edges

    # --- inside an edge or a node ---------------------------------------------------------

    def heads_for(self, edge: pd.Series | tuple[int, int, int]) -> pd.DataFrame:
        """The heads behind an attention edge: head, share, weight; largest share first.

        `edge` is a row of `edges` or (layer, source_position, target_position). share is the
        head's own part's proximity share in the target node; weight is that share after the
        node's renormalisation, and sums over heads to the edge's weight (0 if it was dropped).
        """
        if isinstance(edge, pd.Series):
            if edge["kind"] != "attention":
                raise InputError(f"heads_for: a {edge['kind']!r} edge has no heads; only attention edges do")
            layer, source, target = int(edge["layer"]), int(edge["source_position"]), int(edge["target_position"])
        else:
            layer, source, target = edge
        layer = check_index("layer", layer, self.model.cfg.n_layers)
        source, target = (
            check_index("source_position", source, self.n_pos),
            check_index("target_position", target, self.n_pos),
        )
        head_shares = self.head_shares[layer, target, source]
        node = self.row(attention_kind(self.model.cfg), layer) * self.n_pos + target
        kept = (head_shares.sum() >= self.threshold) & (head_shares.sum() > 0)
        frame = pd.DataFrame(
            {
                "head": range(len(head_shares)),
                "share": head_shares.numpy(),
                "weight": (head_shares * self._scale[node] * kept).numpy(),
            }
        )
        return frame.sort_values("share", ascending=False, kind="stable").reset_index(drop=True)

    def decompose(self, layer: int, pos: int, kind: NodeKind = "resid_post", neurons: bool = False) -> Decomposition:
        """The parts of the stream `kind` at (layer, pos) that the graph weighs, and their shares.

        kind="resid_mid": resid_pre and one part per (head, source position). kind="resid_post":
        resid_mid and mlp_out in a sequential block; resid_pre, the head parts and mlp_out in a
        parallel one. `neurons` replaces mlp_out by one part per neuron (b_out split equally).
        """
        cfg = self.model.cfg
        layer, pos = check_index("layer", layer, cfg.n_layers), check_index("pos", pos, self.n_pos)
        if kind == "resid_pre":
            raise InputError(
                "resid_pre is not a sum of parts here: it is the previous block's resid_post "
                "(or the embeddings); decompose that block's resid_post instead"
            )
        self.row(kind, layer)  # checks the kind exists at this layer
        labels, parts = [], []
        if kind == attention_kind(cfg):
            pattern = self.activations[sites.act_name("pattern", layer)][:, pos]  # [head, src]
            n_src = int((pattern > 0).any(0).nonzero().max()) + 1  # up to the last attended source
            labels += ["resid_pre"] + [f"head {h} <- {j}" for j in range(n_src) for h in range(cfg.n_heads)]
            head_parts = pattern[:, :n_src].T[..., None] * head_sources(self.model, self.activations, layer)[:n_src]
            parts += [self.activations[sites.block_input(layer)][pos, None], head_parts.reshape(-1, cfg.d_model)]
        if kind == "resid_post" and not cfg.attn_only:
            if kind != attention_kind(cfg):
                labels.append("resid_mid")
                parts.append(self.activations[sites.act_name("resid_mid", layer)][pos, None])
            if neurons:
                post = self.activations[sites.act_name("post", layer)][pos]
                mlp = self.model.blocks[layer].mlp
                labels += [f"neuron {n}" for n in range(len(post))]
                parts.append(
                    post[:, None] * mlp.W_out.detach().to(post.dtype)
                    + backend.bias(mlp, "b_out", mlp.W_out.shape[-1:]).detach().to(post.dtype) / len(post)
                )
            else:
                labels.append("mlp_out")
                parts.append(self.activations[sites.act_name("mlp_out", layer)][pos, None])
        elif neurons:
            raise InputError("neurons=True needs an MLP part: decompose kind='resid_post' of a block with an MLP")
        stacked = torch.cat(parts)
        whole = self.activations[sites.act_name(kind, layer)][pos]
        prox = proximity(stacked, whole)
        return Decomposition(
            LabelledTensor(stacked, ("part", "d_model"), {"part": labels}), whole, shares(prox, prox.sum())
        )

    def top_neurons(self, layer: int, pos: int, k: int = 10) -> pd.DataFrame:
        """The k neurons of the MLP at (layer, pos) with the largest shares in its resid_post.

        Columns: neuron, activation (mlp.hook_post), share (proximity share in the per-neuron
        decomposition of resid_post, see `decompose`).
        """
        if self.model.cfg.attn_only:
            raise InputError("top_neurons: this model is attention-only; it has no MLP neurons")
        checks.integer(k, "top_neurons: k", low=1)
        layer, pos = check_index("layer", layer, self.model.cfg.n_layers), check_index("pos", pos, self.n_pos)
        parts = self.decompose(layer, pos, "resid_post", neurons=True)
        first = parts.parts.labels["part"].index("neuron 0")
        post = self.activations[sites.act_name("post", layer)][pos]
        frame = pd.DataFrame(
            {"neuron": range(len(post)), "activation": post.numpy(), "share": parts.shares[first:].numpy()}
        )
        return frame.sort_values("share", ascending=False, kind="stable").head(k).reset_index(drop=True)

    def top_tokens(
        self,
        layer: int,
        pos: int,
        kind: Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"] = "resid_post",
        head: int | None = None,
        k: int = 10,
    ) -> pd.DataFrame:
        """Vocabulary projection of a node, a block's output, or one head's output, at (layer, pos).

        A node (kind resid_pre / resid_mid / resid_post) is read like the model reads its final
        stream, final normalisation and unembedding with their biases and the soft-cap, if any
        (the logit lens, `lenskit.readout.Readout`): for the last layer's resid_post these are
        the model's logits. A block's output (attn_out, or mlp_out) or a head's output (attn_out
        with `head`: pattern @ v @ W_O[head], without b_O) is a direction added to the stream; it
        goes through `Readout.contributions` with the final normalisation's scale at `pos`, so
        its values are its direct effect on the logits there (before any soft-cap).
        Returns `vocab.top_tokens`' frame: kind (promoted / suppressed), rank, token, token_id, value.
        """
        cfg = self.model.cfg
        layer, pos = check_index("layer", layer, cfg.n_layers), check_index("pos", pos, self.n_pos)
        if head is not None and kind != "attn_out":
            raise InputError(f"head= applies to kind='attn_out' only, not {kind!r}")
        with torch.no_grad():
            if kind in ("resid_pre", "resid_mid", "resid_post"):
                stream = self.activations[sites.act_name(*self.rows[self.row(kind, layer)])][pos]
                logits = self._logit_lens(stream[None])[0]
                return vocab.top_tokens(self.model, logits, k, source=f"{sites.act_name(kind, layer)}[{pos}]")
            if kind == "mlp_out" and cfg.attn_only:
                raise InputError("kind='mlp_out': this model is attention-only")
            if kind not in ("attn_out", "mlp_out"):
                raise InputError(f"unknown kind {kind!r}: use resid_pre, resid_mid, resid_post, attn_out or mlp_out")
            output = self.activations[sites.act_name(kind, layer)][pos]
            if head is not None:
                head = check_index("head", head, cfg.n_heads)
                pattern = self.activations[sites.act_name("pattern", layer)][head, pos]
                W_O = self.model.blocks[layer].attn.W_O[head].to(pattern.dtype)
                output = pattern @ values(self.model, self.activations, layer)[:, head] @ W_O
            logits = self._readout.contributions(self._on_model(output), self._on_model(self._final_scale[pos]))
        name = f"{sites.act_name(kind, layer)}[{pos}]" + ("" if head is None else f" head {head}")
        return vocab.top_tokens(self.model, logits, k, source=name)

    @cached_property
    def _readout(self) -> Readout:
        return Readout(self.model)

    @cached_property
    def _final_scale(self) -> Float[Tensor, "pos 1"]:
        """The final normalisation's scale at each position (1 without one)."""
        with torch.no_grad():
            _, scale = self._readout.normalize_with_scale(
                self._on_model(self.activations[sites.final_residual(self.model)])
            )
        return scale.float().cpu()

    def _logit_lens(self, streams: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_vocab"]:
        """Logits read off residual streams as the model reads its final one (final norm, unembedding, soft-cap)."""
        return self._readout(self._on_model(streams)).float().cpu()

    def _on_model(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.model.cfg.device, self.model.cfg.dtype)

    # --- pictures ---------------------------------------------------------------------------

    def plot(self, positions: Sequence[int] | None = None, k: int = 5, progress: bool = False) -> Figure:
        """An interactive, self-contained page: the routes over a layers x tokens grid.

        A selector picks the traced position among `positions` (default: every position);
        clicking an attention edge lists its heads' weights, clicking a node its top `k` tokens.
        """
        positions = (
            list(range(self.n_pos))
            if positions is None
            else [check_index("position", p, self.n_pos) for p in positions]
        )
        reached = torch.zeros(len(self.rows) * self.n_pos, dtype=torch.bool)
        for position in positions:
            reached |= self.trace(position)._traced[0]
        live = (self.weights > 0) & reached[self.routes.target]
        edges = []
        for index in live.nonzero().squeeze(1).tolist():
            layer, kind = int(self.routes.layer[index]), EDGE_KINDS[int(self.routes.kind[index])]
            source, target = (
                divmod(int(self.routes.source[index]), self.n_pos),
                divmod(int(self.routes.target[index]), self.n_pos),
            )
            details = []
            if kind == "attention":
                heads = self.head_shares[layer, target[1], source[1]] * self._scale[self.routes.target[index]]
                details = [(f"head {h}", round(w, 4)) for h, w in enumerate(heads.tolist()) if w > 0]
            edges.append(
                {
                    "source": source,
                    "target": target,
                    "kind": kind,
                    "weight": round(float(self.weights[index]), 4),
                    "title": f"L{layer} {kind}",
                    "details": sorted(details, key=lambda d: -d[1]),
                }
            )
        node_details = self._node_top_tokens(reached.nonzero().squeeze(1), k, progress) if k else {}
        rows = [f"{kind} {layer}" for kind, layer in self.rows]
        title = f"information-flow routes (threshold {self.threshold:g}{', renormalized' if self.renormalize else ''})"
        return route_graph(
            self.str_tokens,
            rows,
            edges,
            node_details,
            targets=positions,
            selected=self.target_pos if self.target_pos in positions else positions[-1],
            title=title,
        )

    def show(self, **kwargs) -> None:
        """Display `plot(**kwargs)` in a notebook."""
        from IPython.display import display

        display(self.plot(**kwargs))

    def _node_top_tokens(self, ids: Tensor, k: int, progress: bool, chunk: int = 256) -> dict[tuple[int, int], list]:
        """{(row, position): [(token, logit), ...]}: the logit lens' top k for each node in `ids`."""
        streams = torch.stack([self.activations[sites.act_name(*row)] for row in self.rows])
        flat = streams.reshape(-1, streams.shape[-1])
        found = {}
        with torch.no_grad():
            for start in tqdm(range(0, len(ids), chunk), desc="top tokens", disable=not progress):
                batch = ids[start : start + chunk]
                top = self._logit_lens(flat[batch]).topk(min(k, self.model.cfg.d_vocab))
                for node, logits, tokens in zip(batch.tolist(), top.values.tolist(), top.indices.tolist()):
                    words = token_labels(self.model, torch.tensor(tokens))
                    found[divmod(node, self.n_pos)] = [(w, round(v, 3)) for w, v in zip(words, logits)]
        return found

    def __repr__(self) -> str:
        return (
            f"FlowGraph(pos={self.n_pos}, target_pos={self.target_pos} {self.str_tokens[self.target_pos]!r}, "
            f"threshold={self.threshold:g}, renormalize={self.renormalize}, "
            f"{int(self._traced[0].sum())} nodes reached)"
        )

    def _repr_html_(self) -> str:
        edges = self.edges.sort_values("flow", ascending=False).head(20)
        return f"<p><code>{html.escape(repr(self))}</code></p><p>edges carrying the most flow:</p>" + edges.to_html(
            index=False
        )


def check_threshold(threshold: float) -> None:
    """InputError unless `threshold` is a number in [0, 1)."""
    if not 0 <= checks.number(threshold, "threshold") < 1:
        raise InputError(f"threshold must be in [0, 1), got {threshold}")
