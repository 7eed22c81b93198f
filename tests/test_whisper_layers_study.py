"""whisper-layers on the real Whisper tiny.en (faster-whisper-tiny.en, offline): word error rates equal jiwer's
computed directly, batched decoding equals `transcribe` one recording at a time, truncated encodings equal
encoding under `remove_final_layers`, and the logit-lens table equals the lens' logits read by hand."""

import pytest
import torch
from test_whisper_support import one_torch_thread  # noqa: F401  (fixture)

from lenskit import experiments, whisper
from lenskit.experiments import whisper_layers
from lenskit.whisper.layers import greedy_batch, remove_final_layers, repeats, truncated_encodings
from lenskit.whisper.wer import corpus_word_error_rate, normalise, word_error_rate

jiwer = pytest.importorskip("jiwer", reason="word error rates need jiwer")
N_UTTERANCES = 2
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def model(tiny_en):
    return tiny_en


@pytest.fixture(scope="module")
def speech():
    return whisper_layers.harvard_speech(3, progress=False)


@pytest.fixture(scope="module")
def study(model):
    return experiments.run("whisper-layers", model, progress=False, n_utterances=N_UTTERANCES, max_tokens=MAX_TOKENS)


def test_word_error_rate_is_jiwers():
    pairs = [
        ("The cat sat.", "the cat, sat"),
        ("the cat sat on the mat", "the cat sit on mat"),
        ("a b", "x a y b z"),
        ("don't stop", "do not stop"),
        ("one two", "..."),
    ]
    for reference, hypothesis in pairs:
        direct = jiwer.wer(" ".join(normalise(reference)), " ".join(normalise(hypothesis)))
        assert word_error_rate(reference, hypothesis) == pytest.approx(direct)
    references, hypotheses = zip(*pairs)
    errors = sum(
        jiwer.process_words(" ".join(normalise(r)), " ".join(normalise(h))).wer * len(normalise(r)) for r, h in pairs
    )
    assert corpus_word_error_rate(references, hypotheses) == pytest.approx(
        errors / sum(len(normalise(r)) for r in references)
    )
    with pytest.raises(ValueError, match="no words"):
        word_error_rate(" ... ", "anything")
    with pytest.raises(ValueError, match="2 references for 1"):
        corpus_word_error_rate(["a", "b"], ["a"])


def test_repeats():
    assert repeats([1, 2, 3, 4], max_tokens=10) is False
    assert repeats([1, 2, 3, 2, 3, 2, 3], max_tokens=10) is True
    assert repeats([1, 2, 3], max_tokens=3) is True  # ran out of tokens


@torch.no_grad()
def test_truncated_encodings_equal_encoding_without_the_layers(model, speech):
    mel = whisper.model_input(speech[0].samples, model.cfg.n_mels, n_frames=model.cfg.n_frames)
    encodings = truncated_encodings(model, mel)
    assert len(encodings) == model.cfg.n_audio_layer + 1
    for count, features in enumerate(encodings):
        with remove_final_layers(model, "encoder", count).on(model):
            torch.testing.assert_close(features, model.encode(mel), rtol=0, atol=1e-6)


@torch.no_grad()
def test_batched_decoding_equals_transcribe(model, speech):
    mels = [whisper.model_input(u.samples, model.cfg.n_mels, n_frames=model.cfg.n_frames) for u in speech]
    features = torch.cat([model.encode(mel) for mel in mels])
    for count in (0, 1, 2):
        removal = remove_final_layers(model, "decoder", count)
        batched = greedy_batch(model, features, removal, max_tokens=MAX_TOKENS)
        for mel, tokens in zip(mels, batched):
            single = whisper.transcribe(model, mel, hooks=removal, max_tokens=MAX_TOKENS, progress=False)
            assert tokens == single.tokens, count


def test_layer_removal_table_against_jiwer_and_transcribe(model, study):
    table, transcripts = study.table, study.tables["transcripts"]
    assert list(table.columns[:4]) == ["part", "removed", "layers_left", "wer"]
    assert [(p, r) for p, r in zip(table.part, table.removed)] == [("encoder", c) for c in range(5)] + [
        ("decoder", c) for c in range(5)
    ]
    references = list(whisper_layers.HARVARD_SENTENCES[:N_UTTERANCES])
    for row in table.itertuples():
        cell = transcripts[(transcripts.part == row.part) & (transcripts.removed == row.removed)]
        assert list(cell.reference) == references
        direct = jiwer.wer(
            [" ".join(normalise(r)) for r in references], [" ".join(normalise(h)) for h in cell.transcript]
        )
        assert row.wer == pytest.approx(direct)
        assert row.mean_wer == pytest.approx(
            sum(jiwer.wer(" ".join(normalise(r)), " ".join(normalise(h))) for r, h in zip(references, cell.transcript))
            / N_UTTERANCES
        )
    speech = whisper_layers.harvard_speech(N_UTTERANCES, progress=False)
    for part, count in [("encoder", 1), ("decoder", 0), ("decoder", 2)]:
        cell = transcripts[(transcripts.part == part) & (transcripts.removed == count)]
        for utterance, text in zip(speech, cell.transcript):
            alone = whisper.transcribe(
                model,
                utterance.samples,
                hooks=remove_final_layers(model, part, count),
                max_tokens=MAX_TOKENS,
                progress=False,
            )
            assert text == alone.text, (part, count)
    rows = study.to_dict()["rows"]
    assert {"part", "removed", "wer"} <= set(rows[0])


@torch.no_grad()
def test_logit_lens_table_by_hand(model, study):
    speech = whisper_layers.harvard_speech(1, progress=False)[0]
    transcript = whisper.transcribe(model, speech.samples, max_tokens=MAX_TOKENS, progress=False)
    sequence = transcript.sequence[0]
    _, cache = model.run_with_cache(
        whisper.model_input(speech.samples, model.cfg.n_mels, n_frames=model.cfg.n_frames), transcript.sequence
    )
    lens = study.tables["decoder logit lens per layer (utterance 0)"]
    start = len(transcript.prompt)
    for layer in range(model.cfg.n_text_layer + 1):
        resid = cache[
            "decoder.blocks.0.hook_resid_pre" if layer == 0 else f"decoder.blocks.{layer - 1}.hook_resid_post"
        ][0]
        logits = model.decoder.ln_final(resid) @ model.decoder.W_E.T
        predicting = logits[start - 1 : -1]
        emitted = sequence[start:]
        row = lens.iloc[layer]
        assert row["emitted token logit"] == pytest.approx(
            predicting[torch.arange(len(emitted)), emitted].mean().item(), abs=1e-3
        )
        assert row["largest logit"] == pytest.approx(predicting.max(-1).values.mean().item(), abs=1e-3)
        assert row["emitted token on top"] == pytest.approx((predicting.argmax(-1) == emitted).float().mean().item())
    assert lens["emitted token on top"].iloc[-1] == 1.0  # the last layer is the model: greedy picked these tokens


def test_figures_show_both_regimes(study):
    titles = [figure.title for figure in study.figures]
    assert titles[0].startswith("word error rate")
    assert any(title.startswith("normal regime") for title in titles)
    assert any(title.startswith("degraded regime") for title in titles)
