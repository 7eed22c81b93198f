"""lenskit.vocab against hand computations (W_O, W_out, W_U, cache) and TransformerLens' head_detector."""

import copy

import pytest
import torch
import transformers
from conftest import STORIES_DIR, make_model, word_tokenizer
from transformer_lens import head_detector

import lenskit
from lenskit import vocab

ARCHS = ["gpt2", "llama", "neox"]
REPEATED = "the cat sat on a mat and dog ran the cat sat on a mat and dog ran"
RAGGED = [
    "the cat sat the cat sat",
    "a mat and dog ran a mat and dog ran",
    "dog ran on the mat dog ran on",
    "sat on a mat sat on a mat",
]
TL_NAMES = {
    "previous_token": "previous_token_head",
    "duplicate_token": "duplicate_token_head",
    "induction": "induction_head",
}


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tmp_path_factory):
    """A config model of each shape with a word-level tokenizer (TransformerLens' detect_head needs strings)."""
    model = make_model(request.param)
    folder = tmp_path_factory.mktemp("tokenizer")
    word_tokenizer().save_pretrained(folder)
    model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(folder))
    return model


@pytest.fixture(scope="module")
def folded(model):
    """The same model with TransformerLens' weight processing: ln_final's weight folded into W_U, writes centred.

    Value biases stay in hook_z (not folded into b_O), so each head's output is unchanged up to centring.
    """
    processed = copy.deepcopy(model)
    processed.load_and_process_state_dict(
        processed.state_dict(), fold_ln=True, center_writing_weights=True, center_unembed=False, fold_value_biases=False
    )
    return processed


@pytest.fixture(scope="module")
def stories():
    if not STORIES_DIR.exists():
        pytest.skip(f"stories260K not present at {STORIES_DIR}")
    return lenskit.load(STORIES_DIR)


def check_frame(frame, logits, k):
    """`frame` lists the k largest and k smallest entries of the reference `logits` [d_vocab], in order."""
    promoted, suppressed = frame[frame.kind == "promoted"], frame[frame.kind == "suppressed"]
    assert list(promoted["rank"]) == list(range(k)) and list(suppressed["rank"]) == list(range(k))
    top, bottom = logits.topk(k), logits.topk(k, largest=False)
    torch.testing.assert_close(torch.tensor(promoted.value.values), top.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(suppressed.value.values), bottom.values, atol=1e-5, rtol=1e-5)
    assert list(promoted.token_id) == top.indices.tolist()
    assert list(suppressed.token_id) == bottom.indices.tolist()
    assert promoted.value.is_monotonic_decreasing and suppressed.value.is_monotonic_increasing
    assert promoted.value.iloc[-1] >= logits.sort(descending=True).values[k].item() - 1e-5
    assert list(frame.columns) == ["kind", "rank", "token", "token_id", "value"]


def centred_if_layernorm(model, vector):
    return vector - vector.mean(-1, keepdim=True) if model.cfg.normalization_type == "LN" else vector


# --- projection ------------------------------------------------------------------------------


def test_project_without_normalisation_is_direction_times_W_U(model):
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    frame = vocab.project(model, direction, k=7, normalize=False)
    check_frame(frame, (direction @ model.W_U).detach(), 7)


def test_project_with_normalisation_equals_the_folded_model(model, folded):
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    frame = vocab.project(model, direction, k=5)
    check_frame(frame, (centred_if_layernorm(model, direction) @ folded.W_U).detach(), 5)
    assert (vocab.project(model, direction, k=5, normalize=False).value != frame.value).any()


def test_neuron_projects_its_output_weights(model, folded):
    layer, index = 1, 5
    plain = vocab.neuron(model, layer, index, k=6, normalize=False)
    check_frame(plain, (model.W_out[layer, index] @ model.W_U).detach(), 6)
    normalised = vocab.neuron(model, layer, index, k=6)
    check_frame(normalised, (folded.W_out[layer, index] @ folded.W_U).detach(), 6)
    assert plain.attrs["source"] == "L1N5"


def test_head_output_without_normalisation_is_z_times_W_O_times_W_U(model, tokens):
    layer, head, pos = 2 % model.cfg.n_layers, 3, 4
    _, cache = model.run_with_cache(tokens)
    output = cache["z", layer][:, pos, head] @ model.W_O[layer, head]  # [batch, d_model]
    frame = vocab.head_output(model, tokens, layer, head, pos=pos, k=5, normalize=False, progress=False)
    check_frame(frame, (output @ model.W_U).mean(0).detach(), 5)


def test_head_output_is_the_heads_direct_logit_effect(model, folded, tokens):
    """With normalisation: TransformerLens' stack_head_results(apply_ln=True) on the folded model, through W_U."""
    layer, head = 1, 2
    _, cache = folded.run_with_cache(tokens)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [layer * head, batch, d_model]
    reference = (stack[layer * model.cfg.n_heads + head] @ folded.W_U).mean(0).detach()
    check_frame(vocab.head_output(model, tokens, layer, head, k=8, progress=False), reference, 8)
    one_prompt = vocab.head_output(model, tokens[0], layer, head, progress=False)
    check_frame(one_prompt, (stack[layer * model.cfg.n_heads + head, 0] @ folded.W_U).detach(), 10)


def test_head_output_averages_prompts_of_different_lengths_at_their_own_last_token(model):
    frame = vocab.head_output(model, RAGGED[:2], 0, 1, normalize=False, progress=False)
    caches = [model.run_with_cache(text)[1] for text in RAGGED[:2]]
    outputs = torch.stack([cache["z", 0][0, -1, 1] @ model.W_O[0, 1] for cache in caches])  # [prompt, d_model]
    check_frame(frame, (outputs @ model.W_U).mean(0).detach(), 10)
    assert frame.token[0] == model.to_single_str_token(int(frame.token_id[0]))


def test_stories_head_output_and_neuron(stories):
    tokens = stories.to_tokens("Once upon a time there was a little girl")
    _, cache = stories.run_with_cache(tokens)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)
    frame = vocab.head_output(stories, tokens, 3, 6, k=5, progress=False)
    check_frame(frame, (stack[3 * stories.cfg.n_heads + 6, 0] @ stories.W_U).detach(), 5)
    check_frame(vocab.neuron(stories, 4, 100, k=5), (stories.W_out[4, 100] @ stories.W_U).detach(), 5)
    assert frame.token[0] == stories.to_single_str_token(int(frame.token_id[0]))


# --- head detectors --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", vocab.HEAD_KINDS)
def test_detection_patterns_match_transformer_lens(kind):
    tokens = torch.tensor([[1, 4, 5, 6, 4, 5, 6, 4, 9]])
    expected = getattr(head_detector, f"get_{TL_NAMES[kind]}_detection_pattern")(tokens)
    torch.testing.assert_close(vocab.detection_pattern(tokens, kind)[0], expected.float())


@pytest.mark.parametrize("kind", vocab.HEAD_KINDS)
def test_head_scores_equal_transformer_lens_detect_head(model, kind):
    scores = vocab.head_scores(model, REPEATED, kind, progress=False)
    assert scores.dims == ("layer", "head") and scores.shape == (model.cfg.n_layers, model.cfg.n_heads)
    expected = head_detector.detect_head(model, REPEATED, TL_NAMES[kind])
    torch.testing.assert_close(scores.tensor, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kind, options",
    [("duplicate_token", dict(exclude_bos=True)), ("induction", dict(exclude_bos=True, exclude_current_token=True))],
)
def test_head_scores_exclusions_equal_transformer_lens(model, kind, options):
    scores = vocab.head_scores(model, REPEATED, kind, progress=False, **options)
    expected = head_detector.detect_head(model, REPEATED, TL_NAMES[kind], **options)
    torch.testing.assert_close(scores.tensor, expected, atol=1e-5, rtol=0)


def test_head_scores_abs_measure_equals_transformer_lens_up_to_its_rounding(model):
    scores = vocab.head_scores(model, REPEATED, "previous_token", error_measure="abs", exclude_bos=True, progress=False)
    expected = head_detector.detect_head(model, REPEATED, "previous_token_head", error_measure="abs", exclude_bos=True)
    assert (scores.tensor - expected).abs().max() <= 5e-4 + 1e-6  # TransformerLens rounds to 3 decimals


def test_several_prompts_are_averaged_like_transformer_lens(model):
    scores = vocab.head_scores(model, RAGGED, "induction", progress=False)
    expected = head_detector.detect_head(model, RAGGED, "induction_head")
    torch.testing.assert_close(scores.tensor, expected, atol=1e-5, rtol=0)
    batch = torch.cat([model.to_tokens(text) for text in RAGGED[2:]])  # equal lengths
    torch.testing.assert_close(
        vocab.head_scores(model, batch, "induction", progress=False).tensor,
        head_detector.detect_head(model, RAGGED[2:], "induction_head"),
        atol=1e-5,
        rtol=0,
    )


def test_head_scores_run_one_forward_per_prompt_length(model):
    forwards = []
    model.add_hook("hook_embed", lambda activation, hook: forwards.append(activation.shape[0]))
    try:
        vocab.head_scores(model, RAGGED, "previous_token", progress=False)
    finally:
        model.reset_hooks()
    assert sorted(forwards) == [1, 1, 2]  # RAGGED has lengths 7, 11, 9, 9


@pytest.mark.parametrize("kind", vocab.HEAD_KINDS)
def test_stories_head_scores_equal_transformer_lens(stories, kind):
    text = "Lily had a red ball. Lily had a red ball. Lily had a red ball."
    scores = vocab.head_scores(stories, text, kind, progress=False)
    expected = head_detector.detect_head(stories, text, TL_NAMES[kind])
    torch.testing.assert_close(scores.tensor, expected, atol=1e-5, rtol=0)
    assert "<table" in scores.plot(title=kind)._repr_html_()


# --- errors ----------------------------------------------------------------------------------


def test_out_of_range_indices_name_the_valid_range(gpt2_model, tokens):
    with pytest.raises(ValueError, match=r"layer 3 out of range: valid 0\.\.2"):
        vocab.neuron(gpt2_model, 3, 0)
    with pytest.raises(ValueError, match=r"neuron 64 out of range: valid 0\.\.63"):
        vocab.neuron(gpt2_model, 0, 64)
    with pytest.raises(ValueError, match=r"head 4 out of range: valid 0\.\.3"):
        vocab.head_output(gpt2_model, tokens, 0, 4)
    with pytest.raises(ValueError, match=r"layer -4 out of range"):
        vocab.head_output(gpt2_model, tokens, -4, 0)
    with pytest.raises(ValueError, match=r"pos 10 out of range: valid 0\.\.9"):
        vocab.head_output(gpt2_model, tokens, 0, 0, pos=10, progress=False)
    assert not any(point.fwd_hooks for point in gpt2_model.hook_dict.values())


def test_bad_inputs_raise_value_errors(gpt2_model, tokens):
    with pytest.raises(ValueError, match=r"shape \(d_model,\) = \(32,\), got \(31,\)"):
        vocab.project(gpt2_model, torch.zeros(31))
    with pytest.raises(ValueError, match=r"got \(2, 32\)"):
        vocab.project(gpt2_model, torch.zeros(2, 32))
    with pytest.raises(ValueError, match="unknown kind 'induction_head'"):
        vocab.head_scores(gpt2_model, tokens, "induction_head")
    with pytest.raises(ValueError, match="unknown error_measure 'sq'"):
        vocab.head_scores(gpt2_model, tokens, error_measure="sq")
    with pytest.raises(ValueError, match=r"2\.\.64 tokens .* got one with 1"):
        vocab.head_scores(gpt2_model, tokens[:, :1], progress=False)
    with pytest.raises(ValueError, match="integer ids"):
        vocab.head_scores(gpt2_model, tokens.float(), progress=False)
    with pytest.raises(ValueError, match="k must be at least 1"):
        vocab.neuron(gpt2_model, 0, 0, k=0)
