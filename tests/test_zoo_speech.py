"""The zoo's speech model: espeak-ng data, the subset tokenizer, the training script (a few steps on
the "tiny" recipe), saving and loading, and the shipped model's measured behaviour on held-out speech:
random word sequences (words, not templates), template sentences and the example phrases."""

import csv
import json
import random
import re

import pytest
import torch

import lenskit
from lenskit import hooks
from lenskit.models import ZOO_ROOT
from lenskit.whisper import (
    HookedWhisper,
    SubsetTokenizer,
    WhisperConfig,
    decoder_logit_lens,
    get_tokenizer,
    layer_removal,
    load,
    save,
    transcribe,
)
from lenskit.whisper.convert import CONFIG_FILE
from lenskit.zoo import speech_data, train_speech
from lenskit.zoo.card import CARD_FILE
from lenskit.zoo.evaluate_speech import corpus_wer, example_transcripts

pytest.importorskip("whisper")
if not speech_data.shutil.which("espeak-ng"):
    pytest.skip("espeak-ng is not installed (.ci/run installs it)", allow_module_level=True)

SHIPPED = "lenskit/speech-3l"
SEQUENCE_WER = 0.10  # the card's target, on random word sequences in the held-out voice
NOISY_EXAMPLE_MISSES = [("one two three four", 190)]  # (phrase, words per minute) wrong with light noise, as measured


@pytest.fixture(scope="module")
def shipped():
    return load(SHIPPED)


@pytest.fixture(scope="module")
def held_out_speech():
    """Held-out sentences spoken by the held-out voice."""
    return speech_data.utterances(12, seed=99, held_out_sentences=True, held_out_voice=True, progress=False)


@pytest.fixture(scope="module")
def held_out_sequences():
    """Held-out random word sequences spoken by the held-out voice."""
    return speech_data.utterances(
        24, seed=99, held_out_sentences=True, held_out_voice=True, progress=False, kind="sequences"
    )


def test_held_out_sentences_and_voice_never_reach_training():
    rng = random.Random(0)
    training = {speech_data.sentence(rng, held_out=False) for _ in range(2000)}
    held_out = {speech_data.sentence(rng, held_out=True) for _ in range(300)}
    assert not training & held_out and all(speech_data.is_held_out(s) for s in held_out)
    assert len(held_out) > 100  # many distinct new sentences, all from known words
    assert {w for s in held_out for w in s.split()} <= set(speech_data.words())
    voices = {speech_data.random_voice(rng, held_out=False).name for _ in range(500)}
    assert not any(v.endswith("+" + speech_data.HELD_OUT_VARIANT) for v in voices)


def test_word_sequences_are_unbound_and_held_out_apart():
    rng = random.Random(1)
    training = [speech_data.text(rng, held_out=False, kind="sequences") for _ in range(3000)]
    held_out = {speech_data.word_sequence(rng, held_out=True) for _ in range(300)}
    assert not set(training) & held_out and not set(training) & set(speech_data.EXAMPLE_PHRASES)
    assert all(speech_data.is_held_out(p) for p in speech_data.EXAMPLE_PHRASES)
    assert {len(t.split()) for t in training} == set(range(1, speech_data.MAX_WORDS + 1))  # 1 word included
    assert {w for t in training for w in t.split()} == set(speech_data.words())  # "one" too: every word is heard
    sentences = {speech_data.text(rng, held_out=False) for _ in range(300)}  # kind="sentences", the default
    assert all(len(s.split()) == 5 for s in sentences) and "one" not in {w for s in sentences for w in s.split()}
    with pytest.raises(ValueError, match="kind='poems': expected one of"):
        speech_data.text(rng, held_out=False, kind="poems")


def test_every_text_fits_the_decoder_and_the_curriculum_starts_on_templates():
    tokenizer, recipe = train_speech.build_tokenizer(), train_speech.RECIPES["speech-3l"]
    assert all(len(tokenizer.encode(" " + w)) == 1 for w in speech_data.words())  # one token per word
    assert 4 + speech_data.MAX_WORDS + 1 <= recipe.n_text_ctx  # start sequence, words, end of text
    assert [train_speech.curriculum(recipe, s) for s in (0, recipe.template_steps - 1, recipe.template_steps)] == [
        "sentences",
        "sentences",
        "all",
    ]
    assert 0 < recipe.n_sentences < recipe.n_utterances / 2  # mostly word sequences
    mel = torch.zeros(80, 10)
    mel[:, :] = torch.arange(80.0)[:, None]
    masked = train_speech.mask_frequencies(mel, 8, torch.Generator().manual_seed(3))
    changed = (masked != mel).any(1)
    assert 0 < changed.sum() <= 8 and torch.equal(masked[~changed], mel[~changed])


def test_subset_tokenizer_speaks_whisper_ids():
    from whisper.tokenizer import get_tokenizer as whisper_tokenizer

    full = whisper_tokenizer(True, language="en", task="transcribe")
    subset = train_speech.build_tokenizer()
    text = " they want seven yellow chairs one"
    ids = subset.encode(text)
    assert subset.to_whisper(ids) == full.encode(text) and subset.decode(ids) == text
    assert subset.to_whisper(subset.sot_sequence_including_notimestamps) == list(
        full.sot_sequence_including_notimestamps
    )
    assert subset.to_whisper([subset.eot]) == [full.eot] and subset.translate is None
    assert subset.all_language_codes == ("en",)
    with pytest.raises(ValueError, match=r"\[' elephant'\] are not in this model's"):
        subset.encode(" the elephant")
    with pytest.raises(ValueError, match="more than once"):
        SubsetTokenizer(full, [full.eot, full.eot])


def test_save_and_load_round_trip(tmp_path):
    cfg = WhisperConfig(
        n_mels=80,
        n_audio_ctx=8,
        n_audio_state=16,
        n_audio_head=2,
        n_audio_layer=1,
        n_vocab=5,
        n_text_ctx=6,
        n_text_state=16,
        n_text_head=2,
        n_text_layer=1,
    )
    model = HookedWhisper(cfg, vocabulary=[50257, 50258, 50259, 50359, 50363])
    save(model, tmp_path)
    loaded = load(tmp_path)
    assert loaded.cfg == cfg and loaded.vocabulary == model.vocabulary
    mel, tokens = torch.randn(1, 80, 16), torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(loaded(mel, tokens), model(mel, tokens))
    with pytest.raises(ValueError, match="lists 2 Whisper tokens; the model has 5 rows"):
        HookedWhisper(cfg, vocabulary=[1, 2])
    with pytest.raises(ValueError, match="no speech model 'lenskit/nope' in the zoo; it ships: lenskit/speech-3l"):
        load("lenskit/nope")
    with pytest.raises(
        ValueError, match=r"is a speech model; load it with lenskit.whisper.load\('lenskit/speech-3l'\)"
    ):
        lenskit.load(SHIPPED)


def test_training_script_end_to_end(tmp_path):
    train_speech.main(["tiny", "--out", str(tmp_path), "--threads", str(torch.get_num_threads())])
    with open(tmp_path / train_speech.LOG_FILE) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4] and all(float(r["held_out_loss"]) > 0 for r in rows)
    model = load(tmp_path)
    recipe = train_speech.RECIPES["tiny"]
    assert model.cfg.n_audio_layer == recipe.n_layers and model.cfg.n_audio_ctx == 150
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["vocabulary"] == train_speech.build_tokenizer().vocabulary
    result = transcribe(model, torch.zeros(16000), max_tokens=3, progress=False)  # runs end to end, 3 s window
    assert len(result.tokens) <= 3


def test_shipped_model_transcribes_held_out_speech(shipped, held_out_speech):
    """The issue's target, on fresh held-out utterances: word error rate at most 10%."""
    wer, transcripts = corpus_wer(shipped, held_out_speech, seed=5, progress=False)
    assert wer <= 0.10, list(zip([u.text for u in held_out_speech], transcripts))
    assert shipped.cfg.n_vocab == len(shipped.vocabulary) < 100
    assert isinstance(get_tokenizer(shipped), SubsetTokenizer)


def test_shipped_model_recognises_words_not_templates(shipped, held_out_sequences):
    """Random word sequences (no template binds them) never heard, in the voice never heard."""
    wer, transcripts = corpus_wer(shipped, held_out_sequences, seed=5, progress=False)
    assert wer <= SEQUENCE_WER, list(zip([u.text for u in held_out_sequences], transcripts))


def test_shipped_model_transcribes_the_example_phrases(shipped):
    """The phrases the template-bound model turned into template sentences ("three red cups" came out
    as "we buy two black cups"), spoken by the held-out voice at 130, 160 and 190 words per minute."""
    rows = example_transcripts(shipped)
    # with the training's light noise: all right but one word (as measured for the card)
    assert [(r["phrase"], r["speed"]) for r in rows if r["noisy_transcript"] != r["phrase"]] == NOISY_EXAMPLE_MISSES, (
        rows
    )
    # as espeak-ng writes them (digital silence, never heard in training) it inserts words (see the card), but
    # hears the words rather than a template sentence (which starts "I", "we", ..., or "the"): every
    # transcript starts with the phrase's first word
    assert all(r["transcript"].split()[0] == r["phrase"].split()[0] for r in rows), rows


def test_shipped_model_rejects_audio_longer_than_its_window(shipped):
    with pytest.raises(ValueError, match="this model reads 3 s windows"):
        transcribe(shipped, torch.zeros(4 * 16000), progress=False)


def test_card_reports_what_the_model_does():
    card = (ZOO_ROOT / "speech-3l" / CARD_FILE).read_text()
    assert "python -m lenskit.zoo.train_speech speech-3l" in card and "held-out voice" in card
    sentences = float(re.search(r"template sentences, held-out voice \| ([\d.]+)%", card).group(1))
    sequences = float(re.search(r"random word sequences, held-out voice \| ([\d.]+)%", card).group(1))
    assert sentences <= 10.0 and sequences <= 100 * SEQUENCE_WER
    assert ("<= 10%: met" in card) == (sequences <= 10.0) and "| three red cups | 160 |" in card


def test_removing_layers_degrades_transcripts(shipped, held_out_speech):
    utterance = held_out_speech[0]
    # with the training's light noise: on noise-free audio the model inserts words (see the card)
    samples = speech_data.augment(utterance.samples, torch.Generator().manual_seed(0))
    for part in ("encoder", "decoder"):
        table = layer_removal(shipped, samples, utterance.text, part=part, progress=False)
        n_layers = shipped.cfg.n_audio_layer if part == "encoder" else shipped.cfg.n_text_layer
        assert list(table.removed) == list(range(n_layers + 1)) and table.wer.iloc[0] == pytest.approx(0.0)
    assert table.wer.iloc[-1] >= 0.5  # no decoder layer left: the transcript is gone
    manual = transcribe(shipped, samples, hooks=hooks.skip(shipped, range(3), stack="decoder.blocks"), progress=False)
    assert table.transcript.iloc[-1] == manual.text


def test_decoder_logit_lens_shows_the_answer_emerging(shipped, held_out_speech):
    utterance = held_out_speech[1]
    result = transcribe(shipped, utterance.samples, progress=False)
    lens = decoder_logit_lens(shipped, utterance.samples, result.sequence)
    logits = lens.logits.tensor  # [layer, pos, vocab]: the embedding, then each block
    probs = logits.softmax(-1)
    targets = result.sequence[0, 1:]
    start = len(result.prompt) - 1  # positions that predict the transcript
    answer = probs[:, start:-1].gather(-1, targets[start:].expand(probs.shape[0], -1)[..., None])[..., 0]
    assert torch.equal(logits[-1, start:-1].argmax(-1), targets[start:])  # the last layer is the model
    assert answer[-1].mean() > 0.9 and answer[0].mean() < answer[-1].mean() - 0.3


def test_whisper_layers_reproduction(shipped):
    from lenskit import experiments

    result = experiments.run("whisper-layers", shipped, progress=False)
    table = result.table
    n_layers = shipped.cfg.n_text_layer
    assert list(table.columns) == ["part", "removed", "layers_left", "mean_wer", "example_transcript"]
    assert list(table.part) == ["encoder"] * (n_layers + 1) + ["decoder"] * (n_layers + 1)
    decoder = table[table.part == "decoder"].set_index("removed").mean_wer
    assert decoder[n_layers] > decoder[0] + 0.5 and decoder[0] <= 0.25
    assert (table.layers_left == n_layers - table.removed).all() and len(result.figures) == 1
