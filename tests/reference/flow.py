"""Two references for lenskit.flow: the proximity definition, and the LM Transparency Tool's code path.

`proximity(part, whole)`: how much of `whole` a part accounts for, max(0, |whole|_1 - |whole - part|_1),
computed densely (the definition lenskit.flow's sparse, exact computation must equal).

`tool_*`: the tool's own code path (facebookresearch/llm-transparency-tool: models/tlens_model.py
decomposed_attn, routes/contributions.py, routes/graph.py build_full_graph and
build_paths_to_predictions for every token), re-implemented because the tool cannot be installed
offline, and kept as the tool has it, including what lenskit does differently: it adds b_V to hook_v,
which holds it already, drops b_O, and materialises the [pos, pos, head, d_model] parts of each layer.
"""

from __future__ import annotations

import networkx as nx
import torch
from transformer_lens import ActivationCache

from lenskit.backend import Model


def proximity(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """max(0, |whole|_1 - |whole - part|_1) over the last dimension, densely (part broadcasts against whole)."""
    return (whole.abs().sum(-1) - (whole - part).abs().sum(-1)).clamp(min=0)


def tool_decomposed_attn(model: Model, cache: ActivationCache, batch_i: int, layer: int) -> torch.Tensor:
    """[pos, key_pos, head, d_model] as the tool's decomposed_attn: hook_v + b_V (b_V twice), no b_O."""
    hook_v = cache[f"blocks.{layer}.attn.hook_v"][batch_i]
    b_v = model.blocks[layer].attn.b_V
    hook_v = hook_v.repeat_interleave(b_v.shape[-2] // hook_v.shape[-2], dim=-2)
    v = hook_v + b_v
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][batch_i].to(v.dtype)
    z = torch.einsum("khd,hqk->qkhd", v, pattern)
    return torch.einsum("qkhd,hdm->qkhm", z, model.blocks[layer].attn.W_O)


def tool_contributions(parts: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The tool's get_contributions: proximity clipped at 1e-5 (not 0), normalised over the part dims."""
    k = parts.ndim - whole.ndim
    distance = torch.nn.functional.pairwise_distance(parts, whole.expand(parts.shape), p=1)
    distance = (whole.norm(p=1, dim=-1) - distance).clip(min=1e-5)
    return distance / distance.sum(dim=tuple(range(k)), keepdim=True)


def tool_threshold(threshold: float, c_blocks: torch.Tensor, c_residual: torch.Tensor):
    """The tool's apply_threshold_and_renormalize: per head and source part, before summing heads."""
    c_blocks = c_blocks * (c_blocks > threshold)
    c_residual = c_residual * (c_residual > threshold)
    denom = c_residual + c_blocks.sum(dim=tuple(range(c_residual.ndim, c_blocks.ndim)))
    return c_blocks / denom.reshape(denom.shape + (1,) * (c_blocks.ndim - c_residual.ndim)), c_residual / denom


def tool_graph(model: Model, tokens: torch.Tensor, threshold: float) -> list[nx.DiGraph]:
    """The tool's run, build_full_graph and build_paths_to_predictions (every token), batch index 0."""
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(tokens)
    finally:
        model.set_use_attn_result(False)
    n_layers, n_tokens = model.cfg.n_layers, tokens.shape[1]
    graph = nx.DiGraph()

    def add(u, v, w):  # the tool sums the self-attention and residual edges into one
        if graph.has_edge(u, v):
            graph[u][v]["weight"] += w
        else:
            graph.add_edge(u, v, weight=w)

    for layer in range(n_layers):
        resid_pre, resid_mid = cache[f"blocks.{layer}.hook_resid_pre"][0], cache[f"blocks.{layer}.hook_resid_mid"][0]
        parts = tool_decomposed_attn(model, cache, 0, layer).permute(1, 2, 0, 3)  # [key_pos, head, pos, d]
        flat = torch.cat([parts.flatten(0, 1), resid_pre[None]])
        contributions = tool_contributions(flat, resid_mid)
        c_attn = contributions[:-1].unflatten(0, parts.shape[:2]).permute(2, 0, 1)[None]  # [1, pos, key_pos, head]
        c_attn, c_resid = tool_threshold(threshold, c_attn, contributions[-1][None])
        source = (lambda t: f"I{layer - 1}_{t}") if layer else (lambda t: f"X0_{t}")
        for token_from in range(n_tokens):
            for token_to in range(n_tokens):
                add(source(token_from), f"A{layer}_{token_to}", c_attn[0, token_to, token_from].sum().item())
        for token in range(n_tokens):
            add(source(token), f"A{layer}_{token}", c_resid[0, token].item())
        mlp_out, resid_post = cache[f"blocks.{layer}.hook_mlp_out"][0], cache[f"blocks.{layer}.hook_resid_post"][0]
        c_ffn, c_resid_ffn = tool_contributions(torch.stack((mlp_out, resid_mid)), resid_post)
        c_ffn, c_resid_ffn = tool_threshold(threshold, c_ffn[None], c_resid_ffn[None])
        for token in range(n_tokens):
            add(f"A{layer}_{token}", f"M{layer}_{token}", c_ffn[0, token].item())
            add(f"M{layer}_{token}", f"I{layer}_{token}", c_ffn[0, token].item())
            add(f"A{layer}_{token}", f"I{layer}_{token}", c_resid_ffn[0, token].item())
    reverse = graph.reverse()
    search = nx.subgraph_view(reverse, filter_edge=lambda u, v: reverse[u][v]["weight"] > threshold)
    return [
        search.edge_subgraph(nx.edge_dfs(search, source=f"I{n_layers - 1}_{start}")).reverse()
        for start in range(n_tokens)
    ]
