"""Direct logit attribution: the parts sum to the model's own logit difference and agree with the
plain TransformerLens computation (ActivationCache.decompose_resid / stack_head_results /
get_full_resid_decomposition then logit_attrs) on weight-processed models, where that exists."""

import einops
import pytest
import torch
from conftest import STORIES_DIR, make_model

import lenskit
from lenskit.attribution import BY, attribute

pytestmark = pytest.mark.both_backends

KINDS = ["gpt2", "llama", "neox"]
ANSWER, WRONG = 5, 7


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return make_model(request.param)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(10, 80, (3, 9), generator=torch.Generator().manual_seed(1))


def processed(kind: str):
    """The same random model with TransformerLens' weight processing, where TL's logit_attrs is exact."""
    model = make_model(kind)
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=False)
    return model


def assert_close(actual, expected, atol):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, check_dtype=False)


def values(frame, component: str, sort_by: list[str]) -> torch.Tensor:
    rows = frame[frame.component == component].sort_values(sort_by)
    return torch.tensor(rows.value.to_numpy())


@pytest.mark.parametrize("by", BY)
def test_parts_sum_to_the_logit_difference_at_per_prompt_positions(model, tokens, by):
    frame = attribute(model, tokens, ANSWER, WRONG, by=by, pos=[8, 3, -2])
    logits = model(tokens)[torch.arange(3), torch.tensor([8, 3, 7])]
    expected = logits[:, ANSWER] - logits[:, WRONG]
    assert_close(frame.attrs["per_prompt"], expected, atol=1e-5)
    assert frame.value.sum() == pytest.approx(expected.mean().item(), abs=1e-4)
    assert frame.attrs["total"] == pytest.approx(frame.attrs["logit_diff"], abs=1e-4)
    assert list(frame.value.abs()) == sorted(frame.value.abs(), reverse=True)


@pytest.mark.parametrize("by", BY)
def test_per_prompt_rows_sum_to_each_prompts_logit(model, tokens, by):
    frame = attribute(model, tokens, [ANSWER, 6, 9], by=by, per_prompt=True)
    logits = model(tokens)[:, -1]
    expected = logits[torch.arange(3), torch.tensor([ANSWER, 6, 9])]
    assert_close(torch.tensor(frame.groupby("prompt").value.sum().to_numpy()), expected, atol=1e-4)


@pytest.mark.needs_tl3(
    "the reference processes weights with HookedTransformer.process_weights_, which the bridge replaces by enable_compatibility_mode"
)
@pytest.mark.parametrize("kind", KINDS)
def test_layers_agree_with_transformer_lens_decompose_resid(kind, tokens):
    model = processed(kind)
    _, cache = model.run_with_cache(tokens)
    stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    reference = cache.logit_attrs(stack, tokens=ANSWER, incorrect_tokens=WRONG, pos_slice=-1).mean(-1)  # [component]
    frame = attribute(model, tokens, ANSWER, WRONG, by="layer")
    for label, value in zip(labels, reference):
        if label in ("embed", "pos_embed"):
            ours = frame[frame.component == label].value
        else:
            layer, kind_ = label.split("_")[:2]
            ours = frame[(frame.component == kind_) & (frame.layer == int(layer))].value
        assert ours.item() == pytest.approx(value.item(), abs=1e-4), label


@pytest.mark.needs_tl3(
    "the reference processes weights with HookedTransformer.process_weights_, which the bridge replaces by enable_compatibility_mode"
)
@pytest.mark.parametrize("kind", KINDS)
def test_heads_agree_with_transformer_lens_stack_head_results(kind, tokens):
    model = processed(kind)
    _, cache = model.run_with_cache(tokens)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1)
    reference = cache.logit_attrs(stack, tokens=ANSWER, incorrect_tokens=WRONG, pos_slice=-1).mean(-1)
    frame = attribute(model, tokens, ANSWER, WRONG, by="head")
    assert_close(values(frame, "head", ["layer", "head"]), reference, atol=1e-4)


@pytest.mark.needs_tl3(
    "the reference processes weights with HookedTransformer.process_weights_, which the bridge replaces by enable_compatibility_mode"
)
@pytest.mark.parametrize("kind", KINDS)
def test_neurons_and_biases_agree_with_transformer_lens_full_decomposition(kind, tokens):
    model = processed(kind)
    _, cache = model.run_with_cache(tokens)
    stack, labels = cache.get_full_resid_decomposition(expand_neurons=True, pos_slice=-1, return_labels=True)
    reference = dict(
        zip(labels, cache.logit_attrs(stack, tokens=ANSWER, incorrect_tokens=WRONG, pos_slice=-1).mean(-1))
    )
    frame = attribute(model, tokens, ANSWER, WRONG, by="neuron")
    neurons = frame[frame.component == "neuron"]
    assert len(neurons) == model.cfg.n_layers * model.cfg.d_mlp
    for row in neurons.sample(40, random_state=0).itertuples():
        assert row.value == pytest.approx(reference[f"L{row.layer}N{row.neuron}"].item(), abs=1e-4)
    # TL's "bias" holds every b_O and b_out; lenskit keeps b_O inside its whole attention layers here
    attention_and_biases = frame[frame.component.isin(["attn", "mlp_bias"])].value.sum()
    expected = sum(value for label, value in reference.items() if "H" in label) + reference["bias"]
    assert attention_and_biases == pytest.approx(expected.item(), abs=1e-4)


def test_head_source_terms_are_attention_times_projected_values(model, tokens):
    """A[i, j] (v_j W_O^h) . direction by hand, and their sum over sources is the head's contribution."""
    layer = 1
    _, cache = model.run_with_cache(tokens)
    frame = attribute(model, tokens, ANSWER, WRONG, by="head_pos")
    heads = attribute(model, tokens, ANSWER, WRONG, by="head")
    direction = model.W_U[:, ANSWER] - model.W_U[:, WRONG]
    if hasattr(model.ln_final, "w"):
        direction = direction * model.ln_final.w
    if model.cfg.normalization_type == "LN":
        direction = direction - direction.mean()
    v = cache["v", layer].repeat_interleave(model.cfg.n_heads // cache["v", layer].shape[2], dim=2)
    per_source = einops.einsum(
        cache["pattern", layer][:, :, -1], v, model.W_O[layer], direction, "b h src, b src h dh, h dh dm, dm -> b h src"
    )
    per_source = (per_source / cache["ln_final.hook_scale"][:, -1, None]).mean(0)
    ours = frame[(frame.component == "head") & (frame.layer == layer)].sort_values(["head", "src_pos"]).value
    assert_close(torch.tensor(ours.to_numpy()), per_source.flatten(), atol=1e-5)
    summed = frame[frame.component == "head"].groupby(["layer", "head"]).value.sum()
    assert_close(torch.tensor(summed.to_numpy()), values(heads, "head", ["layer", "head"]), atol=1e-5)


def test_positions_sum_the_heads_of_every_layer_per_source(model, tokens):
    by_position = attribute(model, tokens, ANSWER, WRONG, by="position")
    by_head_pos = attribute(model, tokens, ANSWER, WRONG, by="head_pos")
    expected = by_head_pos[by_head_pos.component == "head"].groupby("src_pos").value.sum()
    assert_close(values(by_position, "attn_src", ["src_pos"]), torch.tensor(expected.to_numpy()), atol=1e-5)


@pytest.mark.needs_tl3("llama2.c checkpoints build a HookedTransformerConfig")
def test_answers_as_strings_and_tokens_labelled_on_stories260k():
    if not STORIES_DIR.exists():
        pytest.skip("../shared/models/stories260K is not present")
    model = lenskit.load(STORIES_DIR)
    prompt = "Once upon a time, Lily went to the park. She saw a big dog. Lily"
    frame = attribute(model, prompt, "was", "saw", by="head_pos")
    logits = model(model.to_tokens(prompt))[0, -1]
    assert frame.value.sum() == pytest.approx(
        (logits[model.to_single_token("was")] - logits[model.to_single_token("saw")]).item(), abs=1e-4
    )
    str_tokens = model.to_str_tokens(prompt)
    sources = frame.dropna(subset=["src_pos"])
    assert all(row.token == str_tokens[row.src_pos] for row in sources.itertuples())
    assert frame.columns.tolist() == ["component", "layer", "head", "neuron", "src_pos", "token", "value"]


def test_bad_input_is_named(model, tokens):
    with pytest.raises(ValueError, match="unknown by='heads'"):
        attribute(model, tokens, ANSWER, by="heads")
    with pytest.raises(ValueError, match=r"pos \[9\] out of range for prompts of 9 tokens"):
        attribute(model, tokens, ANSWER, pos=9)
    with pytest.raises(ValueError, match=r"answer: give one token or one per prompt \(3\), got 2"):
        attribute(model, tokens, [1, 2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        attribute(model, tokens, ANSWER, wrong=10_000)
    assert not any(hook.fwd_hooks for hook in model.hook_dict.values())


def test_an_existing_cache_gives_the_same_parts_without_a_forward_pass(model, tokens):
    _, cache = model.run_with_cache(tokens)
    fresh = attribute(model, tokens, ANSWER, WRONG, by="head_pos")
    cached = attribute(model, tokens, ANSWER, WRONG, by="head_pos", cache=cache)
    assert_close(torch.tensor(cached.value.to_numpy()), torch.tensor(fresh.value.to_numpy()), atol=1e-6)
    with pytest.raises(ValueError, match="cache lacks"):
        attribute(model, tokens, ANSWER, by="neuron", cache={"hook_embed": cache["hook_embed"]})
    with pytest.raises(ValueError, match=r"cache holds a run on \(3, 9\) tokens, not on tokens \(1, 9\)"):
        attribute(model, tokens[:1], ANSWER, cache=cache)
