"""Greedy transcription: equal to openai-whisper's decoder, cached equal to uncached, hooks active throughout.

Decoding needs Whisper's tokenizer, which comes from openai-whisper (lenskit's `whisper` extra).
"""

import pytest
import torch
from test_whisper_support import SPEECH, one_torch_thread, openai_whisper, speech_wav  # noqa: F401  (fixtures)

from lenskit import hooks
from lenskit.whisper import from_openai, get_tokenizer, model_input, transcribe
from lenskit.whisper.decoding import suppressed_tokens

pytestmark = pytest.mark.both_backends  # HookedWhisper is lenskit's own HookedRootModule: the same on 4.x

whisper = pytest.importorskip("whisper")
MAX_TOKENS = 12


def reference_and_model(cfg):
    reference = openai_whisper(cfg, seed=7)
    return reference, from_openai(reference)


@pytest.fixture(scope="module")
def multilingual():
    return reference_and_model(SPEECH)


@pytest.fixture(scope="module")
def english():
    return reference_and_model(SPEECH.__class__(**(SPEECH.to_dict() | {"n_vocab": 51864})))


@pytest.fixture(params=["multilingual", "english"])
def models(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def mel():
    """The spectrogram of 3 s of a warbling tone in noise: audio that needs no speech synthesiser."""
    t = torch.arange(3 * 16000) / 16000
    signal = 0.3 * torch.sin(2 * torch.pi * (300 + 200 * torch.sin(2 * torch.pi * 3 * t)) * t)
    return model_input(signal + 0.01 * torch.randn(len(t), generator=torch.Generator().manual_seed(0)))


def openai_decode(reference, mel):
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, sample_len=MAX_TOKENS)
    return whisper.decode(reference, mel, options)[0]


@torch.no_grad()
def test_transcript_equals_openai_whisper_decode(models, mel):
    reference, model = models
    expected = openai_decode(reference, mel)
    result = transcribe(model, mel, max_tokens=MAX_TOKENS, progress=False)
    assert len(result.tokens) > 3
    assert (result.tokens, result.text) == (expected.tokens, expected.text)


@torch.no_grad()
def test_transcript_of_a_speech_file_equals_openai_whisper_decode(models, speech_wav):
    reference, model = models
    expected = openai_decode(reference, model_input(speech_wav))
    result = transcribe(model, speech_wav, max_tokens=MAX_TOKENS, progress=False)
    assert len(result.tokens) > 3
    assert (result.tokens, result.text) == (expected.tokens, expected.text)


@torch.no_grad()
def test_detected_language_equals_openai_whisper(multilingual, mel):
    reference, model = multilingual
    _, probs = reference.detect_language(mel)
    result = transcribe(model, mel, language=None, max_tokens=2, progress=False)
    assert result.language == max(probs[0], key=probs[0].get)
    assert result.prompt[1] == get_tokenizer(model, language=result.language).sot_sequence[1]


@torch.no_grad()
def test_cached_decoding_equals_uncached_with_and_without_hooks(multilingual, mel):
    _, model = multilingual
    for h in (
        None,
        hooks.ablate("decoder.blocks.1.cross_attn.hook_z", head=2)
        + hooks.ablate("decoder.blocks.0.mlp.hook_post", neuron=[0, 5]),
    ):
        cached = transcribe(model, mel, hooks=h, max_tokens=MAX_TOKENS, progress=False)
        uncached = transcribe(model, mel, hooks=h, max_tokens=MAX_TOKENS, use_cache=False, progress=False)
        assert cached.tokens == uncached.tokens and len(cached.tokens) > 3
    assert cached.tokens != transcribe(model, mel, max_tokens=MAX_TOKENS, progress=False).tokens  # the hooks acted


@torch.no_grad()
def test_hooks_see_every_decoding_step_and_are_removed(multilingual, mel):
    _, model = multilingual
    seen = []
    result = transcribe(
        model,
        mel,
        hooks=[("decoder.blocks.0.hook_resid_post", lambda x, hook: seen.append(x.shape))],
        max_tokens=MAX_TOKENS,
        suppress_tokens=[get_tokenizer(model).eot],
        progress=False,
    )
    n_prompt = len(result.prompt)
    assert len(result.tokens) == MAX_TOKENS
    assert seen == [(1, n_prompt, SPEECH.n_text_state)] + [(1, 1, SPEECH.n_text_state)] * (MAX_TOKENS - 1)

    def fail(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        transcribe(model, mel, hooks=[("decoder.blocks.1.attn.hook_pattern", fail)], progress=False)
    with pytest.raises(ValueError, match="unknown hook name"):
        transcribe(model, mel, hooks=hooks.cache("decoder.block.1.hook_resid_post"), progress=False)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


@torch.no_grad()
def test_full_decoder_pass_over_the_transcript(multilingual, mel):
    """run_with_cache on prompt + transcript: activations at every position, and its greedy choices are the transcript."""
    _, model = multilingual
    result = transcribe(model, mel, max_tokens=MAX_TOKENS, progress=False)
    logits, cache = model.run_with_cache(mel, result.sequence)
    n_pos = len(result.prompt) + len(result.tokens)
    assert cache["decoder.blocks.2.cross_attn.hook_pattern"].shape[2] == n_pos
    assert cache["decoder.blocks.2.hook_resid_post"].shape[1] == n_pos
    chosen = logits[0, len(result.prompt) - 1 : -1].clone()
    chosen[:, suppressed_tokens(get_tokenizer(model))] = float("-inf")
    assert chosen.argmax(-1).tolist() == result.tokens


def test_transcribe_rejects_bad_input(multilingual):
    _, model = multilingual
    with pytest.raises(ValueError, match="audio is empty"):
        transcribe(model, torch.zeros(0), progress=False)
    with pytest.raises(ValueError, match="one recording"):
        transcribe(model, torch.zeros(2, 80, 3000), progress=False)
