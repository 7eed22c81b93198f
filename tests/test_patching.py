"""Exact and attribution patching, checked against transformer_lens.patching and hand computations.

Every exact grid is compared with TransformerLens' own patching functions (one full forward per
cell, no shortcut), within 1e-5, on gpt2-, llama- (GQA, RMSNorm, rotary, gated MLP) and
neox-shaped (parallel attention and MLP) models with random weights, batch 3.
"""

from functools import partial

import pytest
import torch
import transformer_lens.patching as tlp
import transformers
from conftest import STORIES_DIR, make_model, word_tokenizer

import lenskit
from lenskit import metrics
from lenskit.patching import SITES, PatchResult, attribution_patch, patch

pytestmark = pytest.mark.both_backends

ATOL = 1e-5
KINDS = ["gpt2", "llama", "neox"]


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def model(kind):
    return make_model(kind)


def pair(model, kind: str = "minimal", batch: int = 3, n_pos: int = 7, seed: int = 0):
    """Clean and corrupted tokens: differing at two positions ("minimal") or everywhere ("random")."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=generator)
    if kind == "random":
        return clean, torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=generator)
    corrupted = clean.clone()
    for p in (2, 4):
        corrupted[:, p] = (
            clean[:, p] + 1 + torch.randint(0, model.cfg.d_vocab - 1, (batch,), generator=generator)
        ) % model.cfg.d_vocab
    return clean, corrupted


def tl_grid(tl_function, model, clean, corrupted, metric):
    """A TransformerLens patching function's grid, with the metric bound as lenskit binds it."""
    clean_logits, clean_cache = model.run_with_cache(clean)
    bound = metric.bind(model, clean, clean_logits) if isinstance(metric, metrics.Metric) else metric
    return tl_function(model, corrupted, clean_cache, bound)


def no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


LOGIT_DIFF = metrics.logit_diff([1, 2, 3], 5)

# (site, by, TransformerLens function, permutation from TL's layout to lenskit's)
TL_FUNCTIONS = [
    ("resid_pre", "layer_pos", tlp.get_act_patch_resid_pre, None),
    ("resid_mid", "layer_pos", tlp.get_act_patch_resid_mid, None),
    ("attn_out", "layer_pos", tlp.get_act_patch_attn_out, None),
    ("mlp_out", "layer_pos", tlp.get_act_patch_mlp_out, None),
    ("z", "layer_head_pos", tlp.get_act_patch_attn_head_out_by_pos, (0, 2, 1)),
    ("q", "layer_head_pos", tlp.get_act_patch_attn_head_q_by_pos, (0, 2, 1)),
    ("k", "layer_head_pos", tlp.get_act_patch_attn_head_k_by_pos, (0, 2, 1)),
    ("v", "layer_head_pos", tlp.get_act_patch_attn_head_v_by_pos, (0, 2, 1)),
    ("z", "layer_head", tlp.get_act_patch_attn_head_out_all_pos, None),
    ("q", "layer_head", tlp.get_act_patch_attn_head_q_all_pos, None),
    ("k", "layer_head", tlp.get_act_patch_attn_head_k_all_pos, None),
    ("v", "layer_head", tlp.get_act_patch_attn_head_v_all_pos, None),
    ("pattern", "layer_head", tlp.get_act_patch_attn_head_pattern_all_pos, None),
    ("pattern", "layer_head_pos", tlp.get_act_patch_attn_head_pattern_by_pos, None),
]


@pytest.mark.parametrize(
    "site, by, tl_function, permutation", TL_FUNCTIONS, ids=[f"{s}-{b}" for s, b, *_ in TL_FUNCTIONS]
)
def test_equals_transformer_lens(model, site, by, tl_function, permutation):
    clean, corrupted = pair(model)
    if site == "resid_mid" and model.cfg.parallel_attn_mlp:
        with pytest.raises(ValueError, match="site 'resid_mid' does not exist in this model"):
            patch(model, clean, corrupted, LOGIT_DIFF, site=site, by=by, progress=False)
        return
    expected = tl_grid(tl_function, model, clean, corrupted, LOGIT_DIFF)
    expected = expected if permutation is None else expected.permute(*permutation)
    result = patch(model, clean, corrupted, LOGIT_DIFF, site=site, by=by, progress=False)
    torch.testing.assert_close(result.tensor, expected, rtol=0, atol=ATOL)
    assert no_hooks_left(model)


@pytest.mark.parametrize(
    "site, by, tl_function, permutation",
    [TL_FUNCTIONS[i] for i in (0, 4, 10, 13)],
    ids=["resid_pre", "z-by-pos", "k-all-pos", "pattern-by-pos"],
)
def test_equals_transformer_lens_when_every_position_differs(model, site, by, tl_function, permutation):
    """No cell can be left out and every run starts at position 0."""
    clean, corrupted = pair(model, "random")
    expected = tl_grid(tl_function, model, clean, corrupted, LOGIT_DIFF)
    expected = expected if permutation is None else expected.permute(*permutation)
    result = patch(model, clean, corrupted, LOGIT_DIFF, site=site, by=by, progress=False)
    torch.testing.assert_close(result.tensor, expected, rtol=0, atol=ATOL)


def test_pattern_entries_and_other_sites_via_generic_patch(model):
    """Granularities TransformerLens has no named function for, via its generic_activation_patch."""
    clean, corrupted = pair(model, n_pos=5)
    dest_src = tl_grid(tlp.get_act_patch_attn_head_pattern_dest_src_pos, model, clean, corrupted, LOGIT_DIFF)
    result = patch(model, clean, corrupted, LOGIT_DIFF, site="pattern", by="layer_head_dest_src", progress=False)
    assert result.dims == ("layer", "head", "dest", "src")
    torch.testing.assert_close(result.tensor, dest_src, rtol=0, atol=ATOL)

    def everything(corrupted_act, index, clean_act):
        return clean_act

    at_position = tlp.layer_pos_patch_setter  # every head at one position, for per-head sites
    cases = [
        ("resid_post", "layer_pos", at_position, ("layer", "pos")),
        ("resid_pre", "layer", everything, ("layer",)),
        ("mlp_out", "layer", everything, ("layer",)),
        ("z", "layer_pos", at_position, ("layer", "pos")),
        ("z", "layer", everything, ("layer",)),
    ]
    for site, by, setter, axes in cases:
        expected = tl_grid(
            partial(tlp.generic_activation_patch, patch_setter=setter, activation_name=site, index_axis_names=axes),
            model,
            clean,
            corrupted,
            LOGIT_DIFF,
        )
        result = patch(model, clean, corrupted, LOGIT_DIFF, site=site, by=by, progress=False)
        torch.testing.assert_close(result.tensor, expected, rtol=0, atol=ATOL, msg=f"{site} by {by}")


@pytest.mark.parametrize(
    "metric",
    [
        metrics.prob(4),
        metrics.rank(4),
        metrics.loss(),
        metrics.loss(pos=[1, 3]),
        metrics.kl_to(),
        metrics.logit_diff(7, [1, 2, 3], pos=[-1, -3]),
        lambda logits: logits[:, -1, :10].logsumexp(-1).mean(),  # any callable on full logits
    ],
    ids=["prob", "rank", "loss", "loss-pos", "kl_to", "logit_diff-pos", "callable"],
)
def test_metrics_equal_transformer_lens(metric):
    model = make_model("llama")
    clean, corrupted = pair(model)
    expected = tl_grid(tlp.get_act_patch_attn_head_out_by_pos, model, clean, corrupted, metric).permute(0, 2, 1)
    result = patch(model, clean, corrupted, metric, site="z", by="layer_head_pos", progress=False)
    torch.testing.assert_close(result.tensor, expected, rtol=0, atol=ATOL)


def test_small_chunks_and_selections_give_the_same_cells():
    model = make_model("llama")
    clean, corrupted = pair(model, "random")
    full = patch(model, clean, corrupted, LOGIT_DIFF, site="q", by="layer_head_pos", progress=False)
    chunked = patch(model, clean, corrupted, LOGIT_DIFF, site="q", by="layer_head_pos", max_cells=1, progress=False)
    torch.testing.assert_close(chunked.tensor, full.tensor, rtol=0, atol=ATOL)
    part = patch(
        model,
        clean,
        corrupted,
        LOGIT_DIFF,
        site="q",
        by="layer_head_pos",
        layers=[2, 0],
        heads=[-1],
        positions=[1, 5],
        progress=False,
    )
    torch.testing.assert_close(part.tensor, full.tensor[[2, 0]][:, [3]][:, :, [1, 5]], rtol=0, atol=ATOL)
    assert part.labels["layer"] == [2, 0] and part.labels["head"] == [3]
    with pytest.raises(ValueError, match=r"layers \[1, 1\] name the same layer twice"):
        patch(model, clean, corrupted, LOGIT_DIFF, layers=[1, -2], progress=False)
    assert part.labels["pos"] == [str(int(clean[0, 1])), str(int(clean[0, 5]))]  # token ids: no tokenizer


def test_clean_corrupted_values_and_normalised_view(model):
    clean, corrupted = pair(model, "random")
    result = patch(model, clean, corrupted, LOGIT_DIFF, site="resid_pre", by="layer", progress=False)
    bound = LOGIT_DIFF.bind(model)
    assert result.clean_value == pytest.approx(bound(model(clean)).item(), abs=ATOL)
    assert result.corrupted_value == pytest.approx(bound(model(corrupted)).item(), abs=ATOL)
    # patching every position of resid_pre at layer 0 is the clean run, whatever the metric
    assert result.tensor[0].item() == pytest.approx(result.clean_value, abs=ATOL)
    normalised = result.normalised()
    assert normalised.tensor[0].item() == pytest.approx(1.0, abs=1e-4)
    expected = (result.tensor - result.corrupted_value) / (result.clean_value - result.corrupted_value)
    torch.testing.assert_close(normalised.tensor, expected)
    # patching nothing that differs leaves the corrupted value: clean == corrupted
    same = patch(model, clean, clean, LOGIT_DIFF, site="z", by="layer_head", progress=False)
    assert torch.allclose(same.tensor, torch.tensor(same.corrupted_value), atol=ATOL)
    with pytest.raises(ValueError, match="same metric value"):
        same.normalised()


@pytest.mark.needs_tl3("the bridge has no set_tokenizer (lenskit.load passes the tokenizer when it builds one)")
def test_token_labels_frame_plot_and_progress(tmp_path, capsys):
    model = make_model("gpt2", d_vocab=13)
    word_tokenizer().save_pretrained(tmp_path)
    model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(tmp_path))
    clean = ["the cat sat on a mat", "the dog sat on a mat"]
    corrupted = ["the dog sat on a mat", "the cat sat on a mat"]
    result = patch(
        model, clean, corrupted, metrics.logit_diff("mat", "dog"), site="z", by="layer_head_pos", progress=False
    )
    assert isinstance(result, PatchResult) and result.dims == ("layer", "head", "pos")
    assert result.labels["pos"] == ["<bos>", "the", "cat", "sat", "on", "a", "mat"]
    frame = result.to_frame()
    assert list(frame.columns) == ["layer", "layer_label", "head", "head_label", "pos", "pos_label", "value"]
    assert len(frame) == 3 * 4 * 7
    html = result.plot(title="z").html
    assert html.count("<tr>") == 1 + 3 * 4 and "L2 H3" in html and ">cat</th>" in html
    by_layer = patch(model, clean, corrupted, metrics.prob("mat"), site="mlp_out", by="layer", progress=True)
    assert by_layer.plot().html.count("<tr>") == 1 + 3
    assert "patch mlp_out by layer" in capsys.readouterr().err  # the tqdm bar over cell chunks
    with pytest.raises(ValueError, match=r"'mat cat' is not a single token"):
        patch(model, clean, corrupted, metrics.prob("mat cat"), progress=False)


@pytest.mark.needs_tl3("the bridge has no set_tokenizer (lenskit.load passes the tokenizer when it builds one)")
def test_left_padded_prompts_equal_transformer_lens(tmp_path):
    """A left-padding tokenizer makes TransformerLens mask the pads; the resumed runs mask them too."""
    model = make_model("llama", d_vocab=13)
    word_tokenizer().save_pretrained(tmp_path)
    model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(tmp_path, padding_side="left"))
    clean = model.to_tokens(["the cat sat on a mat", "a dog ran"])
    corrupted = model.to_tokens(["the dog sat on a mat", "a cat ran"])
    assert (clean[1, :3] == model.tokenizer.pad_token_id).all()
    metric = metrics.logit_diff("mat", "dog")
    for site, by, tl_function in (
        ("resid_pre", "layer_pos", tlp.get_act_patch_resid_pre),
        ("attn_out", "layer_pos", tlp.get_act_patch_attn_out),
    ):
        expected = tl_grid(tl_function, model, clean, corrupted, metric)
        result = patch(model, clean, corrupted, metric, site=site, by=by, progress=False)
        torch.testing.assert_close(result.tensor, expected, rtol=0, atol=ATOL)


def test_errors_are_clear(model):
    clean, corrupted = pair(model)
    with pytest.raises(ValueError, match=r"same shape \[batch, pos\]; got \(3, 7\) and \(3, 6\)"):
        patch(model, clean, corrupted[:, :6], LOGIT_DIFF, progress=False)
    with pytest.raises(ValueError, match="unknown site 'resid'; valid sites: " + ", ".join(SITES)):
        patch(model, clean, corrupted, LOGIT_DIFF, site="resid", progress=False)
    with pytest.raises(ValueError, match="unknown by='head'; valid: layer, layer_pos"):
        patch(model, clean, corrupted, LOGIT_DIFF, by="head", progress=False)
    with pytest.raises(ValueError, match="by='layer_head' does not apply to site 'attn_out': it has no head"):
        patch(model, clean, corrupted, LOGIT_DIFF, site="attn_out", by="layer_head", progress=False)
    with pytest.raises(ValueError, match=r"metric must return a scalar tensor .* got \(3,\)"):
        patch(model, clean, corrupted, lambda logits: logits[:, -1, 0], progress=False)
    with pytest.raises(ValueError, match=r"head 4 out of range: there are 4 heads \(valid 0..3"):
        patch(model, clean, corrupted, LOGIT_DIFF, site="z", by="layer_head", heads=[0, 4], progress=False)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        patch(model, clean, corrupted, LOGIT_DIFF, layers=[9], progress=False)
    with pytest.raises(ValueError, match="needs a differentiable metric; Rank is not"):
        attribution_patch(model, clean, corrupted, metrics.rank(3))
    assert no_hooks_left(model)


# --- attribution patching ----------------------------------------------------------------------


def gradient_by_hand(model, clean, corrupted, metric, name):
    """TransformerLens-style forward and backward hooks (as in the attribution patching demos)."""
    _, clean_cache = model.run_with_cache(clean)
    store = {}
    model.add_hook(name, lambda act, hook: store.__setitem__("act", act.detach()), "fwd")
    model.add_hook(name, lambda grad, hook: store.__setitem__("grad", grad.detach()), "bwd")
    try:
        value = metric(model(corrupted))
        value.backward()
    finally:
        model.reset_hooks()
        model.zero_grad(set_to_none=True)
    return value.item(), clean_cache[name] - store["act"], store["grad"]


def test_attribution_is_the_gradient_estimate(model):
    clean, corrupted = pair(model)
    bound = LOGIT_DIFF.bind(model)
    z = attribution_patch(model, clean, corrupted, LOGIT_DIFF, site="z", by="layer_head_pos")
    resid = attribution_patch(model, clean, corrupted, LOGIT_DIFF, site="resid_pre", by="layer_pos")
    pattern = attribution_patch(model, clean, corrupted, LOGIT_DIFF, site="pattern", by="layer_head")
    assert no_hooks_left(model) and all(p.grad is None for p in model.parameters())
    for layer in range(model.cfg.n_layers):
        value, delta, grad = gradient_by_hand(model, clean, corrupted, bound, f"blocks.{layer}.attn.hook_z")
        expected = value + (delta * grad).sum((0, 3)).T  # [head, pos]
        torch.testing.assert_close(z.tensor[layer], expected, rtol=1e-5, atol=1e-5)
        value, delta, grad = gradient_by_hand(model, clean, corrupted, bound, f"blocks.{layer}.hook_resid_pre")
        torch.testing.assert_close(resid.tensor[layer], value + (delta * grad).sum((0, 2)), rtol=1e-5, atol=1e-5)
        value, delta, grad = gradient_by_hand(model, clean, corrupted, bound, f"blocks.{layer}.attn.hook_pattern")
        torch.testing.assert_close(pattern.tensor[layer], value + (delta * grad).sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert z.corrupted_value == pytest.approx(bound(model(corrupted)).item(), abs=ATOL)


@pytest.mark.needs_tl3("an attention-only model without norms has no Hugging Face architecture to wrap")
def test_attribution_equals_patching_when_the_model_is_linear_in_the_site():
    """One attention-only layer without normalisation: the logits are linear in z and attn_out."""
    model = make_model("gpt2", n_layers=1, attn_only=True, normalization_type=None)
    clean, corrupted = pair(model, "random")
    for site, by in (("z", "layer_head_pos"), ("attn_out", "layer_pos"), ("z", "layer_head")):
        exact = patch(model, clean, corrupted, LOGIT_DIFF, site=site, by=by, progress=False)
        estimate = attribution_patch(model, clean, corrupted, LOGIT_DIFF, site=site, by=by)
        torch.testing.assert_close(estimate.tensor, exact.tensor, rtol=1e-4, atol=1e-4)


def test_attribution_approximates_patching_for_small_corruptions(kind):
    """Corrupted tokens whose embeddings are near the clean ones: the first-order estimate is close."""
    nearby = make_model(kind)
    clean, _ = pair(nearby)
    corrupted = clean.clone()
    unused = [t for t in range(nearby.cfg.d_vocab) if t not in clean.flatten().tolist()]
    with torch.no_grad():
        for prompt in range(len(clean)):
            for p in (2, 4):
                corrupted[prompt, p] = unused.pop()
                nearby.embed.W_E[corrupted[prompt, p]] = nearby.embed.W_E[clean[prompt, p]] + 1e-3 * torch.randn(
                    nearby.cfg.d_model
                )
    for site, by in (("resid_pre", "layer_pos"), ("z", "layer_head"), ("v", "layer_head_pos")):
        exact = patch(nearby, clean, corrupted, LOGIT_DIFF, site=site, by=by, progress=False)
        estimate = attribution_patch(nearby, clean, corrupted, LOGIT_DIFF, site=site, by=by)
        effect = (exact.tensor - exact.corrupted_value).abs().max()
        assert (estimate.tensor - exact.tensor).abs().max() < 0.05 * effect, f"{site} by {by}"


# --- a real pretrained model, and memory ------------------------------------------------------


@pytest.mark.needs_tl3("llama2.c checkpoints build a HookedTransformerConfig")
def test_stories260k_equals_transformer_lens():
    if not STORIES_DIR.exists():
        pytest.skip(f"stories260K is not present at {STORIES_DIR}")
    model = lenskit.load(STORIES_DIR)
    clean = model.to_tokens(["Once upon a time, there was a little girl", "Once upon a time, there was a big dog"])
    corrupted = model.to_tokens(["Once upon a time, there was a little boy", "Once upon a time, there was a big cat"])
    assert clean.shape == corrupted.shape
    metric = metrics.kl_to(pos=[-2, -1])
    expected = tl_grid(tlp.get_act_patch_resid_pre, model, clean, corrupted, metric)
    result = patch(model, clean, corrupted, metric, progress=False)
    torch.testing.assert_close(result.tensor, expected, rtol=0, atol=ATOL)
    metric = metrics.logit_diff([clean[0, -1], clean[1, -1]], [corrupted[0, -1], corrupted[1, -1]], pos=-2)
    expected = tl_grid(tlp.get_act_patch_attn_head_v_by_pos, model, clean, corrupted, metric).permute(0, 2, 1)
    result = patch(model, clean, corrupted, metric, site="v", by="layer_head_pos", progress=False)
    torch.testing.assert_close(result.tensor, expected, rtol=0, atol=ATOL)
