"""logit_lens against a hand computation: run_with_cache, the final norm written out, W_U, softmax and top-k."""

import pytest
import torch
from conftest import STORIES_DIR, make_model
from reference.logit_lens import reference_logits

import lenskit
from lenskit.lens import LensResult, logit_lens
from lenskit.run import Run
from lenskit.viz import Figure

pytestmark = pytest.mark.both_backends

KINDS = ["gpt2", "llama", "neox"]
TARGETS = [3, 17, 42]


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return make_model(request.param)


@pytest.fixture(scope="module")
def stories():
    if not STORIES_DIR.exists():
        pytest.skip(f"stories260K is not present at {STORIES_DIR}")
    return lenskit.load(STORIES_DIR)


def assert_lens_matches(lens: LensResult, logits, targets):
    """Top-k and target statistics of `lens` equal those of the reference logits [layer, batch, pos, vocab]."""
    probs = logits.softmax(-1)
    top = probs.topk(lens.top_ids.shape[-1], dim=-1)
    torch.testing.assert_close(lens.top_probs, top.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(probs.gather(-1, lens.top_ids), lens.top_probs, atol=1e-5, rtol=0)
    if targets is None:
        return
    ids = torch.as_tensor(targets)
    torch.testing.assert_close(lens.target_probs, probs[..., ids], atol=1e-5, rtol=0)
    torch.testing.assert_close(lens.target_logits, logits[..., ids], atol=1e-4, rtol=1e-5)
    ranks = torch.stack([(logits > logits[..., [t]]).sum(-1) for t in ids.tolist()], dim=-1)
    assert torch.equal(lens.target_ranks, ranks)


def test_every_layer_matches_hand_computation(model, tokens):
    lens = logit_lens(model, tokens, targets=TARGETS, top_k=4, progress=False)
    n = model.cfg.n_layers
    assert lens.layers == list(range(n + 1))
    pre = [f"blocks.{layer}.hook_resid_pre" for layer in range(n)]
    assert lens.layer_names == [*pre, f"blocks.{n - 1}.hook_resid_post"]
    assert lens.top_ids.shape == (n + 1, *tokens.shape, 4) and lens.target_ranks.shape == (n + 1, *tokens.shape, 3)
    assert_lens_matches(lens, reference_logits(model, tokens), TARGETS)


def test_last_row_is_the_model_output(model, tokens):
    lens = logit_lens(model, tokens, targets=TARGETS, top_k=5, progress=False)
    with torch.no_grad():
        logits = model(tokens)
    log_probs = logits.log_softmax(-1)
    assert torch.equal(lens.top_ids[-1], logits.topk(5, dim=-1).indices)
    torch.testing.assert_close(lens.top_probs[-1].log(), log_probs.gather(-1, lens.top_ids[-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(lens.target_logits[-1], logits[..., TARGETS], atol=1e-5, rtol=0)


def test_no_hook_is_left_on_the_model(model, tokens):
    logit_lens(model, tokens, progress=False)
    with pytest.raises(ValueError):
        logit_lens(model, tokens, targets=[10**6], progress=False)
    assert not any(point.fwd_hooks for point in model.hook_dict.values())


def test_chunked_equals_unchunked_and_logits_on_request(model, tokens):
    whole = logit_lens(model, tokens, targets=TARGETS, return_logits=True, progress=False)
    torch.testing.assert_close(whole.logits, reference_logits(model, tokens), atol=1e-4, rtol=1e-5)
    for chunk_size in (1, 7, 64):  # 30 rows per layer: chunks end inside layers and span two layers
        chunked = logit_lens(model, tokens, targets=TARGETS, chunk_size=chunk_size, return_logits=True, progress=False)
        for field in ("top_ids", "top_probs", "target_probs", "target_ranks", "target_logits", "logits"):
            torch.testing.assert_close(getattr(chunked, field), getattr(whole, field), atol=1e-5, rtol=0)
    assert logit_lens(model, tokens, progress=False).logits is None


def test_batch_rows_equal_single_prompts(model, tokens):
    batched = logit_lens(model, tokens, targets=TARGETS, progress=False)
    for row in range(len(tokens)):
        single = logit_lens(model, tokens[row], targets=TARGETS, progress=False)  # [pos] becomes [1, pos]
        torch.testing.assert_close(single.top_probs[:, 0], batched.top_probs[:, row], atol=1e-6, rtol=0)
        torch.testing.assert_close(single.target_logits[:, 0], batched.target_logits[:, row], atol=1e-5, rtol=0)


def test_next_token_probabilities_and_ranks(model, tokens):
    lens = logit_lens(model, tokens, top_k=2, progress=False)
    logits = reference_logits(model, tokens)[:, :, :-1]  # [layer, batch, pos - 1, vocab]
    following = tokens[None, :, 1:, None].expand(len(logits), -1, -1, 1)
    torch.testing.assert_close(lens.next_probs, logits.softmax(-1).gather(-1, following)[..., 0], atol=1e-5, rtol=0)
    assert torch.equal(lens.next_ranks, (logits > logits.gather(-1, following)).sum(-1))


def test_a_run_is_read_not_run_again(model, tokens):
    run = Run.everything(model, tokens)

    def no_forward_pass(activation, hook):
        raise AssertionError("the model ran")

    with model.hooks(fwd_hooks=[("hook_embed", no_forward_pass)]):
        lens = logit_lens(model, run, targets=TARGETS, progress=False)
    assert torch.equal(lens.tokens, tokens)
    assert_lens_matches(lens, reference_logits(model, tokens), TARGETS)
    with pytest.raises(ValueError, match="cache lacks"):
        logit_lens(model, Run(model, tokens, activations={}, extend=False), progress=False)


@pytest.mark.needs_tl3(
    "the bridge's stop_at_layer=k fires blocks.k.hook_resid_pre (the stream it stops at) before stopping; no later block runs"
)
def test_tokens_run_only_the_blocks_read(gpt2_model, tokens):
    def too_far(activation, hook):
        raise AssertionError(f"{hook.name} ran")

    with gpt2_model.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", too_far), ("unembed.hook_out", too_far)]):
        lens = logit_lens(gpt2_model, tokens, layers=[0, 1], progress=False)
    assert lens.layer_names == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]


def test_save_html_writes_the_plot_as_a_page(word_model, tmp_path):
    lens = logit_lens(word_model, "the cat sat on the mat", progress=False)
    page = lens.save_html(tmp_path / "lens.html", positions=[1, 2]).read_text()
    assert page.startswith("<!DOCTYPE html>") and lens.plot(positions=[1, 2]).html in page


def test_selected_layers_and_no_normalisation(gpt2_model, tokens):
    full = logit_lens(gpt2_model, tokens, targets=TARGETS, progress=False)
    some = logit_lens(gpt2_model, tokens, targets=TARGETS, layers=[3, 1], progress=False)
    assert some.layers == [1, 3] and some.layer_names == ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_post"]
    torch.testing.assert_close(some.top_probs, full.top_probs[[1, 3]], atol=1e-6, rtol=0)
    torch.testing.assert_close(some.target_ranks, full.target_ranks[[1, 3]], atol=0, rtol=0)
    raw = logit_lens(gpt2_model, tokens, targets=TARGETS, normalize=False, progress=False)
    assert_lens_matches(raw, reference_logits(gpt2_model, tokens, normalize=False), TARGETS)
    assert not torch.allclose(raw.top_probs, full.top_probs, atol=1e-2)


def test_bad_arguments_are_named(gpt2_model, word_model, tokens):
    with pytest.raises(ValueError, match=r"layers \[4, 7\] out of range: logit_lens reads layers 0..3, where 3 is"):
        logit_lens(gpt2_model, tokens, layers=[0, 4, 7], progress=False)
    with pytest.raises(ValueError, match="no layers given"):
        logit_lens(gpt2_model, tokens, layers=[], progress=False)
    with pytest.raises(ValueError, match=r"top_k must lie in 1..101"):
        logit_lens(gpt2_model, tokens, top_k=0, progress=False)
    with pytest.raises(ValueError, match=r"token id 101 is outside the vocabulary \(0..100\)"):
        logit_lens(gpt2_model, tokens, targets=[5, 101], progress=False)
    with pytest.raises(ValueError, match=r"integer token ids \[batch, pos\] or \[pos\], not a torch.float32"):
        logit_lens(gpt2_model, torch.zeros(2, 3), progress=False)
    with pytest.raises(ValueError, match=r"'cat sat' is not a single token: it splits into 2 tokens \['cat', 'sat'\]"):
        logit_lens(word_model, "the cat sat", targets=["mat", "cat sat"], progress=False)
    with pytest.raises(ValueError, match="run without targets"):
        logit_lens(gpt2_model, tokens, progress=False).target_frame()
    with pytest.raises(ValueError, match=r"batch 3 out of range: this lens has 3 batch rows"):
        logit_lens(gpt2_model, tokens, progress=False).plot(batch=3)


def test_text_input_strings_frames_and_plot(word_model):
    lens = logit_lens(word_model, "the cat sat on the mat", targets=["mat", 6], top_k=3, progress=False)
    tokens = word_model.to_tokens("the cat sat on the mat")
    assert torch.equal(lens.tokens, tokens)
    assert lens.input_strings[0].tolist() == word_model.to_str_tokens(tokens[0])
    assert lens.target_strings == ["mat", "sat"] and lens.target_ids.tolist() == [9, 6]
    assert lens.top_strings[2, 0, 4].tolist() == word_model.to_str_tokens(lens.top_ids[2, 0, 4])
    assert_lens_matches(lens, reference_logits(word_model, tokens), [9, 6])

    frame = lens.to_frame()
    n_layers, _, n_pos, k = lens.top_ids.shape
    assert len(frame) == n_layers * n_pos * k
    row = frame[(frame.layer == 3) & (frame.pos == 2) & (frame["rank"] == 1)].iloc[0]
    assert (row.layer_label, row.token) == ("blocks.2.hook_resid_post", "cat")
    assert row.predicted == lens.top_strings[3, 0, 2, 1]
    assert row.predicted_id == lens.top_ids[3, 0, 2, 1] and row.prob == pytest.approx(lens.top_probs[3, 0, 2, 1].item())

    targets = lens.target_frame()
    assert len(targets) == n_layers * n_pos * 2
    row = targets[(targets.layer == 1) & (targets.pos == 6) & (targets.target_label == "sat")].iloc[0]
    assert (row.token, row.target_id, row["rank"]) == ("mat", 6, lens.target_ranks[1, 0, 6, 1])
    assert row.prob == pytest.approx(lens.target_probs[1, 0, 6, 1].item())
    assert row.logit == pytest.approx(lens.target_logits[1, 0, 6, 1].item())

    figure = lens.plot(positions=[1, 2])
    assert isinstance(figure, Figure) and figure.html.count("<tr>") == 1 + n_layers
    assert f">{lens.top_strings[0, 0, 2, 0]}</td>" in figure.html
    html = lens._repr_html_()
    assert "lenskit-heatmap" in html and "top 3" in html and "'sat' p / rank" in html


@pytest.mark.needs_tl3("llama2.c checkpoints build a HookedTransformerConfig")
def test_stories260k_matches_hand_computation(stories):
    text = "Once upon a time, there was a little girl"
    targets = ["time", "little"]  # the llama2c tokenizer adds the leading space: ' time', ' little'
    lens = logit_lens(stories, text, targets=targets, progress=False)
    tokens = stories.to_tokens(text)
    ids = [stories.to_single_token(t) for t in targets]
    assert lens.top_ids.shape == (stories.cfg.n_layers + 1, 1, tokens.shape[1], 5)
    assert_lens_matches(lens, reference_logits(stories, tokens), ids)
    with torch.no_grad():
        logits = stories(tokens)
    torch.testing.assert_close(
        lens.top_probs[-1].log(), logits.log_softmax(-1).gather(-1, lens.top_ids[-1]), atol=1e-5, rtol=0
    )
    assert lens.top_strings[-1, 0, -1].tolist() == stories.to_str_tokens(lens.top_ids[-1, 0, -1])
    with pytest.raises(ValueError, match="is not a single token: it splits into"):
        logit_lens(stories, text, targets=[" extraordinarily"], progress=False)
