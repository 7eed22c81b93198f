"""lenskit.flow against hand computations from TransformerLens' run_with_cache.

The reference shares below materialise every part densely (pattern * (v @ W_O + b_O / n_heads)
for each target, source and head) in float64 and apply the proximity definition directly, so
they share no code with lenskit's exact sparse computation.
"""

import networkx as nx
import pytest
import torch
from conftest import STORIES_DIR, make_model
from headless_chromium import CHROMIUM, Chromium
from reference.flow import proximity, tool_decomposed_attn  # the definition; the LM Transparency Tool's method

import lenskit
from lenskit import backend
from lenskit.flow import FlowGraph, flow, head_source_proximity

pytestmark = pytest.mark.both_backends

KINDS = {
    "gpt2": {},
    "llama": {},
    "neox": {},
    # GPT-J's layout as TransformerLens converts it: parallel attention and MLP, rotary on adjacent pairs
    "gptj": dict(rotary_adjacent_pairs=True, act_fn="gelu_new", rotary_dim=4),
    "attn_only": dict(attn_only=True),
}


def build(kind: str):
    base = {"gptj": "neox", "attn_only": "gpt2"}.get(kind, kind)
    return make_model(base, seed=3, **KINDS[kind])


@pytest.fixture(scope="module", params=list(KINDS))
def model(request):
    return build(request.param)


@pytest.fixture(scope="module")
def gpt2():
    return build("gpt2")


@pytest.fixture(scope="module")
def batch():
    """[batch=3, pos=9] token ids valid for every model here."""
    return torch.randint(0, 89, (3, 9), generator=torch.Generator().manual_seed(5))


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def stories():
    if not STORIES_DIR.exists():
        pytest.skip(f"stories260K is not present at {STORIES_DIR}")
    return lenskit.load(STORIES_DIR)


# --- the reference: dense parts from run_with_cache ----------------------------------------------


def sequential(model) -> bool:
    return not (model.cfg.parallel_attn_mlp or model.cfg.attn_only)


def head_parts(model, cache, layer, row=0):
    """pattern[h, i, j] * (v[j, h] @ W_O[h] + b_O / n_heads) as [i, j, h, d_model], float64."""
    cfg, attn = model.cfg, model.blocks[layer].attn
    v = cache[f"blocks.{layer}.attn.hook_v"][row].double()
    v = torch.repeat_interleave(v, cfg.n_heads // v.shape[1], dim=1)  # grouped-query heads, as TL repeats them
    per_source = (
        torch.einsum("jhe,hed->jhd", v, attn.W_O.double())
        + backend.bias(attn, "b_O", (cfg.d_model,)).double() / cfg.n_heads
    )
    return cache[f"blocks.{layer}.attn.hook_pattern"][row].double().permute(1, 2, 0)[..., None] * per_source


def reference(model, cache, layer, row=0):
    """Reference shares of one layer: heads [i, j, h] and a dict of per-position edge shares [i]."""
    get = lambda name: cache[f"blocks.{layer}.{name}"][row].double()  # noqa: E731
    whole = get("hook_resid_mid" if sequential(model) else "hook_resid_post")
    others = {"attn_residual": get("hook_resid_pre")}
    if model.cfg.parallel_attn_mlp:
        others["mlp"] = get("hook_mlp_out")
    heads = proximity(head_parts(model, cache, layer, row), whole[:, None, None])
    rest = {name: proximity(part, whole) for name, part in others.items()}
    total = heads.sum((1, 2)) + sum(rest.values())
    shares = {name: value / total for name, value in rest.items()}
    if sequential(model):
        mlp = proximity(get("hook_mlp_out"), get("hook_resid_post"))
        resid = proximity(get("hook_resid_mid"), get("hook_resid_post"))
        shares |= {"mlp": mlp / (mlp + resid), "mlp_residual": resid / (mlp + resid)}
    return heads / total[:, None, None], shares


def reference_edges(model, cache, row=0):
    """{(source node, target node, kind): share} of every edge, nodes as (kind, layer, position)."""
    edges = {}
    n_pos = cache["blocks.0.hook_resid_pre"].shape[1]
    attention_kind = "resid_mid" if sequential(model) else "resid_post"
    for layer in range(model.cfg.n_layers):
        source = ("resid_pre", 0) if layer == 0 else ("resid_post", layer - 1)
        heads, shares = reference(model, cache, layer, row)
        for i in range(n_pos):
            for j in range(i + 1):
                edges[((*source, j), (attention_kind, layer, i), "attention")] = heads[i, j].sum().item()
            edges[((*source, i), (attention_kind, layer, i), "residual")] = shares["attn_residual"][i].item()
            if model.cfg.parallel_attn_mlp:
                edges[((*source, i), ("resid_post", layer, i), "mlp")] = shares["mlp"][i].item()
            elif sequential(model):
                edges[(("resid_mid", layer, i), ("resid_post", layer, i), "mlp")] = shares["mlp"][i].item()
                edges[(("resid_mid", layer, i), ("resid_post", layer, i), "residual")] = shares["mlp_residual"][
                    i
                ].item()
    return edges


def reached(edges, top) -> set:
    """The edges (source, target, kind) from which `top` can be reached, found by networkx."""
    graph = nx.MultiDiGraph()
    graph.add_edges_from(edges)
    nodes = nx.ancestors(graph, top) | {top}
    return {edge for edge in edges if edge[1] in nodes}


def graph_edges(graph: FlowGraph) -> dict:
    frame = graph.edges
    return {
        (
            (r.source_kind, r.source_layer, r.source_position),
            (r.target_kind, r.target_layer, r.target_position),
            r.kind,
        ): r.weight
        for r in frame.itertuples()
    }


# --- exactness of the parts --------------------------------------------------------------------


def test_attention_parts_sum_exactly_to_resid_mid_with_every_bias(gpt2, batch):
    for name in ("b_V", "b_O"):
        assert all(getattr(block.attn, name).abs().min() > 0 for block in gpt2.blocks)  # biases really are non-zero
    graph = flow(gpt2, batch[0], progress=False)
    _, cache = gpt2.run_with_cache(batch[0])
    for layer in range(gpt2.cfg.n_layers):
        heads = cache.stack_head_results(layer=layer + 1)[-gpt2.cfg.n_heads :, 0]  # [head, pos, d_model], no b_O
        for pos in (0, 4, 8):
            parts = graph.decompose(layer, pos, "resid_mid")
            torch.testing.assert_close(
                parts.parts.tensor.sum(0), cache[f"blocks.{layer}.hook_resid_mid"][0, pos], atol=1e-5, rtol=0
            )
            per_head = parts.parts.tensor[1:].reshape(pos + 1, gpt2.cfg.n_heads, -1).sum(0)  # summed over sources
            torch.testing.assert_close(
                per_head, heads[:, pos] + gpt2.blocks[layer].attn.b_O / gpt2.cfg.n_heads, atol=1e-5, rtol=0
            )
            assert parts.shares.sum().item() == pytest.approx(1, abs=1e-6)


def test_the_reference_tools_parts_miss_exactly_b_V_once_and_b_O(gpt2, batch):
    """The LM Transparency Tool adds b_V to hook_v (which holds it already) and drops b_O."""
    _, cache = gpt2.run_with_cache(batch[0])
    for layer in range(gpt2.cfg.n_layers):
        attn = gpt2.blocks[layer].attn
        tool_sum = tool_decomposed_attn(gpt2, cache, 0, layer).sum((1, 2))  # [pos, d_model]
        attn_out = cache[f"blocks.{layer}.hook_attn_out"][0]
        expected_error = torch.einsum("he,hed->d", attn.b_V, attn.W_O) - attn.b_O
        torch.testing.assert_close(tool_sum - attn_out, expected_error.expand_as(attn_out), atol=1e-5, rtol=0)
        assert expected_error.abs().sum() > 0.1


def test_mlp_parts_and_neurons_sum_exactly_to_resid_post(batch):
    for kind in ("gpt2", "llama", "neox"):
        model = build(kind)
        graph = flow(model, batch[1], progress=False)
        _, cache = model.run_with_cache(batch[1])
        for layer in range(model.cfg.n_layers):
            resid_post = cache[f"blocks.{layer}.hook_resid_post"][0, 6]
            whole = graph.decompose(layer, 6, "resid_post")
            by_neuron = graph.decompose(layer, 6, "resid_post", neurons=True)
            for parts in (whole, by_neuron):
                torch.testing.assert_close(parts.parts.tensor.sum(0), resid_post, atol=1e-5, rtol=0)
            # neuron n's part by hand: its activation times its W_out row, plus b_out / d_mlp
            mlp = model.blocks[layer].mlp
            post = cache[f"blocks.{layer}.mlp.hook_post"][0, 6]
            neurons = post[:, None] * mlp.W_out + backend.bias(mlp, "b_out", mlp.W_out.shape[-1:]) / len(post)
            first = by_neuron.parts.labels["part"].index("neuron 0")
            torch.testing.assert_close(by_neuron.parts.tensor[first:], neurons, atol=1e-6, rtol=0)
            expected = proximity(by_neuron.parts.tensor.double(), resid_post.double())
            torch.testing.assert_close(by_neuron.shares.double(), expected / expected.sum(), atol=1e-5, rtol=0)
            top = graph.top_neurons(layer, 6, k=3)
            assert top["neuron"].tolist() == (expected[first:] / expected.sum()).topk(3).indices.tolist()


# --- the shares and the graph --------------------------------------------------------------------


def test_shares_equal_the_dense_reference_on_every_layout(model, batch):
    graph = flow(model, batch, batch=2, threshold=0.0, renormalize=False, progress=False)
    _, cache = model.run_with_cache(batch)
    for layer in range(model.cfg.n_layers):
        heads, _ = reference(model, cache, layer, row=2)
        torch.testing.assert_close(graph.head_shares[layer].double(), heads, atol=1e-5, rtol=0)
    expected = {key: share for key, share in reference_edges(model, cache, row=2).items() if share > 0}
    found = graph_edges(graph)  # threshold 0: every edge with a share that the last position reaches
    assert found.keys() == reached(expected, ("resid_post", model.cfg.n_layers - 1, 8))
    for key, weight in found.items():
        assert weight == pytest.approx(expected[key], abs=1e-5), key


def test_threshold_renormalizes_per_node_and_position_and_prunes_to_what_the_target_reaches(gpt2, batch):
    _, cache = gpt2.run_with_cache(batch[1])
    threshold = 0.1
    kept = {key: share for key, share in reference_edges(gpt2, cache).items() if share >= threshold}
    totals = {}
    for (_, target, _), share in kept.items():
        totals[target] = totals.get(target, 0) + share
    for target_pos in (8, 5):
        graph = flow(gpt2, batch[1], threshold=threshold, target_pos=target_pos, progress=False)
        top = ("resid_post", gpt2.cfg.n_layers - 1, target_pos)
        edges = reached(kept, top)
        assert set(graph.nodes[["kind", "layer", "position"]].itertuples(index=False, name=None)) == {top} | {
            source for source, _, _ in edges
        }
        found = graph_edges(graph)
        assert found.keys() == edges
        for (source, target, kind), weight in found.items():
            assert weight == pytest.approx(kept[(source, target, kind)] / totals[target], abs=1e-5)
        frame = graph.edges
        assert frame.groupby(
            ["target_kind", "target_layer", "target_position"]
        ).weight.sum().to_numpy() == pytest.approx(
            1, abs=1e-6
        )  # each node and position on its own, not summed over tokens


def test_node_weights_are_the_flow_from_the_target(gpt2, batch):
    graph = flow(gpt2, batch[0], threshold=0.0, progress=False)
    nodes = graph.nodes.set_index(["kind", "layer", "position"]).weight
    assert nodes[("resid_post", gpt2.cfg.n_layers - 1, 8)] == 1
    assert nodes.loc["resid_pre"].sum() == pytest.approx(1, abs=1e-5)  # no dead end: all of it reaches the embeddings
    edges = graph.edges
    # a node's weight is what flows out of it into the traced graph
    outflow = edges.groupby(["source_kind", "source_layer", "source_position"]).flow.sum()
    for key, value in outflow.items():
        assert nodes[key] == pytest.approx(value, abs=1e-6)


def test_trace_and_threshold_views_reuse_the_shares(gpt2, batch):
    graph = flow(gpt2, batch[0], threshold=0.05, progress=False)
    again = flow(gpt2, batch[0], threshold=0.05, target_pos=3, progress=False)
    assert graph.trace(3).edges.equals(again.edges)
    assert graph.trace(-1).target_pos == 8


def test_batch_index_selects_the_row(batch):
    model = build("llama")
    picked = flow(model, batch, batch=1, progress=False)
    alone = flow(model, batch[1], progress=False)
    torch.testing.assert_close(picked.head_shares, alone.head_shares)
    assert picked.edges.equals(alone.edges)
    other = flow(model, batch, batch=2, progress=False)
    assert not torch.allclose(picked.head_shares, other.head_shares)


def test_heads_for_splits_an_edge_into_its_heads(gpt2, batch):
    graph = flow(gpt2, batch[0], progress=False)
    edges = graph.edges
    attention = edges[edges.kind == "attention"]
    _, cache = gpt2.run_with_cache(batch[0])
    for _, edge in attention.head(5).iterrows():
        heads = graph.heads_for(edge)
        assert heads.weight.sum() == pytest.approx(edge.weight, abs=1e-6)
        assert heads["head"].iloc[0] == edge["head"]
        reference_heads, _ = reference(gpt2, cache, int(edge.layer))
        expected = reference_heads[edge.target_position, edge.source_position]
        assert heads.sort_values("head").share.to_numpy() == pytest.approx(expected.numpy(), abs=1e-5)
    assert graph.heads_for((1, 2, 5)).share.sum() == pytest.approx(
        reference(gpt2, cache, 1)[0][5, 2].sum().item(), abs=1e-5
    )
    with pytest.raises(ValueError, match="'residual' edge has no heads"):
        graph.heads_for(edges[edges.kind == "residual"].iloc[0])


def test_top_tokens_of_nodes_and_head_outputs(gpt2, batch):
    graph = flow(gpt2, batch[0], progress=False)
    logits, cache = gpt2.run_with_cache(batch[0])
    final = graph.top_tokens(gpt2.cfg.n_layers - 1, 8, k=4)
    promoted = final[final.kind == "promoted"]
    assert promoted.token_id.tolist() == logits[0, 8].topk(4).indices.tolist()
    assert promoted.value.to_numpy() == pytest.approx(logits[0, 8].topk(4).values.numpy(), abs=1e-4)
    # head 2 of layer 1 at position 5: z @ W_O, centred, divided by the final scale, times ln_final.w, @ W_U
    output = cache["blocks.1.attn.hook_z"][0, 5, 2] @ gpt2.blocks[1].attn.W_O[2]
    direct = ((output - output.mean()) / cache["ln_final.hook_scale"][0, 5]) * gpt2.ln_final.w @ gpt2.W_U
    head = graph.top_tokens(1, 5, "attn_out", head=2, k=3)
    assert head[head.kind == "promoted"].value.to_numpy() == pytest.approx(
        direct.topk(3).values.detach().numpy(), abs=1e-4
    )
    mlp = graph.top_tokens(0, 5, "mlp_out", k=2)
    out = cache["blocks.0.hook_mlp_out"][0, 5]
    direct = ((out - out.mean()) / cache["ln_final.hook_scale"][0, 5]) * gpt2.ln_final.w @ gpt2.W_U
    assert mlp[mlp.kind == "promoted"].token_id.tolist() == direct.topk(2).indices.tolist()


@pytest.mark.needs_tl3("llama2.c checkpoints build a HookedTransformerConfig")
def test_grouped_query_attention_on_stories260K(stories):
    tokens = stories.to_tokens("Once upon a time, there was a little girl named Lily.")
    graph = flow(stories, tokens, progress=False)
    _, cache = stories.run_with_cache(tokens)
    assert stories.cfg.n_key_value_heads < stories.cfg.n_heads
    for layer in range(stories.cfg.n_layers):
        heads, _ = reference(stories, cache, layer)
        torch.testing.assert_close(graph.head_shares[layer].double(), heads, atol=1e-5, rtol=0)
        parts = graph.decompose(layer, -1, "resid_mid").parts.tensor
        torch.testing.assert_close(parts.sum(0), cache[f"blocks.{layer}.hook_resid_mid"][0, -1], atol=1e-4, rtol=1e-5)
    assert graph.nodes.kind.iloc[0] == "resid_pre" and len(graph.edges)


# --- the exact sparse computation on its own -------------------------------------------------------


@pytest.mark.parametrize("d_model, scale", [(64, 1.0), (64, 20.0), (6, 1.0)])
def test_head_source_proximity_is_exact(d_model, scale):
    """Against the dense definition: small and large residuals (many or few corrected coordinates),
    zeros in the residual, bidirectional attention, and a d_model below the smallest block size."""
    generator = torch.Generator().manual_seed(d_model)
    n_pos, n_heads = 23, 3
    whole = scale * torch.randn(n_pos, d_model, generator=generator, dtype=torch.float64)
    whole[:, :2] = 0
    sources = torch.randn(n_pos, n_heads, d_model, generator=generator, dtype=torch.float64)
    pattern = torch.rand(n_heads, n_pos, n_pos, generator=generator, dtype=torch.float64)
    pattern[0] = pattern[0].tril()  # one causal head, two attending everywhere
    pattern = pattern / pattern.sum(-1, keepdim=True)
    dense = proximity(pattern.permute(1, 2, 0)[..., None] * sources, whole[:, None, None])
    fast = head_source_proximity(whole, sources, pattern, budget=4096, block=5)
    torch.testing.assert_close(fast, dense, atol=1e-10, rtol=0)
    assert (dense > 0).any() and (dense == 0).any()


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.needs_tl3(
    "it builds a model with use_normalization_before_and_after, which no Hugging Face architecture of the test shapes has"
)
def test_bad_input_raises_value_errors_naming_the_problem(gpt2, batch):
    with pytest.raises(ValueError, match=r"batch 3 out of range: there are 3"):
        flow(gpt2, batch, batch=3, progress=False)
    with pytest.raises(ValueError, match=r"target_pos 9 out of range"):
        flow(gpt2, batch[0], target_pos=9, progress=False)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\)"):
        flow(gpt2, batch[0], threshold=1.5, progress=False)
    with pytest.raises(ValueError, match=r"token ids \[500\] are outside the vocabulary"):
        flow(gpt2, torch.tensor([1, 500]), progress=False)
    unsupported = make_model("llama", use_normalization_before_and_after=True)
    with pytest.raises(ValueError, match="use_normalization_before_and_after"):
        flow(unsupported, batch[0], progress=False)
    graph = flow(gpt2, batch[0], progress=False)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        graph.top_neurons(3, 0)
    with pytest.raises(ValueError, match="head 4 out of range"):
        graph.top_tokens(0, 0, "attn_out", head=4)
    with pytest.raises(ValueError, match="resid_pre is not a sum of parts"):
        graph.decompose(1, 0, "resid_pre")
    parallel = flow(build("neox"), batch[0], progress=False)
    with pytest.raises(ValueError, match="no resid_mid node at layer 0"):
        parallel.decompose(0, 0, "resid_mid")
    with pytest.raises(ValueError, match="attention-only"):
        flow(build("attn_only"), batch[0], progress=False).top_neurons(0, 0)
    assert all(not hook._forward_hooks for hook in gpt2.hook_dict.values())  # nothing left registered


# --- the picture ------------------------------------------------------------------------------


def test_the_page_holds_the_graph_and_needs_no_network(word_model, tmp_path):
    graph = flow(word_model, "the cat sat on a mat", progress=False)
    page = graph.save_html(tmp_path / "routes.html", k=3).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" in page
    assert "src=" not in page and "href=" not in page and "https:" not in page
    assert (
        '"tokens": ["\\u003cbos\\u003e", "the", "cat", "sat", "on", "a", "mat"]' in page
    )  # "<" escaped inside <script>
    figure = graph.plot(positions=[2, 6])
    assert '"targets": [2, 6]' in figure.html and '"selected": 6' in figure.html


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_the_page_works_in_headless_chromium(word_model, tmp_path):
    graph = flow(word_model, "the cat sat on a mat and the dog ran", progress=False)
    path = graph.save_html(tmp_path / "routes.html", k=3)
    edges = graph.edges
    with Chromium() as browser:
        tab = browser.open(path)
        tab.wait_for("document.querySelector('.lenskit-routes')?.getAttribute('data-ready')")
        shown = tab.evaluate(
            "[...document.querySelectorAll('path[data-edge]')].filter(e => e.style.display !== 'none').length"
        )
        assert shown == len(edges)  # the traced graph is the one FlowGraph.edges lists
        pixels = tab.screenshot().astype(float)
        assert (pixels[..., :3].std(axis=(0, 1)) > 10).all() and (pixels[..., :3] < 200).any(axis=-1).mean() > 0.005
        # clicking an attention edge lists its heads, clicking a node its top tokens
        click = (
            "(s => {{ const e = document.querySelector(s); e.dispatchEvent(new MouseEvent('click', {{bubbles: true}})); "
            "return document.querySelector('.lenskit-info').innerText; }})('{}')"
        )
        edge = edges[edges.kind == "attention"].iloc[0]
        index = tab.evaluate(
            "(() => { const d = JSON.parse(document.querySelector('script.lenskit-data').textContent);"
            f" return d.edges.findIndex(e => e.kind === 'attention' && e.source[1] === {edge.source_position}"
            f" && e.target[1] === {edge.target_position} && e.title === 'L{edge.layer} attention'); }})()"
        )
        text = tab.evaluate(click.format(f'path[data-edge="{index}"]'))
        assert f"head {graph.heads_for(edge)['head'].iloc[0]}" in text
        top = graph.top_tokens(graph.model.cfg.n_layers - 1, 10, k=3)
        final_row = len(graph.rows) - 1
        text = tab.evaluate(click.format(f'circle[data-node="{final_row},10"]'))
        assert top.token.iloc[0] in text and "flow 1.0000" in text
        # another traced position shows that position's graph
        tab.evaluate(
            "(() => { const s = document.querySelector('.lenskit-routes select'); s.value = '4';"
            " s.dispatchEvent(new Event('change')); })()"
        )
        shown = tab.evaluate(
            "[...document.querySelectorAll('path[data-edge]')].filter(e => e.style.display !== 'none').length"
        )
        assert shown == len(graph.trace(4).edges)
        assert tab.requests == [path.resolve().as_uri()]
        assert tab.errors == []
