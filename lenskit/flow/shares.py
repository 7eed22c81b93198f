"""The shares of information-flow routes: each block's update split into exact parts, each part weighed.

The activations come from one forward pass (a `lenskit.Run`, extended on demand): the residual
streams, values, attention patterns and MLP activations of the prompt, per batch row on the CPU
in float32 or wider. Each block's update is then split into parts that sum exactly to the stream
they update, and each part gets its proximity share (`lenskit.flow.proximity`):

- Attention in layer l at position i. The whole is the stream after attention, resid_mid[i]
  (resid_post[i] where attention and MLP run in parallel, or there is no MLP). The parts are
  resid_pre[i] and, for each source position j and head h, pattern[h, i, j] * (v[j, h] @ W_O[h]
  + b_O / n_heads): v holds b_V once, and b_O is split equally over the heads and within a head by
  attention weight (a pattern row sums to 1), so the parts sum to the whole exactly.
- The MLP in layer l at position i: mlp_out[i] and resid_mid[i], the parts of resid_post[i] (in
  a parallel block mlp_out[i] is one more part of the attention's whole). Per neuron, on request
  (`FlowGraph.decompose(..., neurons=True)`, `FlowGraph.top_neurons`): post[i, n] * W_out[n] +
  b_out / d_mlp in place of mlp_out[i].

Where the LM Transparency Tool's code differs here: it adds b_V to hook_v (which holds it already)
and drops b_O, so its parts do not sum to resid_mid; and it floors every proximity at 1e-5
(future tokens included) where lenskit keeps 0.

    tokens, activations = row_activations(model, "When Mary and John", batch=0)
    head_shares, routes = route_shares(model, activations, len(tokens), progress=False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from lenskit import backend, checks, sites
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.flow.proximity import head_source_proximity, proximity, shares
from lenskit.labelled import LabelledTensor
from lenskit.run import Run, as_run
from lenskit.tokens import Prompts

NodeKind = Literal["resid_pre", "resid_mid", "resid_post"]
EDGE_KINDS = ("attention", "residual", "mlp")


@dataclass
class Routes:
    """Every edge with a non-zero share, grouped by target row: tensors [edge]."""

    layer: Int[Tensor, " edge"]
    kind: Int[Tensor, " edge"]  # index into EDGE_KINDS
    source: Int[Tensor, " edge"]  # node id: row * n_pos + position
    target: Int[Tensor, " edge"]
    share: Float[Tensor, " edge"]  # proximity share in the target node, before threshold


def check_supported(model: Model) -> None:
    """Raise InputError for blocks whose update is not a sum of head, MLP and residual parts."""
    cfg = model.cfg
    reasons = {
        "it normalises attention and MLP outputs inside the block (use_normalization_before_and_after)": cfg.use_normalization_before_and_after,
        f"it is a post-norm architecture ({backend.architecture(cfg)})": backend.architecture(cfg)
        in POST_NORM_ARCHITECTURES,
        "its attention sinks make pattern rows sum to less than 1": backend.flag(cfg, "use_attention_sinks"),
        "its MLPs are mixtures of experts": bool(cfg.num_experts),
        "its weights are 4-bit quantised": cfg.load_in_4bit,
    }
    for reason, applies in reasons.items():
        if applies:
            raise InputError(f"flow does not support this model: {reason}")


def node_rows(cfg) -> list[tuple[NodeKind, int]]:
    """(kind, layer) of each row of nodes, from the embeddings up to the final stream."""
    rows = [("resid_pre", 0)]
    for layer in range(cfg.n_layers):
        if attention_kind(cfg) == "resid_mid":
            rows.append(("resid_mid", layer))
        rows.append(("resid_post", layer))
    return rows


def attention_kind(cfg) -> NodeKind:
    """The node that attention's update lands in: resid_mid when an MLP follows it, else resid_post."""
    return "resid_post" if cfg.attn_only or cfg.parallel_attn_mlp else "resid_mid"


def needed_hooks(model: Model) -> list[str]:
    """Hook names whose activations the shares (and the graph's views) read."""
    cfg = model.cfg
    names = [sites.block_input(0)]
    for layer in range(cfg.n_layers):
        names += [sites.act_name(site, layer) for site in ("v", "pattern", "attn_out", "resid_post")]
        if attention_kind(cfg) == "resid_mid":
            names.append(sites.act_name("resid_mid", layer))
        if not cfg.attn_only:
            names += [sites.act_name("mlp_out", layer), sites.act_name("post", layer)]
    return names


def row_activations(model: Model, tokens: "Prompts | Run", batch: int) -> tuple[Int[Tensor, " pos"], dict[str, Tensor]]:
    """Token ids [pos] of prompt `batch` and its activations by hook name [pos, ...] (or [head, pos,
    pos]), on the CPU in float32 or wider: read from `tokens` when it is a run, else from one
    forward pass (no unembedding) on that prompt alone."""
    run = as_run(model, tokens)
    row = check_index("batch", batch, run.shape[0])
    if not isinstance(tokens, Run):  # only the traced prompt needs running
        run, row = Run(model, run.tokens[row : row + 1]), 0
    names, dtype = needed_hooks(model), torch.promote_types(model.cfg.dtype, torch.float32)
    activations = run.require(names)
    return run.tokens[row].cpu(), {name: activations[name][row].to("cpu", dtype) for name in names}


def values(model: Model, activations: dict[str, Tensor], layer: int) -> Float[Tensor, "src head d_head"]:
    """hook_v with grouped key/value heads repeated to one per query head, as the model does."""
    v = activations[sites.act_name("v", layer)]
    return v.repeat_interleave(model.cfg.n_heads // v.shape[1], dim=1)


def head_sources(model: Model, activations: dict[str, Tensor], layer: int) -> Float[Tensor, "src head d_model"]:
    """What each head writes per unit of attention to each source: v[j, h] @ W_O[h] + b_O / n_heads."""
    attn = model.blocks[layer].attn
    v = values(model, activations, layer)
    W_O = attn.W_O.detach().to("cpu", v.dtype)
    b_O = backend.bias(attn, "b_O", W_O.shape[-1:]).detach().to("cpu", v.dtype)
    return torch.einsum("jhe,hed->jhd", v, W_O) + b_O / model.cfg.n_heads


def route_shares(
    model: Model, activations: dict[str, Tensor], n_pos: int, progress: bool
) -> tuple[Float[Tensor, "layer pos src_pos head"], Routes]:
    """Head shares [layer, pos, src_pos, head] and every edge with a non-zero share."""
    cfg = model.cfg
    rows = node_rows(cfg)
    positions = torch.arange(n_pos)
    head_shares, groups = [], []

    def per_position(layer, kind, source_row, target_row, share):
        groups.append((layer, kind, source_row * n_pos + positions, target_row * n_pos + positions, share))

    for layer in tqdm(range(cfg.n_layers), desc="flow", disable=not progress):
        input_row = 0 if layer == 0 else rows.index(("resid_post", layer - 1))
        attention_row = rows.index((attention_kind(cfg), layer))
        whole = activations[sites.act_name(attention_kind(cfg), layer)]
        others = [activations[sites.block_input(layer)]]
        if cfg.parallel_attn_mlp and not cfg.attn_only:
            others.append(activations[sites.act_name("mlp_out", layer)])
        head_prox = head_source_proximity(
            whole, head_sources(model, activations, layer), activations[sites.act_name("pattern", layer)]
        )
        other_prox = proximity(torch.stack(others), whole)
        total = head_prox.sum((1, 2)) + other_prox.sum(0)
        heads = shares(head_prox, total[:, None, None])
        other = shares(other_prox, total)
        head_shares.append(heads)

        edge_shares = heads.sum(-1)  # [pos, src]
        target_pos, source_pos = edge_shares.nonzero().T
        groups.append(
            (
                layer,
                "attention",
                input_row * n_pos + source_pos,
                attention_row * n_pos + target_pos,
                edge_shares[target_pos, source_pos],
            )
        )
        per_position(layer, "residual", input_row, attention_row, other[0])
        if len(others) == 2:
            per_position(layer, "mlp", input_row, attention_row, other[1])
        elif not cfg.attn_only:
            mid_row, post_row = attention_row, rows.index(("resid_post", layer))
            parts = torch.stack(
                [activations[sites.act_name("mlp_out", layer)], activations[sites.act_name("resid_mid", layer)]]
            )
            mlp_prox = proximity(parts, activations[sites.act_name("resid_post", layer)])
            mlp = shares(mlp_prox, mlp_prox.sum(0))
            per_position(layer, "mlp", mid_row, post_row, mlp[0])
            per_position(layer, "residual", mid_row, post_row, mlp[1])

    columns = zip(
        *(
            (torch.full_like(source, layer), torch.full_like(source, EDGE_KINDS.index(kind)), source, target, share)
            for layer, kind, source, target, share in groups
        )
    )  # groups come in order of target row
    routes = Routes(*(torch.cat(column) for column in columns))
    nonzero = routes.share > 0
    routes = Routes(
        routes.layer[nonzero],
        routes.kind[nonzero],
        routes.source[nonzero],
        routes.target[nonzero],
        routes.share[nonzero],
    )
    return torch.stack(head_shares), routes


def check_index(what: str, index: int, size: int) -> int:
    """`index` (negative counts from the end) checked against `size`, as a non-negative int."""
    index = checks.integer(index, what)
    if not -size <= index < size:
        raise InputError(
            f"{what} {index} out of range: there are {size} (valid 0..{size - 1}, or negative from the end)"
        )
    return index % size


@dataclass
class Decomposition:
    """A residual stream as a sum of parts (exactly), with each part's proximity share.

    parts: [part, d_model], labelled ("resid_pre", "head 3 <- 5" for head 3 reading position 5,
    "mlp_out", "neuron 17", ...); whole: the cached stream [d_model]; shares: [part], summing
    to 1 (all 0 if every proximity is 0).
    """

    parts: LabelledTensor
    whole: Float[Tensor, " d_model"]
    shares: Float[Tensor, " part"]

    def to_frame(self) -> pd.DataFrame:
        """One row per part: part, share, and the part's L1 norm; largest share first."""
        frame = pd.DataFrame(
            {
                "part": self.parts.labels["part"],
                "share": self.shares.numpy(),
                "l1_norm": self.parts.tensor.abs().sum(-1).numpy(),
            }
        )
        return frame.sort_values("share", ascending=False, kind="stable").reset_index(drop=True)
