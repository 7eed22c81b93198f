"""Write the zoo speech model's card (README.md) from its config, its training log and a fresh evaluation.

    python -m lenskit.zoo.speech_card speech-3l        # or a checkpoint folder

Like `lenskit.zoo.card` for the text models: the numbers are measured when the card is written
(`lenskit.zoo.evaluate_speech`, and `lenskit.whisper.layer_removal` for the layer table).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

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
    """`layer_removal` on one held-out utterance of the held-out voice, encoder then decoder."""
    utterance = speech_data.utterances(1, seed + 3000, held_out_sentences=True, held_out_voice=True, progress=False)[0]
    return pd.concat([layer_removal(model, utterance.samples, utterance.text, part=part, progress=False)
                      for part in ("encoder", "decoder")], ignore_index=True)


def markdown_table(frame: pd.DataFrame) -> str:
    """`frame` as a Markdown table (numbers to 3 significant digits)."""
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = [list(frame.columns), ["---"] * len(frame.columns), *cells]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def model_card(name: str, folder: Path, model: HookedWhisper, metrics: dict, removal: pd.DataFrame) -> str:
    """The card's Markdown text."""
    cfg, recipe, log = model.cfg, RECIPES.get(name), training_summary(folder)
    examples = "".join(f"| {reference} | {transcript} |\n" for reference, transcript in metrics["examples"])
    return f"""# lenskit/{name}

A small Whisper-architecture speech recogniser trained by lenskit on speech synthesised by espeak-ng,
so that HookedWhisper's analyses (layer removal, logit lens, attribution, patching) run offline on
real learned behaviour. Load it with `lenskit.whisper.load("lenskit/{name}")`.

## Architecture
Whisper's, reduced: {cfg.n_audio_layer} encoder and {cfg.n_text_layer} decoder layers, width {cfg.n_audio_state}, {cfg.n_audio_head} heads,
{cfg.n_mels} mel bins. The audio window is {speech_data.MAX_SECONDS:g} s (`n_audio_ctx` {cfg.n_audio_ctx}, {cfg.n_frames} mel frames) instead of 30 s:
`lenskit.whisper` pads audio to the model's window (longer audio raises unless `trim=True`).
The decoder reads up to {cfg.n_text_ctx} tokens.

Vocabulary: {cfg.n_vocab} tokens, the subset of openai-whisper's multilingual tokenizer that the sentences need
(the start sequence `<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`, `<|endoftext|>`, and one token per
word). `hooked_whisper.json` lists the Whisper id of each embedding row; `lenskit.whisper.get_tokenizer` returns a
`SubsetTokenizer` over it, so `transcribe` and the analyses work as on OpenAI's models. Transcripts are lower case,
without punctuation.

## Data (`lenskit.zoo.speech_data`, synthesised at training time, never stored)
Sentences from three templates ("we see three red cups", "they want the green hat", "the blue ball is cold") over
{len(speech_data.words())} words: numbers, colours, objects, simple verbs and adjectives. Spoken by espeak-ng voices
({len(speech_data.ACCENTS)} accents x {len(speech_data.TRAIN_VARIANTS)} voice variants) at {speech_data.SPEEDS[0]}-{speech_data.SPEEDS[1]} words per minute and pitch {speech_data.PITCHES[0]}-{speech_data.PITCHES[1]},
with light noise (20-40 dB SNR), a random gain and up to 0.3 s of leading silence, drawn afresh at every step.

Held out: every sentence whose CRC32 is divisible by 10 (never heard in training), and the voice variant
`{speech_data.HELD_OUT_VARIANT}` (voice `{speech_data.HELD_OUT_VOICE}`), never heard in training.

## Training
`python -m lenskit.zoo.train_speech {name}`: {recipe.n_utterances if recipe else "?"} utterances, {log["steps"]} steps of batch {recipe.batch_size if recipe else "?"},
AdamW, peak lr {recipe.lr if recipe else "?"} with warmup and cosine decay, on one CPU thread ({log["minutes"]:.0f} minutes, synthesis included
in the first minutes). Final training loss {log["final_loss"]:.3f} (per-interval losses and a held-out loss in `train_log.csv`).

## Measured
`python -m lenskit.zoo.evaluate_speech {name}` ({metrics["n_utterances"]} held-out sentences per condition, greedy decoding):

| condition | word error rate | target |
|---|---|---|
| held-out sentences, held-out voice | {metrics["wer_held_out_voice"]:.1%} | <= {WER_TARGET:.0%}: {"met" if metrics["wer_held_out_voice"] <= WER_TARGET else "NOT met"} |
| held-out sentences, training voices | {metrics["wer_training_voices"]:.1%} | |

Examples (held-out voice):

| reference | transcript |
|---|---|
{examples}
## Removing final layers (`lenskit.whisper.layer_removal`, one held-out utterance)

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
