"""`flow` and `FlowGraph`: the information-flow routes of one prompt (the LM Transparency Tool's graph).

One forward pass caches, with `hooks.cache`, the residual streams, values, attention patterns and
MLP activations of the prompt. Each block's update is then split into parts that sum exactly to
the stream they update, and each part gets its proximity share (`lenskit.flow.proximity`):

- Attention in layer l at position i. The whole is the stream after attention, resid_mid[i]
  (resid_post[i] where attention and MLP run in parallel, or there is no MLP). The parts are
  resid_pre[i] and, for each source position j and head h, pattern[h, i, j] * (v[j, h] @ W_O[h]
  + b_O / n_heads): v holds b_V once, and b_O is split equally over the heads and within a head by
  attention weight (a pattern row sums to 1), so the parts sum to the whole exactly.
- The MLP in layer l at position i: mlp_out[i] and resid_mid[i], the parts of resid_post[i] (in
  a parallel block mlp_out[i] is one more part of the attention's whole). Per neuron, on request
  (`FlowGraph.decompose(..., neurons=True)`, `FlowGraph.top_neurons`): post[i, n] * W_out[n] +
  b_out / d_mlp in place of mlp_out[i].

Nodes are residual streams at (layer, position): the embeddings (resid_pre of block 0), and
resid_mid and resid_post of each block. Edges run from the block's input stream to its attention
node (kind "attention", one per source position with the heads summed; kind "residual", the
position's own stream) and from resid_mid into resid_post (kinds "mlp" and "residual"). Edges
whose share is below `threshold` are dropped; with `renormalize`, the surviving shares into each
node, at each layer and position separately, are rescaled to sum to 1. The graph is then pruned
to what the target position's final residual stream reaches, down to the embeddings.

Where the LM Transparency Tool's code differs: it adds b_V to hook_v (which holds it already) and
drops b_O, so its parts do not sum to resid_mid; it floors every proximity at 1e-5 (future tokens
included) where lenskit keeps 0; it thresholds each (head, source) part before summing the heads,
where lenskit thresholds edges; it merges a position's attention to itself with its residual edge;
and it reads batch index 0 only.

    graph = lenskit.flow(model, "When Mary and John went to the store, John gave a drink to")
    graph.edges                              # tidy DataFrame of the routes into the last token
    graph.heads_for(graph.edges.iloc[0])     # the heads behind an attention edge
    graph.top_neurons(layer=3, pos=-1)       # the neurons behind an MLP edge
    graph.top_tokens(layer=3, pos=-1)        # what a node, a block or a head output promotes
    graph.trace(5).show()                    # the routes into position 5, as a picture
"""

from __future__ import annotations

import html

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Literal, Union

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from lenskit import hooks, vocab
from lenskit.flow.proximity import head_source_proximity, proximity, shares
from lenskit.labelled import LabelledTensor
from lenskit.viz.figure import Figure
from lenskit.viz.graph import route_graph

Tokens = Union[str, Sequence[str], Int[Tensor, "batch pos"], Int[Tensor, "pos"]]
NodeKind = Literal["resid_pre", "resid_mid", "resid_post"]
EDGE_KINDS = ("attention", "residual", "mlp")


def flow(
    model: HookedTransformer,
    tokens: Tokens,
    threshold: float = 0.04,
    renormalize: bool = True,
    target_pos: int = -1,
    batch: int = 0,
    progress: bool = True,
) -> "FlowGraph":
    """The information-flow routes graph of one prompt, traced from the final stream at `target_pos`.

    Args:
        tokens: a prompt (a string, or token ids [pos]) or several (strings, or ids [batch, pos]);
            `batch` picks the prompt to trace (only that row is run).
        threshold: edges whose share is below it are dropped (0 keeps every edge with a share).
            A node whose parts all have proximity 0 (a zero stream) has all shares 0: no edge in.
        renormalize: rescale the surviving shares into each node to sum to 1.
        target_pos: the position whose final residual stream the graph is traced from
            (`FlowGraph.trace` re-traces from another position at no cost).
    """
    _check_supported(model)
    row = _token_row(model, tokens, batch)
    activations = _run(model, row)
    head_shares, routes = _shares(model, activations, len(row), progress)
    return FlowGraph(model, row, activations, head_shares, routes, threshold, renormalize, target_pos)


@dataclass
class Routes:
    """Every edge with a non-zero share, grouped by target row: tensors [edge]."""

    layer: Int[Tensor, "edge"]
    kind: Int[Tensor, "edge"]  # index into EDGE_KINDS
    source: Int[Tensor, "edge"]  # node id: row * n_pos + position
    target: Int[Tensor, "edge"]
    share: Float[Tensor, "edge"]  # proximity share in the target node, before threshold


@dataclass
class Decomposition:
    """A residual stream as a sum of parts (exactly), with each part's proximity share.

    parts: [part, d_model], labelled ("resid_pre", "head 3 <- 5" for head 3 reading position 5,
    "mlp_out", "neuron 17", ...); whole: the cached stream [d_model]; shares: [part], summing
    to 1 (all 0 if every proximity is 0).
    """

    parts: LabelledTensor
    whole: Float[Tensor, "d_model"]
    shares: Float[Tensor, "part"]

    def to_frame(self) -> pd.DataFrame:
        """One row per part: part, share, and the part's L1 norm; largest share first."""
        frame = pd.DataFrame({"part": self.parts.labels["part"], "share": self.shares.numpy(),
                              "l1_norm": self.parts.tensor.abs().sum(-1).numpy()})
        return frame.sort_values("share", ascending=False, kind="stable").reset_index(drop=True)


@dataclass(eq=False)
class FlowGraph:
    """The routes graph of one prompt: shares of every edge, thresholded, traced from `target_pos`.

    `nodes` and `edges` are the part of the graph the target's final stream reaches; `trace(pos)`,
    or ``dataclasses.replace(graph, threshold=..., renormalize=...)``, gives another view of the
    same shares without running the model again.
    """

    model: HookedTransformer
    tokens: Int[Tensor, "pos"]
    activations: dict[str, Tensor]  # hook name -> activation of the traced prompt [pos, ...]
    head_shares: Float[Tensor, "layer pos src_pos head"]  # share of each head's part, before threshold
    routes: Routes
    threshold: float = 0.04
    renormalize: bool = True
    target_pos: int = -1

    def __post_init__(self) -> None:
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        self.target_pos = _index("target_pos", self.target_pos, self.n_pos)

    # --- layout ---------------------------------------------------------------------------

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @cached_property
    def str_tokens(self) -> list[str]:
        if self.model.tokenizer is None:
            return [str(t) for t in self.tokens.tolist()]
        return list(self.model.to_str_tokens(self.tokens))

    @cached_property
    def rows(self) -> list[tuple[NodeKind, int]]:
        """(kind, layer) of each row of nodes, from the embeddings up to the final stream."""
        return _rows(self.model.cfg)

    def row(self, kind: NodeKind, layer: int) -> int:
        """The row of a node kind at a layer (resid_pre of layer l > 0 is resid_post of l - 1)."""
        if kind == "resid_pre" and layer > 0:
            kind, layer = "resid_post", layer - 1
        if (kind, layer) not in self.rows:
            have = sorted({k for k, _ in self.rows})
            why = " (attention and MLP run in parallel, or there is no MLP)" if kind == "resid_mid" else ""
            raise ValueError(f"no {kind} node at layer {layer}{why}; node kinds here: {have}")
        return self.rows.index((kind, layer))

    # --- threshold, renormalisation, pruning --------------------------------------------

    @cached_property
    def _scale(self) -> Float[Tensor, "node"]:
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
    def weights(self) -> Float[Tensor, "edge"]:
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
        return pd.DataFrame({
            "layer": list(layers), "position": positions, "token": [self.str_tokens[p] for p in positions],
            "kind": list(kinds), "hook": [f"blocks.{l}.hook_{k}" for k, l in zip(kinds, layers)],
            "weight": carried[ids].numpy(),
        })

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
        frame = {"layer": layer.numpy(), "kind": [EDGE_KINDS[k] for k in kind.tolist()],
                 "head": pd.array([h if a else pd.NA for h, a in zip(top_head.tolist(), attention.tolist())], dtype="Int64")}
        for end, ids, pos in (("source", source, src_pos), ("target", target, tgt_pos)):
            kinds, layers = zip(*(self.rows[r] for r in (ids // self.n_pos).tolist())) if len(ids) else ((), ())
            frame |= {f"{end}_kind": list(kinds), f"{end}_layer": list(layers), f"{end}_position": pos.numpy(),
                      f"{end}_token": [self.str_tokens[p] for p in pos.tolist()]}
        frame |= {"weight": weight.numpy(), "flow": (carried[target] * weight).numpy()}
        return pd.DataFrame(frame)

    # --- inside an edge or a node ---------------------------------------------------------

    def heads_for(self, edge: pd.Series | tuple[int, int, int]) -> pd.DataFrame:
        """The heads behind an attention edge: head, share, weight; largest share first.

        `edge` is a row of `edges` or (layer, source_position, target_position). share is the
        head's own part's proximity share in the target node; weight is that share after the
        node's renormalisation, and sums over heads to the edge's weight (0 if it was dropped).
        """
        if isinstance(edge, pd.Series):
            if edge["kind"] != "attention":
                raise ValueError(f"heads_for: a {edge['kind']!r} edge has no heads; only attention edges do")
            layer, source, target = int(edge["layer"]), int(edge["source_position"]), int(edge["target_position"])
        else:
            layer, source, target = edge
        layer = _index("layer", layer, self.model.cfg.n_layers)
        source, target = _index("source_position", source, self.n_pos), _index("target_position", target, self.n_pos)
        head_shares = self.head_shares[layer, target, source]
        node = self.row(_attention_kind(self.model.cfg), layer) * self.n_pos + target
        kept = (head_shares.sum() >= self.threshold) & (head_shares.sum() > 0)
        frame = pd.DataFrame({"head": range(len(head_shares)), "share": head_shares.numpy(),
                              "weight": (head_shares * self._scale[node] * kept).numpy()})
        return frame.sort_values("share", ascending=False, kind="stable").reset_index(drop=True)

    def decompose(self, layer: int, pos: int, kind: NodeKind = "resid_post", neurons: bool = False) -> Decomposition:
        """The parts of the stream `kind` at (layer, pos) that the graph weighs, and their shares.

        kind="resid_mid": resid_pre and one part per (head, source position). kind="resid_post":
        resid_mid and mlp_out in a sequential block; resid_pre, the head parts and mlp_out in a
        parallel one. `neurons` replaces mlp_out by one part per neuron (b_out split equally).
        """
        cfg = self.model.cfg
        layer, pos = _index("layer", layer, cfg.n_layers), _index("pos", pos, self.n_pos)
        if kind == "resid_pre":
            raise ValueError("resid_pre is not a sum of parts here: it is the previous block's resid_post "
                             "(or the embeddings); decompose that block's resid_post instead")
        self.row(kind, layer)  # checks the kind exists at this layer
        labels, parts = [], []
        if kind == _attention_kind(cfg):
            pattern = self.activations[f"blocks.{layer}.attn.hook_pattern"][:, pos]  # [head, src]
            n_src = int((pattern > 0).any(0).nonzero().max()) + 1  # up to the last attended source
            labels += ["resid_pre"] + [f"head {h} <- {j}" for j in range(n_src) for h in range(cfg.n_heads)]
            head_parts = pattern[:, :n_src].T[..., None] * _head_sources(self.model, self.activations, layer)[:n_src]
            parts += [self.activations[_input_hook(layer)][pos, None], head_parts.reshape(-1, cfg.d_model)]
        if kind == "resid_post" and not cfg.attn_only:
            if kind != _attention_kind(cfg):
                labels.append("resid_mid")
                parts.append(self.activations[f"blocks.{layer}.hook_resid_mid"][pos, None])
            if neurons:
                post = self.activations[f"blocks.{layer}.mlp.hook_post"][pos]
                mlp = self.model.blocks[layer].mlp
                labels += [f"neuron {n}" for n in range(len(post))]
                parts.append(post[:, None] * mlp.W_out.detach().to(post.dtype) + mlp.b_out.detach().to(post.dtype) / len(post))
            else:
                labels.append("mlp_out")
                parts.append(self.activations[f"blocks.{layer}.hook_mlp_out"][pos, None])
        elif neurons:
            raise ValueError("neurons=True needs an MLP part: decompose kind='resid_post' of a block with an MLP")
        stacked = torch.cat(parts)
        whole = self.activations[f"blocks.{layer}.hook_{kind}"][pos]
        prox = proximity(stacked, whole)
        return Decomposition(LabelledTensor(stacked, ("part", "d_model"), {"part": labels}), whole,
                             shares(prox, prox.sum()))

    def top_neurons(self, layer: int, pos: int, k: int = 10) -> pd.DataFrame:
        """The k neurons of the MLP at (layer, pos) with the largest shares in its resid_post.

        Columns: neuron, activation (mlp.hook_post), share (proximity share in the per-neuron
        decomposition of resid_post, see `decompose`).
        """
        if self.model.cfg.attn_only:
            raise ValueError("top_neurons: this model is attention-only; it has no MLP neurons")
        layer, pos = _index("layer", layer, self.model.cfg.n_layers), _index("pos", pos, self.n_pos)
        parts = self.decompose(layer, pos, "resid_post", neurons=True)
        first = parts.parts.labels["part"].index("neuron 0")
        post = self.activations[f"blocks.{layer}.mlp.hook_post"][pos]
        frame = pd.DataFrame({"neuron": range(len(post)), "activation": post.numpy(),
                              "share": parts.shares[first:].numpy()})
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
        stream, final normalisation and unembedding with their biases (the logit lens): for the
        last layer's resid_post these are the model's logits. A block's output (attn_out, or
        mlp_out) or a head's output (attn_out with `head`: pattern @ v @ W_O[head], without b_O)
        is a direction added to the stream; it goes through `vocab.unembed` with the final
        normalisation's scale at `pos`, so its values are its direct effect on the logits there.
        Returns `vocab.top_tokens`' frame: kind (promoted / suppressed), rank, token, token_id, value.
        """
        cfg = self.model.cfg
        layer, pos = _index("layer", layer, cfg.n_layers), _index("pos", pos, self.n_pos)
        if head is not None and kind != "attn_out":
            raise ValueError(f"head= applies to kind='attn_out' only, not {kind!r}")
        with torch.no_grad():
            if kind in ("resid_pre", "resid_mid", "resid_post"):
                stream = self.activations[_node_hook(*self.rows[self.row(kind, layer)])][pos]
                logits = _logit_lens(self.model, stream[None])[0]
                return vocab.top_tokens(self.model, logits, k, source=f"blocks.{layer}.hook_{kind}[{pos}]")
            if kind == "mlp_out" and cfg.attn_only:
                raise ValueError("kind='mlp_out': this model is attention-only")
            if kind not in ("attn_out", "mlp_out"):
                raise ValueError(f"unknown kind {kind!r}: use resid_pre, resid_mid, resid_post, attn_out or mlp_out")
            output = self.activations[f"blocks.{layer}.hook_{kind}"][pos]
            if head is not None:
                head = _index("head", head, cfg.n_heads)
                pattern = self.activations[f"blocks.{layer}.attn.hook_pattern"][head, pos]
                output = pattern @ _values(self.model, self.activations, layer)[:, head] @ self.model.blocks[layer].attn.W_O[head].to(pattern.dtype)
            logits = vocab.unembed(self.model, output.to(self.model.W_U), self._final_scale[pos].to(self.model.W_U))
        name = f"blocks.{layer}.hook_{kind}[{pos}]" + ("" if head is None else f" head {head}")
        return vocab.top_tokens(self.model, logits, k, source=name)

    @cached_property
    def _final_scale(self) -> Float[Tensor, "pos 1"]:
        """The final normalisation's scale at each position (ln_final.hook_scale; 1 without one)."""
        if "ln_final.hook_scale" not in self.model.hook_dict:
            return torch.ones(self.n_pos, 1)
        final = self.activations[f"blocks.{self.model.cfg.n_layers - 1}.hook_resid_post"]
        scale = hooks.cache("ln_final.hook_scale")
        with torch.no_grad(), scale.on(self.model):
            self.model.ln_final(final[None].to(self.model.cfg.device, self.model.cfg.dtype))
        return scale.store["ln_final.hook_scale"][0].float()

    # --- pictures ---------------------------------------------------------------------------

    def plot(self, positions: Sequence[int] | None = None, k: int = 5, progress: bool = False) -> Figure:
        """An interactive, self-contained page: the routes over a layers x tokens grid.

        A selector picks the traced position among `positions` (default: every position);
        clicking an attention edge lists its heads' weights, clicking a node its top `k` tokens.
        """
        positions = list(range(self.n_pos)) if positions is None else [_index("position", p, self.n_pos) for p in positions]
        reached = torch.zeros(len(self.rows) * self.n_pos, dtype=torch.bool)
        for position in positions:
            reached |= self.trace(position)._traced[0]
        live = (self.weights > 0) & reached[self.routes.target]
        edges = []
        for index in live.nonzero().squeeze(1).tolist():
            layer, kind = int(self.routes.layer[index]), EDGE_KINDS[int(self.routes.kind[index])]
            source, target = divmod(int(self.routes.source[index]), self.n_pos), divmod(int(self.routes.target[index]), self.n_pos)
            details = []
            if kind == "attention":
                heads = self.head_shares[layer, target[1], source[1]] * self._scale[self.routes.target[index]]
                details = [(f"head {h}", round(w, 4)) for h, w in enumerate(heads.tolist()) if w > 0]
            edges.append({"source": source, "target": target, "kind": kind, "weight": round(float(self.weights[index]), 4),
                          "title": f"L{layer} {kind}", "details": sorted(details, key=lambda d: -d[1])})
        node_details = self._node_top_tokens(reached.nonzero().squeeze(1), k, progress) if k else {}
        rows = [f"{kind} {layer}" for kind, layer in self.rows]
        title = f"information-flow routes (threshold {self.threshold:g}{', renormalized' if self.renormalize else ''})"
        return route_graph(self.str_tokens, rows, edges, node_details, targets=positions,
                           selected=self.target_pos if self.target_pos in positions else positions[-1], title=title)

    def show(self, **kwargs) -> None:
        """Display `plot(**kwargs)` in a notebook."""
        from IPython.display import display

        display(self.plot(**kwargs))

    def save_html(self, path: str | Path, **kwargs) -> Path:
        """Write `plot(**kwargs)` as a standalone HTML page that works offline; returns the path."""
        return self.plot(**kwargs).save(path)

    def _node_top_tokens(self, ids: Tensor, k: int, progress: bool, chunk: int = 256) -> dict[tuple[int, int], list]:
        """{(row, position): [(token, logit), ...]}: the logit lens' top k for each node in `ids`."""
        streams = torch.stack([self.activations[_node_hook(*self.rows[r])] for r in range(len(self.rows))])
        flat = streams.reshape(-1, streams.shape[-1])
        found = {}
        with torch.no_grad():
            for start in tqdm(range(0, len(ids), chunk), desc="top tokens", disable=not progress):
                batch = ids[start:start + chunk]
                top = _logit_lens(self.model, flat[batch]).topk(min(k, self.model.cfg.d_vocab))
                for node, values, tokens in zip(batch.tolist(), top.values.tolist(), top.indices.tolist()):
                    words = self.model.to_str_tokens(torch.tensor(tokens)) if self.model.tokenizer else [str(t) for t in tokens]
                    found[divmod(node, self.n_pos)] = [(w, round(v, 3)) for w, v in zip(words, values)]
        return found

    def __repr__(self) -> str:
        return (f"FlowGraph(pos={self.n_pos}, target_pos={self.target_pos} {self.str_tokens[self.target_pos]!r}, "
                f"threshold={self.threshold:g}, renormalize={self.renormalize}, "
                f"{int(self._traced[0].sum())} nodes reached)")

    def _repr_html_(self) -> str:
        edges = self.edges.sort_values("flow", ascending=False).head(20)
        return (f"<p><code>{html.escape(repr(self))}</code></p><p>edges carrying the most flow:</p>"
                + edges.to_html(index=False))


# --- the forward pass and the shares ----------------------------------------------------------


def _check_supported(model: HookedTransformer) -> None:
    """Raise ValueError for blocks whose update is not a sum of head, MLP and residual parts."""
    cfg = model.cfg
    reasons = {
        "it normalises attention and MLP outputs inside the block (use_normalization_before_and_after)":
            cfg.use_normalization_before_and_after,
        f"it is a post-norm architecture ({cfg.original_architecture})": cfg.original_architecture in POST_NORM_ARCHITECTURES,
        "its attention sinks make pattern rows sum to less than 1": cfg.use_attention_sinks,
        "its MLPs are mixtures of experts": bool(cfg.num_experts),
        "its weights are 4-bit quantised": cfg.load_in_4bit,
    }
    for reason, applies in reasons.items():
        if applies:
            raise ValueError(f"flow does not support this model: {reason}")


def _token_row(model: HookedTransformer, tokens: Tokens, batch: int) -> Int[Tensor, "pos"]:
    if isinstance(tokens, str) or (isinstance(tokens, Sequence) and tokens and isinstance(tokens[0], str)):
        tokens = model.to_tokens(tokens)
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be a string, strings, or token ids [pos] or [batch, pos]; got shape {tuple(tokens.shape)}")
    row = tokens[_index("batch", batch, len(tokens))].cpu()
    outside = row[(row < 0) | (row >= model.cfg.d_vocab)]
    if len(outside):
        raise ValueError(f"token ids {outside.tolist()} are outside the vocabulary (0..{model.cfg.d_vocab - 1})")
    return row


def _rows(cfg) -> list[tuple[NodeKind, int]]:
    rows = [("resid_pre", 0)]
    for layer in range(cfg.n_layers):
        if _attention_kind(cfg) == "resid_mid":
            rows.append(("resid_mid", layer))
        rows.append(("resid_post", layer))
    return rows


def _attention_kind(cfg) -> NodeKind:
    """The node that attention's update lands in: resid_mid when an MLP follows it, else resid_post."""
    return "resid_post" if cfg.attn_only or cfg.parallel_attn_mlp else "resid_mid"


def _input_hook(layer: int) -> str:
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def _node_hook(kind: NodeKind, layer: int) -> str:
    return f"blocks.{layer}.hook_{kind}"


def _run(model: HookedTransformer, tokens: Int[Tensor, "pos"]) -> dict[str, Tensor]:
    """One forward pass (no unembedding) caching what the shares need, as float32 or wider."""
    cfg = model.cfg
    names = ["blocks.0.hook_resid_pre"]
    for layer in range(cfg.n_layers):
        block = f"blocks.{layer}"
        names += [f"{block}.attn.hook_v", f"{block}.attn.hook_pattern", f"{block}.hook_attn_out", f"{block}.hook_resid_post"]
        if _attention_kind(cfg) == "resid_mid":
            names.append(f"{block}.hook_resid_mid")
        if not cfg.attn_only:
            names += [f"{block}.hook_mlp_out", f"{block}.mlp.hook_post"]
    cache = hooks.cache(names, device="cpu", dtype=torch.promote_types(cfg.dtype, torch.float32))
    with torch.no_grad(), cache.on(model):
        model(tokens[None].to(cfg.device), stop_at_layer=cfg.n_layers)
    return {name: activation[0] for name, activation in cache.store.items()}


def _values(model: HookedTransformer, activations: dict[str, Tensor], layer: int) -> Float[Tensor, "src head d_head"]:
    """hook_v with grouped key/value heads repeated to one per query head, as the model does."""
    values = activations[f"blocks.{layer}.attn.hook_v"]
    return values.repeat_interleave(model.cfg.n_heads // values.shape[1], dim=1)


def _head_sources(model: HookedTransformer, activations: dict[str, Tensor], layer: int) -> Float[Tensor, "src head d_model"]:
    """What each head writes per unit of attention to each source: v[j, h] @ W_O[h] + b_O / n_heads."""
    attn = model.blocks[layer].attn
    values = _values(model, activations, layer)
    W_O, b_O = attn.W_O.detach().to("cpu", values.dtype), attn.b_O.detach().to("cpu", values.dtype)
    return torch.einsum("jhe,hed->jhd", values, W_O) + b_O / model.cfg.n_heads


def _shares(model: HookedTransformer, activations: dict[str, Tensor], n_pos: int, progress: bool) -> tuple[Tensor, Routes]:
    """Head shares [layer, pos, src_pos, head] and every edge with a non-zero share."""
    cfg = model.cfg
    rows = _rows(cfg)
    positions = torch.arange(n_pos)
    head_shares, groups = [], []

    def per_position(layer, kind, source_row, target_row, share):
        groups.append((layer, kind, source_row * n_pos + positions, target_row * n_pos + positions, share))

    for layer in tqdm(range(cfg.n_layers), desc="flow", disable=not progress):
        block = f"blocks.{layer}"
        input_row = 0 if layer == 0 else rows.index(("resid_post", layer - 1))
        attention_row = rows.index((_attention_kind(cfg), layer))
        whole = activations[f"{block}.hook_{_attention_kind(cfg)}"]
        others = [activations[_input_hook(layer)]]
        if cfg.parallel_attn_mlp and not cfg.attn_only:
            others.append(activations[f"{block}.hook_mlp_out"])
        head_prox = head_source_proximity(whole, _head_sources(model, activations, layer),
                                          activations[f"{block}.attn.hook_pattern"])
        other_prox = proximity(torch.stack(others), whole)
        total = head_prox.sum((1, 2)) + other_prox.sum(0)
        heads = shares(head_prox, total[:, None, None])
        other = shares(other_prox, total)
        head_shares.append(heads)

        edge_shares = heads.sum(-1)  # [pos, src]
        target_pos, source_pos = edge_shares.nonzero().T
        groups.append((layer, "attention", input_row * n_pos + source_pos, attention_row * n_pos + target_pos,
                       edge_shares[target_pos, source_pos]))
        per_position(layer, "residual", input_row, attention_row, other[0])
        if len(others) == 2:
            per_position(layer, "mlp", input_row, attention_row, other[1])
        elif not cfg.attn_only:
            mid_row, post_row = attention_row, rows.index(("resid_post", layer))
            post = activations[f"{block}.hook_resid_post"]
            mlp_prox = proximity(torch.stack([activations[f"{block}.hook_mlp_out"], activations[f"{block}.hook_resid_mid"]]), post)
            mlp = shares(mlp_prox, mlp_prox.sum(0))
            per_position(layer, "mlp", mid_row, post_row, mlp[0])
            per_position(layer, "residual", mid_row, post_row, mlp[1])

    columns = zip(*((torch.full_like(source, layer), torch.full_like(source, EDGE_KINDS.index(kind)), source, target, share)
                    for layer, kind, source, target, share in groups))  # groups come in order of target row
    routes = Routes(*(torch.cat(column) for column in columns))
    nonzero = routes.share > 0
    routes = Routes(routes.layer[nonzero], routes.kind[nonzero], routes.source[nonzero], routes.target[nonzero],
                    routes.share[nonzero])
    return torch.stack(head_shares), routes


def _logit_lens(model: HookedTransformer, streams: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_vocab"]:
    """Logits read off residual streams as the model reads its final one: ln_final, then unembed."""
    streams = streams.to(model.cfg.device, model.cfg.dtype)[None]
    normalised = model.ln_final(streams) if hasattr(model, "ln_final") else streams
    return model.unembed(normalised)[0].float().cpu()


def _index(what: str, index: int, size: int) -> int:
    """`index` (negative counts from the end) checked against `size`, as a non-negative int."""
    if isinstance(index, Tensor) and index.numel() == 1 and not index.is_floating_point():
        index = int(index)
    if not isinstance(index, numbers.Integral) or isinstance(index, bool):
        raise ValueError(f"{what} must be an integer, got {index!r}")
    index = int(index)
    if not -size <= index < size:
        raise ValueError(f"{what} {index} out of range: there are {size} (valid 0..{size - 1}, or negative from the end)")
    return index % size
