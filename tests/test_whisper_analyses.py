"""Whisper analyses: decoder logit lens, encoder lens, per-head logit attribution, layer removal, WER,
cross-attention pictures. References are hook runs (hooks.skip, hooks.ablate, hooks.patch) and hand sums."""

import pytest
import torch
from test_whisper_support import SPEECH, SPEECH_TEXT, one_torch_thread, randomize_  # noqa: F401  (fixture)

from lenskit import hooks
from lenskit.viz import Figure
from lenskit.whisper import (
    HookedWhisper,
    WhisperLensResult,
    cross_attention,
    decoder_logit_attribution,
    decoder_logit_lens,
    encoder_lens,
    get_tokenizer,
    layer_removal,
    remove_final_layers,
    word_error_rate,
)

pytestmark = pytest.mark.both_backends  # HookedWhisper is lenskit's own HookedRootModule: the same on 4.x

TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return randomize_(HookedWhisper(SPEECH), seed=11)


@pytest.fixture(scope="module")
def mel():
    return torch.randn(1, SPEECH.n_mels, SPEECH.n_frames, generator=torch.Generator().manual_seed(2))


TOKENS = torch.tensor([[50258, 50259, 50359, 50363, 440, 2068, 3699, 21831]])


@torch.no_grad()
def logits_without_final_layers(model, mel, part, count):
    return remove_final_layers(model, part, count).run(model, mel, TOKENS)[0]


@torch.no_grad()
def test_decoder_logit_lens_equals_removing_later_layers(model, mel):
    lens = decoder_logit_lens(model, mel, TOKENS)
    n_layers = SPEECH.n_text_layer
    assert lens.logits.shape == (n_layers + 1, TOKENS.shape[1], SPEECH.n_vocab)
    assert lens.logits.labels["layer"] == ["embed"] + [f"block {l}" for l in range(n_layers)]
    for row in range(n_layers + 1):  # row 0: embeddings only; row l + 1: after block l
        expected = logits_without_final_layers(model, mel, "decoder", n_layers - row)
        torch.testing.assert_close(lens.logits.tensor[row], expected, atol=TOL, rtol=0)


@torch.no_grad()
def test_encoder_lens_equals_skipping_later_encoder_blocks(model, mel):
    lens = encoder_lens(model, mel, TOKENS, progress=False)
    n_layers = SPEECH.n_audio_layer
    for layer in range(n_layers):
        expected = (
            hooks.skip(model, list(range(layer + 1, n_layers)), stack="encoder.blocks").run(model, mel, TOKENS)
            if layer + 1 < n_layers
            else model(mel, TOKENS)
        )
        torch.testing.assert_close(lens.logits.tensor[layer], expected[0], atol=TOL, rtol=0)


def test_lens_result_frame_and_plot(model, mel):
    lens = decoder_logit_lens(model, mel, TOKENS)
    frame = lens.to_frame()
    assert list(frame.columns) == ["layer", "layer_label", "pos", "token", "top_token", "top_prob", "next_token_prob"]
    assert len(frame) == (SPEECH.n_text_layer + 1) * TOKENS.shape[1]
    probs = lens.logits.tensor.softmax(-1)
    last = frame.iloc[-2]  # final layer, second-to-last position
    assert last.top_token == str(int(probs[-1, -2].argmax()))
    assert last.next_token_prob == pytest.approx(probs[-1, -2, TOKENS[0, -1]].item(), rel=1e-5)
    assert isinstance(lens.plot(), Figure) and "<table" in lens.plot().html


def test_lens_result_saves_and_shows_its_plot(model, mel, tmp_path):
    lens = decoder_logit_lens(model, mel, TOKENS)
    assert isinstance(lens, WhisperLensResult)
    assert lens.save_html(tmp_path / "lens.html").read_text().startswith("<!DOCTYPE html>")
    shown = lens._repr_html_()
    assert f"WhisperLensResult(layers={SPEECH.n_text_layer + 1}, pos={TOKENS.shape[1]})" in shown and "<table" in shown


@torch.no_grad()
def test_logit_attribution_sums_to_the_logit_and_matches_ablation(model, mel):
    target, pos = 2068, 5
    att = decoder_logit_attribution(model, mel, TOKENS, target, pos=pos)
    logits = model(mel, TOKENS)
    assert att.logit == pytest.approx(logits[0, pos, target].item(), abs=TOL)
    assert att.components.tensor.sum().item() == pytest.approx(att.logit, abs=TOL)
    assert att.heads.shape == (2, SPEECH.n_text_layer, SPEECH.n_text_head)
    # direct effect of a last-layer head = logit drop when it is ablated with everything downstream of it
    # (the block's later sublayers, the final norm's scale) frozen at their clean values
    last = SPEECH.n_text_layer - 1
    clean = hooks.cache(["decoder.ln_final.hook_scale", f"decoder.blocks.{last}.hook_*_out"])
    clean.run(model, mel, TOKENS)
    downstream = {"attn": ["cross_attn_out", "mlp_out"], "cross_attn": ["mlp_out"]}
    for kind_index, kind in enumerate(["attn", "cross_attn"]):
        frozen = [f"decoder.blocks.{last}.hook_{name}" for name in downstream[kind]] + ["decoder.ln_final.hook_scale"]
        for head in (0, 3):
            ablated = hooks.ablate(f"decoder.blocks.{last}.{kind}.hook_z", head=head) + hooks.patch(frozen, clean.store)
            drop = logits[0, pos, target] - ablated.run(model, mel, TOKENS)[0, pos, target]
            assert att.heads.tensor[kind_index, last, head].item() == pytest.approx(drop.item(), abs=TOL)
    frame = att.to_frame()
    assert len(frame) == 2 + SPEECH.n_text_layer * (2 * (SPEECH.n_text_head + 1) + 1) + 1
    assert frame.component_label.iloc[0] == "embed" and frame.component_label.iloc[-1] == "ln_final bias"
    assert isinstance(att.plot(), Figure)


def test_logit_attribution_rejects_bad_targets(model, mel):
    pytest.importorskip("whisper")
    with pytest.raises(ValueError, match=r"' Maryland and' is not a single token: it splits into 2 tokens"):
        decoder_logit_attribution(model, mel, TOKENS, " Maryland and")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decoder_logit_attribution(model, mel, TOKENS, SPEECH.n_vocab)
    with pytest.raises(ValueError, match="pos 8 out of range"):
        decoder_logit_attribution(model, mel, TOKENS, 5, pos=8)
    fox = get_tokenizer(model).encode(" fox")
    assert len(fox) == 1
    att = decoder_logit_attribution(model, mel, TOKENS, " fox")
    assert att.logit == pytest.approx(model(mel, TOKENS)[0, -1, fox[0]].item(), abs=TOL)


@torch.no_grad()
@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_removed_layers_pass_the_residual_stream_through(model, mel, part):
    n_layers = SPEECH.n_audio_layer if part == "encoder" else SPEECH.n_text_layer
    for count, kept in [(n_layers - 1, "blocks.0.hook_resid_post"), (n_layers, "blocks.0.hook_resid_pre")]:
        h = remove_final_layers(model, part, count) + hooks.cache(f"{part}.blocks.*.hook_resid_p*")
        with h.on(model):
            model(mel, TOKENS)
        assert torch.equal(h.store[f"{part}.blocks.{n_layers - 1}.hook_resid_post"], h.store[f"{part}.{kept}"])
    assert len(remove_final_layers(model, part, 0)) == 0
    with pytest.raises(ValueError, match=f"cannot remove {n_layers + 1} layers"):
        remove_final_layers(model, part, n_layers + 1)


def test_layer_removal_table(model, mel):
    pytest.importorskip("whisper")  # decoding needs Whisper's tokenizer
    from lenskit.whisper import transcribe

    table = layer_removal(model, mel, SPEECH_TEXT, part="decoder", counts=[0, 3], max_tokens=6, progress=False)
    assert list(table.columns) == ["part", "removed", "layers_left", "transcript", "wer"]
    assert table.removed.tolist() == [0, 3] and table.layers_left.tolist() == [3, 0]
    assert table.transcript[0] == transcribe(model, mel, max_tokens=6, progress=False).text
    for row in table.itertuples():
        assert row.wer == word_error_rate(SPEECH_TEXT, row.transcript)
    with pytest.raises(ValueError, match="part must be 'encoder' or 'decoder'"):
        layer_removal(model, mel, SPEECH_TEXT, part="middle")


def test_word_error_rate_by_hand():
    assert word_error_rate("The cat sat.", "the cat, sat") == 0
    assert word_error_rate("the cat sat on the mat", "the cat sit on mat") == pytest.approx(2 / 6)
    assert word_error_rate("a b", "x a y b z") == pytest.approx(3 / 2)
    assert word_error_rate("don't stop", "do not stop") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="has no words"):
        word_error_rate(" ... ", "anything")


@torch.no_grad()
def test_cross_attention_pattern(model, mel):
    layer, head = 1, 2
    pattern = cross_attention(model, mel, TOKENS, layer, head)
    _, cache = model.run_with_cache(mel, TOKENS)
    expected = cache[f"decoder.blocks.{layer}.cross_attn.hook_pattern"][0, head]
    torch.testing.assert_close(pattern.tensor, expected, atol=1e-6, rtol=0)  # run_with_cache: unfused layer norms
    binned = cross_attention(model, mel, TOKENS, layer, head, frames_per_bin=25)
    assert binned.shape == (TOKENS.shape[1], 60) and binned.labels["time"][:2] == ["0.00s", "0.50s"]
    torch.testing.assert_close(binned.tensor[:, 1], expected[:, 25:50].sum(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(binned.tensor.sum(-1), torch.ones(TOKENS.shape[1]), atol=1e-5, rtol=0)
    assert "0.50s" in binned.plot().html
    with pytest.raises(ValueError, match="head 4 out of range"):
        cross_attention(model, mel, TOKENS, layer, 4)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        cross_attention(model, mel, TOKENS, 3, 0)


@torch.no_grad()
def test_skip_cross_attention_only(model, mel):
    """part="cross_attn" zeroes the decoder's cross-attention output alone: resid_mid_cross = resid_mid."""
    h = hooks.skip(model, 1, part="cross_attn", stack="decoder.blocks") + hooks.cache(
        ["decoder.blocks.1.hook_resid_mid", "decoder.blocks.1.hook_resid_mid_cross", "decoder.blocks.1.hook_attn_out"]
    )
    with h.on(model):
        model(mel, TOKENS)
    assert torch.equal(h.store["decoder.blocks.1.hook_resid_mid_cross"], h.store["decoder.blocks.1.hook_resid_mid"])
    assert h.store["decoder.blocks.1.hook_attn_out"].abs().sum() > 0
    with pytest.raises(ValueError, match="no cross_attn output hook"):
        hooks.skip(model, 0, part="cross_attn", stack="encoder.blocks")
