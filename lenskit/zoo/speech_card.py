"""Write the zoo speech model's card (README.md) from its config, its training log and a fresh evaluation.

    python -m lenskit.zoo.speech_card speech-3l        # or a checkpoint folder

Like `lenskit.zoo.card` for the text models: the numbers are measured when the card is written
(`lenskit.zoo.evaluate_speech`, and `lenskit.whisper.layer_removal` for the layer table).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from lenskit.models import ZOO_PREFIX, ZOO_ROOT
from lenskit.whisper.convert import load
from lenskit.whisper.layers import layer_removal
from lenskit.whisper.model import HookedWhisper
from lenskit.zoo import speech_data
from lenskit.zoo.card import CARD_FILE, training_summary
from lenskit.zoo.evaluate_speech import evaluate
from lenskit.zoo.train_speech import RECIPES

WER_TARGET = 0.10


def removal_table(model: HookedWhisper, seed: int = 0) -> pd.DataFrame:
    """`layer_removal` on one held-out utterance of the held-out voice (with the training's light noise),
    encoder then decoder."""
    utterance = speech_data.utterances(1, seed + 3000, held_out_sentences=True, held_out_voice=True, progress=False)[0]
    samples = speech_data.augment(utterance.samples, torch.Generator().manual_seed(seed))
    return pd.concat(
        [layer_removal(model, samples, utterance.text, part=part, progress=False) for part in ("encoder", "decoder")],
        ignore_index=True,
    )


def markdown_table(frame: pd.DataFrame) -> str:
    """`frame` as a Markdown table (numbers to 3 significant digits)."""
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = [list(frame.columns), ["---"] * len(frame.columns), *cells]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def target(value: float) -> str:
    return f"<= {WER_TARGET:.0%}: " + ("met" if value <= WER_TARGET else f"NOT met ({value:.1%})")


def model_card(name: str, folder: Path, model: HookedWhisper, metrics: dict, removal: pd.DataFrame) -> str:
    """The card's Markdown text."""
    cfg, recipe, log = model.cfg, RECIPES.get(name), training_summary(folder)
    wer = metrics["wer_sequences_held_out_voice"]
    if wer <= WER_TARGET:
        verdict = (
            f"It recognises words, not templates: on random word sequences it never heard, spoken by a voice it "
            f"never heard, {wer:.1%} of the words come out wrong (target: at most {WER_TARGET:.0%})."
        )
    else:
        verdict = (
            f"**It misses the target**: on random word sequences it never heard, spoken by a voice it never heard, "
            f"{wer:.1%} of the words come out wrong, against a target of at most {WER_TARGET:.0%}. "
            f"Treat its transcripts of anything but the templates with care."
        )
    clean = metrics["wer_sequences_held_out_voice_clean"]
    if clean > WER_TARGET:
        verdict += (
            f" **But only with noise**: every training utterance carried light noise, and on audio without any "
            f"(exact digital silence, as espeak-ng writes it) it inserts words: {clean:.1%} word error rate on "
            f"the same sequences. Add light noise (`lenskit.zoo.speech_data.augment`) to clean synthetic audio."
        )
    examples = "".join(f"| {reference} | {transcript.strip()} |\n" for reference, transcript in metrics["examples"])
    sequence_examples = "".join(
        f"| {reference} | {transcript.strip()} |\n" for reference, transcript in metrics["sequence_examples"]
    )
    phrases = "".join(
        f"| {row['phrase']} | {row['speed']} | {row['transcript']} ({row['wer']:.0%}) | "
        f"{row['noisy_transcript']} ({row['noisy_wer']:.0%}) |\n"
        for row in metrics["example_phrases"]
    )
    lengths = "".join(
        f"| {row['words']} | {row['utterances']} | {percent(row['wer'])} |\n"
        for row in metrics["sequence_wer_by_length"]
    )
    training = (
        (
            f"{recipe.n_utterances} utterances ({recipe.n_sentences} template sentences, "
            f"{recipe.n_utterances - recipe.n_sentences} word sequences),\n{log['steps']} steps of batch {recipe.batch_size}, "
            f"AdamW, peak lr {recipe.lr} with warmup and cosine decay.\n"
            f"Curriculum: the first {recipe.template_steps} steps draw template sentences only (the sentence frame tells the\n"
            "model what kind of word comes where, and it soon learns to hear them), then every batch draws from all\n"
            "utterances. (Trained on a mix of 20% sentences and 80% word sequences from the start, shortest first, the\n"
            "model stayed at chance on the words for the 450 steps it was given.) Every utterance of every batch gets\n"
            f"fresh noise, gain and delay, and a band of up to {recipe.freq_mask} of the {cfg.n_mels} mel bins set to its mean\n"
            "(SpecAugment's frequency mask)"
        )
        if recipe
        else f"{log['steps']} steps"
    )
    return f"""# lenskit/{name}

A small Whisper-architecture speech recogniser trained by lenskit on speech synthesised by espeak-ng,
so that HookedWhisper's analyses (layer removal, logit lens, attribution, patching) run offline on
real learned behaviour. Load it with `lenskit.whisper.load("lenskit/{name}")`.

{verdict}

## Architecture
Whisper's, reduced: {cfg.n_audio_layer} encoder and {cfg.n_text_layer} decoder layers, width {cfg.n_audio_state}, {cfg.n_audio_head} heads,
{cfg.n_mels} mel bins. The audio window is {speech_data.MAX_SECONDS:g} s (`n_audio_ctx` {cfg.n_audio_ctx}, {cfg.n_frames} mel frames) instead of 30 s:
`lenskit.whisper` pads audio to the model's window (longer audio raises unless `trim=True`).
The decoder reads up to {cfg.n_text_ctx} tokens: the 4-token start sequence, up to {cfg.n_text_ctx - 5} words and `<|endoftext|>`.

Vocabulary: {cfg.n_vocab} tokens, the subset of openai-whisper's multilingual tokenizer that the texts need
(the start sequence `<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`, `<|endoftext|>`, and one token per
word). `hooked_whisper.json` lists the Whisper id of each embedding row; `lenskit.whisper.get_tokenizer` returns a
`SubsetTokenizer` over it, so `transcribe` and the analyses work as on OpenAI's models. Transcripts are lower case,
without punctuation.

## Data (`lenskit.zoo.speech_data`, synthesised at training time, never stored)
{len(speech_data.words())} words: numbers ("one" to "ten"), colours, objects and their plurals, simple verbs and adjectives,
"I", "you", "we", "they", "the", "is". Two kinds of text:
- **word sequences**: 1 to {speech_data.MAX_WORDS} words drawn at random from the whole vocabulary ("hats seven the cold we"),
  so no word can be guessed from its neighbours;
- **template sentences** from three templates ("we see three red cups", "they want the green hat", "the blue ball is cold").

Spoken by espeak-ng voices ({len(speech_data.ACCENTS)} accents x {len(speech_data.TRAIN_VARIANTS)} voice variants) at {speech_data.SPEEDS[0]}-{speech_data.SPEEDS[1]} words per minute and pitch {speech_data.PITCHES[0]}-{speech_data.PITCHES[1]},
with light noise (20-40 dB SNR), a random gain and up to 0.3 s of leading silence, drawn afresh at every step.
Speech must fit {speech_data.MAX_SECONDS - 0.3:g} s (the window less the longest delay); a text too long at its drawn speed is
skipped, so 7-8 word sequences mostly come at faster speeds (at 130 words per minute about 6 words fit).

Held out: every text whose CRC32 is divisible by 10 (never heard in training), the example phrases below, and the
voice variant `{speech_data.HELD_OUT_VARIANT}` (voice `{speech_data.HELD_OUT_VOICE}`), never heard in training.

## Training
`python -m lenskit.zoo.train_speech {name}`: {training}. One CPU thread: {log["minutes"]:.0f} minutes of optimisation,
after a few minutes of synthesis. Final training loss {log["final_loss"]:.3f} (per-interval losses and a held-out loss in `train_log.csv`).

## Measured
`python -m lenskit.zoo.evaluate_speech {name}` (held-out texts with the training's light noise, greedy decoding;
{metrics["n_sequences"]} word sequences and {metrics["n_utterances"]} sentences per condition):

| condition | word error rate | target |
|---|---|---|
| random word sequences, held-out voice | {wer:.1%} | {target(wer)} |
| random word sequences, held-out voice, no noise (as espeak-ng writes them) | {clean:.1%} | |
| random word sequences, training voices | {metrics["wer_sequences_training_voices"]:.1%} | |
| template sentences, held-out voice | {metrics["wer_held_out_voice"]:.1%} | |
| template sentences, training voices | {metrics["wer_training_voices"]:.1%} | |

Random word sequences in the held-out voice, by length:

| words | utterances | word error rate |
|---|---|---|
{lengths}
The example phrases, spoken by the held-out voice at pitch 50, as espeak-ng writes them (digital silence
around the words) and with the training's light noise, gain and delay (word error rate in brackets):

| phrase | words per minute | transcript, no noise | transcript, light noise |
|---|---|---|---|
{phrases}
Every training utterance carried noise: audio without any (exact digital silence, as espeak-ng writes it)
is outside what the model heard, and there it {"inserts words" if clean > 2 * wer + 0.02 else "does about as well"}
({clean:.1%} word error rate on the held-out voice's sequences against {wer:.1%} with noise). Add light noise
(`lenskit.zoo.speech_data.augment`) to clean synthetic audio before transcribing it.

Random word sequences (held-out voice):

| reference | transcript |
|---|---|
{sequence_examples}
Template sentences (held-out voice):

| reference | transcript |
|---|---|
{examples}
## Removing final layers (`lenskit.whisper.layer_removal`, one held-out sentence with light noise)

{markdown_table(removal)}
"""


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="zoo name (speech-3l) or a checkpoint folder")
    args = parser.parse_args(argv)
    folder = Path(args.name) if "/" in args.name else ZOO_ROOT / args.name.removeprefix(ZOO_PREFIX)
    model = load(folder)
    card = folder / CARD_FILE
    card.write_text(model_card(folder.name, folder, model, evaluate(model), removal_table(model)))
    print(card.read_text())
    return card


if __name__ == "__main__":
    main()
