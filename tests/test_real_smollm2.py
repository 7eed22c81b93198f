"""Every text analysis on a real pretrained model: SmolLM2-135M-Instruct (conftest's `smollm2`).

30 Llama blocks, 9 query heads sharing 3 key/value heads, RMSNorm (folded: RMSPre), rotary, gated
SiLU MLP. Each analysis is checked against an independent reference: a hand computation from
TransformerLens' run_with_cache, TransformerLens' own functions (ActivationCache decompositions,
transformer_lens.patching, detect_head), a forward started from a hand-edited residual stream
(``model(resid, start_at_layer=L)``) or conftest's by-hand block loop. The prompt is the IOI
sentence, which the model answers: logit(" Mary") - logit(" John") = 6.12.

Exact patching is compared with TransformerLens on sampled cells (one full forward per cell); the
attribution-patching estimate is compared with the exact grids by correlation (measured on this
model: resid_pre by layer_pos 0.854, z by layer_head 0.980, v by layer_head 0.978).
"""

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp
from conftest import blocks_by_hand
from reference.attribution import transformer_lens_neurons
from transformer_lens import head_detector

import lenskit
from lenskit import hooks, metrics, surgery, vocab

PROMPT = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
ANSWER, WRONG = " Mary", " John"
METRIC = metrics.logit_diff(ANSWER, WRONG)
CHANGED = 9  # the position where the two prompts differ (" John" / " Mary"; no BOS is prepended)


@pytest.fixture(scope="module")
def model(smollm2):
    assert all(not hp.fwd_hooks for hp in smollm2.hook_dict.values())
    yield smollm2
    assert all(not hp.fwd_hooks for hp in smollm2.hook_dict.values()), "a test left hooks on the shared model"


@pytest.fixture(scope="module")
def clean(model):
    return model.to_tokens(PROMPT)


@pytest.fixture(scope="module")
def corrupted(model):
    return model.to_tokens(CORRUPTED)


@pytest.fixture(scope="module")
def clean_run(model, clean):
    with torch.no_grad():
        return model.run_with_cache(clean)


@pytest.fixture(scope="module")
def corrupted_run(model, corrupted):
    with torch.no_grad():
        return model.run_with_cache(corrupted)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def logit_diff(model, logits: torch.Tensor) -> float:
    last = logits[0, -1]
    return (last[model.to_single_token(ANSWER)] - last[model.to_single_token(WRONG)]).item()


def close(actual, expected, atol=1e-4, rtol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, check_dtype=False)


def test_the_model_and_its_prompts(model, clean, corrupted, clean_run, corrupted_run):
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (30, 576, 9, 3, 64)
    assert clean.shape == corrupted.shape == (1, 14)
    assert (clean != corrupted).nonzero()[:, 1].tolist() == [CHANGED]
    assert logit_diff(model, clean_run[0]) == pytest.approx(6.12, abs=0.01)
    assert logit_diff(model, corrupted_run[0]) == pytest.approx(-5.49, abs=0.01)


# --- the hook vocabulary -------------------------------------------------------------------------


def test_cache_saves_what_run_with_cache_saves(model, clean, clean_run):
    h = hooks.cache(["blocks.*.attn.hook_[kvz]", "blocks.2?.hook_resid_post", "ln_final.hook_scale"])
    h.run(model, clean)
    _, cache = clean_run
    assert len(h.store) == 3 * 30 + 10 + 1
    for name, activation in h.store.items():
        assert torch.equal(activation, cache[name]), name
    assert h.store["blocks.4.attn.hook_k"].shape == (1, 14, 3, 64)  # key/value heads


def test_ablating_a_head_equals_attention_recomputed_from_z(model, clean, clean_run):
    """blocks.L.hook_attn_out with head h zeroed = sum over the other heads of z W_O, plus b_O."""
    _, cache = clean_run
    layer, head = 17, 4
    h = hooks.ablate(f"blocks.{layer}.attn.hook_z", head=head) + hooks.cache(f"blocks.{layer}.hook_attn_out")
    logits = h.run(model, clean)
    z = cache[f"blocks.{layer}.attn.hook_z"].clone()
    z[:, :, head] = 0
    attn = model.blocks[layer].attn
    by_hand = torch.einsum("bphd,hdm->bpm", z, attn.W_O) + attn.b_O
    close(h.store[f"blocks.{layer}.hook_attn_out"], by_hand)
    resid_mid = cache[f"blocks.{layer}.hook_resid_pre"] + by_hand  # the rest of the model from there
    mlp_out = model.blocks[layer].mlp(model.blocks[layer].ln2(resid_mid))
    close(logits, model(resid_mid + mlp_out, start_at_layer=layer + 1), atol=2e-4)


def test_mean_ablating_neurons_equals_the_mlp_recomputed_by_hand(model, clean, clean_run):
    _, cache = clean_run
    layer, neurons = 8, [3, 100, 1535]
    h = hooks.ablate(f"blocks.{layer}.mlp.hook_post", how="mean", neuron=neurons) + hooks.cache(
        f"blocks.{layer}.hook_mlp_out"
    )
    h.run(model, clean)
    post = cache[f"blocks.{layer}.mlp.hook_post"].clone()
    post[:, :, neurons] = post[:, :, neurons].mean((0, 1), keepdim=True)
    mlp = model.blocks[layer].mlp
    close(h.store[f"blocks.{layer}.hook_mlp_out"], post @ mlp.W_out + mlp.b_out)


def test_ablating_a_key_value_head_silences_its_three_query_heads(model, clean, clean_run):
    """Grouped-query attention: head=1 on hook_v is key/value head 1, read by query heads 3, 4, 5."""
    _, cache = clean_run
    layer = 12
    assert hooks.query_heads(model, 1) == [3, 4, 5]
    h = hooks.ablate(f"blocks.{layer}.attn.hook_v", head=1) + hooks.cache(f"blocks.{layer}.attn.hook_z")
    h.run(model, clean)
    v = cache[f"blocks.{layer}.attn.hook_v"].clone()
    v[:, :, 1] = 0
    z = torch.einsum("bhqk,bkhd->bqhd", cache[f"blocks.{layer}.attn.hook_pattern"], v.repeat_interleave(3, dim=2))
    close(h.store[f"blocks.{layer}.attn.hook_z"], z)
    assert (z[:, :, [3, 4, 5]] == 0).all()
    others = [0, 1, 2, 6, 7, 8]
    close(z[:, :, others], cache[f"blocks.{layer}.attn.hook_z"][:, :, others])
    with pytest.raises(
        ValueError, match=r"head 5 out of range: keys and values here have 3 key/value heads.*valid 0..2"
    ):
        hooks.ablate(f"blocks.{layer}.attn.hook_k", head=5).run(model, clean)


def test_patching_a_key_value_head_is_patching_its_query_heads_keys_ungrouped(model, clean, corrupted, clean_run):
    """Key/value head 2 of hook_k = the keys of query heads 6, 7, 8 after ungrouping (same model outputs)."""
    _, clean_cache = clean_run
    name = "blocks.14.attn.hook_k"
    grouped = hooks.patch(name, clean_cache, head=2).run(model, corrupted)
    grid = lenskit.patch(model, clean, corrupted, METRIC, site="k", by="layer_head", layers=[14], progress=False)
    assert grid.dims == ("layer", "kv_head") and grid.labels["kv_head"] == [0, 1, 2]
    assert grid.tensor[0, 2].item() == pytest.approx(logit_diff(model, grouped), abs=1e-4)
    model.set_ungroup_grouped_query_attention(True)
    try:
        ungrouped_clean = hooks.cache(name)
        ungrouped_clean.run(model, clean)
        assert ungrouped_clean.store[name].shape == (1, 14, 9, 64)
        close(ungrouped_clean.store[name], clean_cache[name].repeat_interleave(3, dim=2), atol=0, rtol=0)
        together = hooks.patch(name, ungrouped_clean.store, head=[6, 7, 8]).run(model, corrupted)
        close(together, grouped)
        alone = lenskit.patch(model, clean, corrupted, METRIC, site="k", by="layer_head", layers=[14], progress=False)
        assert alone.dims == ("layer", "head") and alone.labels["head"] == list(range(9))
        assert alone.tensor[0, 6].item() == pytest.approx(
            logit_diff(model, hooks.patch(name, ungrouped_clean.store, head=6).run(model, corrupted)), abs=1e-4
        )
    finally:
        model.set_ungroup_grouped_query_attention(False)


def test_patch_resample_and_add_equal_a_forward_from_the_edited_residual(
    model, clean, corrupted, clean_run, corrupted_run
):
    _, clean_cache = clean_run
    _, corrupted_cache = corrupted_run
    layer, name = 11, "blocks.11.hook_resid_pre"
    edited = corrupted_cache[name].clone()
    edited[:, CHANGED] = clean_cache[name][:, CHANGED]
    expected = model(edited, start_at_layer=layer)
    close(hooks.patch(name, clean_cache, pos=CHANGED).run(model, corrupted), expected)
    close(hooks.resample(name, clean_cache[name], pos=CHANGED, seed=3).run(model, corrupted), expected)  # one donor row
    assert logit_diff(model, expected) > 0  # the clean name at layer 11 brings the answer back

    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    steered = clean_cache[name].clone()
    steered[:, -1] += 4.0 * vector
    h = hooks.add(name, vector, pos=-1, scale=4.0) + hooks.cache(name)
    close(h.run(model, clean), model(steered, start_at_layer=layer))
    assert torch.equal(h.store[name], steered)


def test_skip_equals_the_block_loop_by_hand(model, clean):
    kept = [b for b in range(30) if b not in (3, 17, 29)]
    close(hooks.skip(model, [3, 17, -1]).run(model, clean), blocks_by_hand(model, clean, kept), atol=2e-4)


# --- residual stream, lens, attribution -----------------------------------------------------------


def test_residual_decomposition_sums_to_the_stream(model, clean, clean_run):
    _, cache = clean_run
    final = lenskit.decompose_residual(model, clean)
    assert final.labels["component"][:3] == ["hook_embed", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]
    assert len(final.labels["component"]) == 1 + 2 * 30  # rotary: no positional embedding component
    close(final.sum("component"), cache["blocks.29.hook_resid_post"], atol=1e-3)
    close(lenskit.decompose_residual(model, clean, layer=10).sum("component"), cache["blocks.10.hook_resid_pre"])


def test_the_lens_reads_every_layer_through_the_final_norm(model, clean, clean_run):
    logits, cache = clean_run
    lens = lenskit.logit_lens(model, clean, targets=[ANSWER, WRONG], progress=False)
    assert lens.layers == list(range(31)) and lens.top_strings[-1, 0, -1, 0] == ANSWER
    log_probs = logits.log_softmax(-1)[0]  # [pos, vocab]: the last row is the model's output
    close(lens.top_probs[-1, 0].log(), log_probs.topk(5).values, atol=1e-5)
    assert torch.equal(lens.top_ids[-1, 0], log_probs.topk(5).indices)
    close(lens.target_logits[-1, 0], logits[0][:, [model.to_single_token(ANSWER), model.to_single_token(WRONG)]])
    for layer in (0, 15, 22):  # any other layer: ln_final and W_U applied to resid_pre by hand
        by_hand = (model.ln_final(cache[f"blocks.{layer}.hook_resid_pre"]) @ model.W_U + model.b_U).softmax(-1)[0]
        close(lens.top_probs[layer, 0], by_hand.topk(5).values, atol=1e-5)


@pytest.mark.parametrize("by", ["layer", "head", "neuron", "position", "head_pos"])
def test_attribution_sums_to_the_logit_difference(model, clean_run, by):
    logits, _ = clean_run
    frame = lenskit.attribute(model, PROMPT, ANSWER, WRONG, by=by)
    assert frame.attrs["logit_diff"] == pytest.approx(logit_diff(model, logits), abs=1e-4)
    assert frame.value.sum() == pytest.approx(logit_diff(model, logits), abs=1e-4)  # measured within 2.2e-6


def test_attribution_equals_transformer_lens_decompositions(model, clean, clean_run):
    """Layers (decompose_resid), heads (stack_head_results) and sampled neurons (stack_neuron_results),
    through apply_ln_to_stack with the run's final scale (ActivationCache.logit_attrs)."""
    _, cache = clean_run

    def tl_attrs(stack):
        return cache.logit_attrs(stack, tokens=ANSWER, incorrect_tokens=WRONG, pos_slice=-1)[:, 0]

    stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    frame = lenskit.attribute(model, clean, ANSWER, WRONG, by="layer")
    for label, value in zip(labels, tl_attrs(stack)):
        if label == "embed":
            ours = frame[frame.component == "embed"].value.item()
        else:
            layer, kind = label.split("_")[:2]
            ours = frame[(frame.component == kind) & (frame.layer == int(layer))].value.item()
        assert ours == pytest.approx(value.item(), abs=1e-4), label

    heads = lenskit.attribute(model, clean, ANSWER, WRONG, by="head")
    ours = torch.tensor(heads[heads.component == "head"].sort_values(["layer", "head"]).value.to_numpy())
    close(ours, tl_attrs(cache.stack_head_results(layer=-1, pos_slice=-1)), atol=1e-4)
    top = heads.iloc[0]  # the largest part: a late head writing the name (measured 2.86)
    assert (top["component"], top["layer"], top["head"]) == ("head", 23, 3) and top.value == pytest.approx(
        2.855, abs=0.01
    )

    neurons = lenskit.attribute(model, clean, ANSWER, WRONG, by="neuron")
    sampled = [0, 77, 512, 1535]
    reference = transformer_lens_neurons(model, clean, ANSWER, WRONG, cache=cache, neurons=sampled)
    rows = neurons[(neurons.component == "neuron") & neurons.neuron.isin(sampled)]
    assert len(rows) == 30 * len(sampled)
    for row in rows.itertuples():
        assert row.value == pytest.approx(reference[f"L{row.layer}N{row.neuron}"], abs=1e-5)


def test_attribution_by_source_position_is_attention_times_projected_values(model, clean, clean_run):
    _, cache = clean_run
    frame = lenskit.attribute(model, clean, ANSWER, WRONG, by="head_pos")
    direction = model.W_U[:, model.to_single_token(ANSWER)] - model.W_U[:, model.to_single_token(WRONG)]
    scale = cache["ln_final.hook_scale"][0, -1]
    for layer in (5, 23):
        v = cache[f"blocks.{layer}.attn.hook_v"][0].repeat_interleave(3, dim=1)  # [src, head, d_head]
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, -1]  # [head, src]
        expected = torch.einsum("hs,shd,hdm,m->hs", pattern, v, model.W_O[layer], direction) / scale
        ours = frame[(frame.component == "head") & (frame.layer == layer)].sort_values(["head", "src_pos"]).value
        close(torch.tensor(ours.to_numpy()), expected.flatten(), atol=1e-5)
    by_position = lenskit.attribute(model, clean, ANSWER, WRONG, by="position")
    per_source = by_position[by_position.component == "attn_src"].sort_values("src_pos").value.to_numpy()
    summed = frame[frame.component == "head"].groupby("src_pos").value.sum().to_numpy()
    close(torch.tensor(per_source), torch.tensor(summed), atol=1e-4)


# --- patching ------------------------------------------------------------------------------------


def tl_cells(model, corrupted, clean_cache, site, setter, cells):
    """TransformerLens' generic_activation_patch on explicit cells (one full forward per cell)."""
    return tlp.generic_activation_patch(
        model,
        corrupted,
        clean_cache,
        METRIC.bind(model),
        setter,
        site,
        index_df=pd.DataFrame(cells[1], columns=cells[0]),
    )


@pytest.fixture(scope="module")
def exact_grids(model, clean, corrupted):
    return {
        (site, by): lenskit.patch(model, clean, corrupted, METRIC, site=site, by=by, progress=False)
        for site, by in [("resid_pre", "layer_pos"), ("z", "layer_head"), ("v", "layer_head")]
    }


def test_residual_patching_equals_transformer_lens_on_sampled_cells(model, corrupted, clean_run, exact_grids):
    grid = exact_grids["resid_pre", "layer_pos"]
    assert grid.dims == ("layer", "pos") and grid.shape == (30, 14) and grid.labels["pos"][CHANGED] == " John"
    assert grid.clean_value == pytest.approx(6.1196, abs=1e-3) and grid.corrupted_value == pytest.approx(
        -5.4853, abs=1e-3
    )
    cells = [
        (0, CHANGED),
        (6, CHANGED),
        (14, CHANGED),
        (21, CHANGED),
        (29, CHANGED),
        (16, 13),
        (25, 13),
        (29, 13),
        (10, 4),
    ]
    expected = tl_cells(
        model, corrupted, clean_run[1], "resid_pre", tlp.layer_pos_patch_setter, (["layer", "pos"], cells)
    )
    close(grid.tensor[tuple(torch.tensor(cells).T)], expected, atol=1e-4)
    assert grid.tensor[0, CHANGED] == pytest.approx(grid.clean_value, abs=1e-4)  # layer 0: the clean run
    assert grid.tensor[10, 4] == grid.corrupted_value  # the prompts agree there: nothing changes


def test_head_patching_equals_transformer_lens_on_sampled_cells(model, clean, corrupted, clean_run, exact_grids):
    """z cells by (layer, head, pos), and k / v by (layer, kv_head, pos): patching a key/value head."""
    _, clean_cache = clean_run
    for site, heads in (("z", [0, 4, 8]), ("k", [0, 2]), ("v", [1, 2])):
        layers, positions = [9, 14, 23], [CHANGED, 13]
        grid = lenskit.patch(
            model,
            clean,
            corrupted,
            METRIC,
            site=site,
            by="layer_head_pos",
            layers=layers,
            heads=heads,
            positions=positions,
            progress=False,
        )
        head_dim = "head" if site == "z" else "kv_head"
        assert grid.dims == ("layer", head_dim, "pos") and grid.labels[head_dim] == heads
        cells = [(layer, pos, head) for layer in layers for pos in positions for head in heads][::2]
        expected = tl_cells(
            model,
            corrupted,
            clean_cache,
            site,
            tlp.layer_pos_head_vector_patch_setter,
            (["layer", "pos", "head_index"], cells),
        )
        ours = [grid.tensor[layers.index(layer), heads.index(head), positions.index(pos)] for layer, pos, head in cells]
        close(torch.stack(ours), expected, atol=1e-4)
    by_kv_head = exact_grids["v", "layer_head"]
    assert by_kv_head.dims == ("layer", "kv_head") and by_kv_head.labels["kv_head"] == [0, 1, 2]
    cells = [(9, 0), (9, 2), (23, 1)]
    expected = tl_cells(
        model, corrupted, clean_cache, "v", tlp.layer_head_vector_patch_setter, (["layer", "head_index"], cells)
    )
    close(by_kv_head.tensor[tuple(torch.tensor(cells).T)], expected, atol=1e-4)
    with pytest.raises(
        ValueError, match=r"head 5 out of range for site 'v': this grouped-query model has 3 key/value heads"
    ):
        lenskit.patch(model, clean, corrupted, METRIC, site="v", by="layer_head", heads=[5], progress=False)


@pytest.mark.parametrize(
    "site, by, measured", [("resid_pre", "layer_pos", 0.854), ("z", "layer_head", 0.980), ("v", "layer_head", 0.978)]
)
def test_attribution_patching_correlates_with_exact_patching(model, clean, corrupted, exact_grids, site, by, measured):
    exact = exact_grids[site, by]
    estimate = lenskit.attribution_patch(model, clean, corrupted, METRIC, site=site, by=by)
    assert estimate.dims == exact.dims and estimate.corrupted_value == pytest.approx(exact.corrupted_value, abs=1e-4)
    correlation = torch.corrcoef(torch.stack([exact.tensor.flatten(), estimate.tensor.flatten()]))[0, 1].item()
    assert correlation > measured - 0.02, f"correlation {correlation:.3f}, measured {measured}"


# --- flow, head detectors, surgery -----------------------------------------------------------------


def proximity(parts, whole):
    return (whole.abs().sum(-1) - (whole - parts).abs().sum(-1)).clamp(min=0)


def test_flow_shares_sum_to_one_and_parts_to_the_stream(model, clean_run):
    """Every node's incoming shares sum to 1, except where every part has proximity 0 (all shares 0):
    on this prompt one node, resid_post of block 10 at " the", where the MLP writes -276 on the
    massive-activation dimension 507 against resid_mid's +323, so that removing either part brings
    the stream closer to 0 (proximities -111 and -230 before clamping)."""
    _, cache = clean_run
    graph = lenskit.flow(model, PROMPT, progress=False)
    routes = graph.routes
    n_nodes = len(graph.rows) * graph.n_pos
    into = torch.zeros(n_nodes, dtype=torch.float64).index_add_(0, routes.target, routes.share.double())
    into = into.view(len(graph.rows), graph.n_pos)
    totals = torch.zeros_like(into)  # the dense float64 reference: the sum of every part's proximity
    for layer in range(30):
        get = lambda name: cache[f"blocks.{layer}.{name}"][0].double()  # noqa: E731
        whole = get("hook_resid_mid")
        v = get("attn.hook_v").repeat_interleave(3, dim=1)
        sources = torch.einsum("jhe,hed->jhd", v, model.W_O[layer].double()) + model.b_O[layer].double() / 9
        parts = get("attn.hook_pattern").permute(1, 2, 0)[..., None] * sources  # [pos, src, head, d_model]
        heads = proximity(parts, whole[:, None, None])
        total = heads.sum((1, 2)) + proximity(get("hook_resid_pre"), whole)
        close(graph.head_shares[layer].double(), heads / total[:, None, None], atol=1e-5)
        totals[graph.row("resid_mid", layer)] = total
        totals[graph.row("resid_post", layer)] = proximity(get("hook_mlp_out"), get("hook_resid_post")) + proximity(
            whole, get("hook_resid_post")
        )
    has_parts = totals[1:] > 0
    close(into[1:][has_parts], torch.ones_like(into[1:][has_parts]), atol=1e-5)
    assert (into[1:][~has_parts] == 0).all()
    assert [(graph.rows[row + 1], pos) for row, pos in (~has_parts).nonzero().tolist()] == [(("resid_post", 10), 6)]
    for layer in (0, 23):
        attention = graph.decompose(layer, -1, "resid_mid")
        close(attention.parts.tensor.sum(0), cache[f"blocks.{layer}.hook_resid_mid"][0, -1], atol=1e-3)
        assert attention.shares.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert graph.edges.target_position.max() == graph.n_pos - 1 and len(graph.edges) > 0


def test_head_detectors_equal_transformer_lens(model):
    text = "The cat sat on the mat with a hat. The cat sat on the mat with a hat."
    best = {}
    for kind in ("previous_token", "duplicate_token", "induction"):
        expected = head_detector.detect_head(model, text, f"{kind}_head")
        scores = vocab.head_scores(model, text, kind, progress=False)
        assert scores.dims == ("layer", "head") and scores.shape == (30, 9)
        close(scores.tensor, expected, atol=1e-5, rtol=0)
        best[kind] = (*divmod(int(scores.tensor.argmax()), 9), round(scores.tensor.max().item(), 2))
    # measured: a strong previous-token head, weaker duplicate-token and induction heads on this text
    assert best == {"previous_token": (16, 0, 0.78), "duplicate_token": (14, 3, 0.31), "induction": (17, 4, 0.28)}


@pytest.mark.parametrize(
    "schedule",
    [
        surgery.skip_last(30, 4),
        surgery.skip_range(30, 10, 13),
        surgery.repeat(30, 7, times=3),
        surgery.sequence([*range(10), 11, 10, *range(12, 30)], "swap 10 and 11"),
    ],
    ids=lambda s: s.name,
)
def test_surgery_equals_the_block_loop_by_hand(model, clean, schedule):
    close(surgery.run(model, clean, schedule), blocks_by_hand(model, clean, schedule.blocks), atol=2e-4)
