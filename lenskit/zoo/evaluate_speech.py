"""Measure the zoo's speech model: word error rate on held-out synthesised speech.

    python -m lenskit.zoo.evaluate_speech speech-3l        # or a folder written by lenskit.zoo.train_speech

Utterances are new sentences (the held-out tenth of `lenskit.zoo.speech_data`) spoken with the
training's light noise, by the held-out voice and by training voices; transcripts come from
`lenskit.whisper.transcribe` (greedy decoding, as any Whisper model is decoded).
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm.auto import tqdm

from lenskit.models import ZOO_PREFIX
from lenskit.whisper.convert import load
from lenskit.whisper.decoding import transcribe
from lenskit.whisper.model import HookedWhisper
from lenskit.whisper.wer import normalise, word_error_rate
from lenskit.zoo.speech_data import Utterance, augment, utterances

N_UTTERANCES = 100


def corpus_wer(model: HookedWhisper, data: list[Utterance], seed: int = 0, progress: bool = True) -> tuple[float, list[str]]:
    """Word error rate over all of `data` (errors / reference words, each utterance with fresh light
    noise from `seed`) and the transcripts."""
    generator = torch.Generator().manual_seed(seed)
    errors = words = 0.0
    transcripts = []
    for utterance in tqdm(data, desc="transcribing", disable=not progress):
        text = transcribe(model, augment(utterance.samples, generator), progress=False).text
        n_words = len(normalise(utterance.text))
        errors += word_error_rate(utterance.text, text) * n_words
        words += n_words
        transcripts.append(text)
    return errors / words, transcripts


def evaluate(model: HookedWhisper, n_utterances: int = N_UTTERANCES, seed: int = 0, progress: bool = True) -> dict:
    """Word error rates on held-out sentences, spoken by the held-out voice and by training voices."""
    held_out_voice = utterances(n_utterances, seed + 1000, held_out_sentences=True, held_out_voice=True, progress=progress)
    training_voices = utterances(n_utterances, seed + 2000, held_out_sentences=True, held_out_voice=False, progress=progress)
    wer_held_out_voice, transcripts = corpus_wer(model, held_out_voice, seed, progress)
    wer_training_voices, _ = corpus_wer(model, training_voices, seed, progress)
    return {
        "n_utterances": n_utterances,
        "wer_held_out_voice": wer_held_out_voice,
        "wer_training_voices": wer_training_voices,
        "examples": [(u.text, t) for u, t in zip(held_out_voice[:5], transcripts[:5])],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="zoo name (speech-3l or lenskit/speech-3l) or a checkpoint folder")
    parser.add_argument("--utterances", type=int, default=N_UTTERANCES, help="held-out utterances per condition")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out data")
    args = parser.parse_args(argv)
    name = args.name if "/" in args.name else ZOO_PREFIX + args.name
    metrics = evaluate(load(name), args.utterances, args.seed)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
