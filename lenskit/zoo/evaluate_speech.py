"""Measure the zoo's speech model: word error rate on held-out synthesised speech.

    python -m lenskit.zoo.evaluate_speech speech-3l        # or a folder written by lenskit.zoo.train_speech

Utterances are held-out texts of `lenskit.zoo.speech_data` (never heard in training): random word
sequences, which only a model that hears each word transcribes, and template sentences; each spoken
with the training's light noise, by the held-out voice and by training voices (the held-out voice's
sequences also as espeak-ng wrote them, without noise). The example phrases
(`speech_data.EXAMPLE_PHRASES`) are spoken by the held-out voice at three speeds, without and with noise. Transcripts
come from `lenskit.whisper.transcribe` (greedy decoding, as any Whisper model is decoded).
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
from lenskit.zoo.speech_data import EXAMPLE_PHRASES, HELD_OUT_VOICE, Utterance, Voice, augment, synthesise, utterances

N_UTTERANCES = 100  # held-out template sentences per voice condition
N_SEQUENCES = 200  # held-out random word sequences per voice condition
EXAMPLE_SPEEDS = (130, 160, 190)  # words per minute of the example phrases
LENGTH_BINS = ((1, 2), (3, 4), (5, 6), (7, 8))  # word counts of the per-length table


def corpus_wer(
    model: HookedWhisper, data: list[Utterance], seed: int = 0, progress: bool = True, noise: bool = True
) -> tuple[float, list[str]]:
    """Word error rate over all of `data` (errors / reference words, each utterance with fresh light
    noise, gain and delay from `seed`, or with ``noise=False`` as espeak-ng wrote it) and the transcripts."""
    generator = torch.Generator().manual_seed(seed)
    errors = words = 0.0
    transcripts = []
    for utterance in tqdm(data, desc="transcribing", disable=not progress):
        samples = augment(utterance.samples, generator) if noise else utterance.samples
        text = transcribe(model, samples, progress=False).text
        n_words = len(normalise(utterance.text))
        errors += word_error_rate(utterance.text, text) * n_words
        words += n_words
        transcripts.append(text)
    return errors / words, transcripts


def wer_by_length(data: list[Utterance], transcripts: list[str]) -> list[dict]:
    """Word error rate of `transcripts` per bin of reference length (`LENGTH_BINS`)."""
    rows = []
    for low, high in LENGTH_BINS:
        pairs = [(u.text, t) for u, t in zip(data, transcripts) if low <= len(u.text.split()) <= high]
        n_words = sum(len(reference.split()) for reference, _ in pairs)
        errors = sum(word_error_rate(reference, t) * len(reference.split()) for reference, t in pairs)
        rows.append({"words": f"{low}-{high}", "utterances": len(pairs), "wer": errors / n_words if n_words else None})
    return rows


def example_transcripts(model: HookedWhisper, seed: int = 0) -> list[dict]:
    """Each example phrase spoken by the held-out voice (pitch 50) at each of `EXAMPLE_SPEEDS`: its transcript
    as espeak-ng wrote it ("transcript": digital silence around the words, no noise) and with the training's
    light noise, gain and delay ("noisy_transcript", drawn from `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for phrase in EXAMPLE_PHRASES:
        for speed in EXAMPLE_SPEEDS:
            samples = synthesise(phrase, Voice(HELD_OUT_VOICE, speed=speed, pitch=50))
            text = transcribe(model, samples, progress=False).text.strip()
            noisy = transcribe(model, augment(samples, generator), progress=False).text.strip()
            rows.append(
                {
                    "phrase": phrase,
                    "speed": speed,
                    "transcript": text,
                    "wer": word_error_rate(phrase, text),
                    "noisy_transcript": noisy,
                    "noisy_wer": word_error_rate(phrase, noisy),
                }
            )
    return rows


def evaluate(
    model: HookedWhisper,
    n_utterances: int = N_UTTERANCES,
    seed: int = 0,
    progress: bool = True,
    n_sequences: int = N_SEQUENCES,
) -> dict:
    """Word error rates on held-out word sequences and held-out sentences, spoken by the held-out voice
    and by training voices, and the example phrases' transcripts."""

    def speech(n, offset, held_out_voice, kind):
        return utterances(
            n, seed + offset, held_out_sentences=True, held_out_voice=held_out_voice, progress=progress, kind=kind
        )

    sequences = speech(n_sequences, 5000, True, "sequences")
    wer_sequences, sequence_transcripts = corpus_wer(model, sequences, seed, progress)
    wer_sequences_clean, _ = corpus_wer(model, sequences, seed, progress, noise=False)
    wer_sequences_training, _ = corpus_wer(model, speech(n_sequences, 6000, False, "sequences"), seed, progress)
    held_out_voice = speech(n_utterances, 1000, True, "sentences")
    wer_held_out_voice, transcripts = corpus_wer(model, held_out_voice, seed, progress)
    wer_training_voices, _ = corpus_wer(model, speech(n_utterances, 2000, False, "sentences"), seed, progress)
    return {
        "n_utterances": n_utterances,
        "n_sequences": n_sequences,
        "wer_sequences_held_out_voice": wer_sequences,
        "wer_sequences_held_out_voice_clean": wer_sequences_clean,
        "wer_sequences_training_voices": wer_sequences_training,
        "wer_held_out_voice": wer_held_out_voice,
        "wer_training_voices": wer_training_voices,
        "sequence_wer_by_length": wer_by_length(sequences, sequence_transcripts),
        "example_phrases": example_transcripts(model),
        "sequence_examples": [(u.text, t) for u, t in zip(sequences[:8], sequence_transcripts[:8])],
        "examples": [(u.text, t) for u, t in zip(held_out_voice[:5], transcripts[:5])],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="zoo name (speech-3l or lenskit/speech-3l) or a checkpoint folder")
    parser.add_argument("--utterances", type=int, default=N_UTTERANCES, help="held-out sentences per voice condition")
    parser.add_argument(
        "--sequences", type=int, default=N_SEQUENCES, help="held-out word sequences per voice condition"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out data")
    args = parser.parse_args(argv)
    name = args.name if "/" in args.name else ZOO_PREFIX + args.name
    metrics = evaluate(load(name), args.utterances, args.seed, n_sequences=args.sequences)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
