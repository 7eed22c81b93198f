"""Synthetic speech for the zoo's Whisper: short word sequences spoken by Debian's espeak-ng.

Two kinds of text over one small vocabulary (numbers, colours, objects and their plurals, simple
verbs and adjectives): sentences from three templates ("we see three red cups"), and sequences of
1-8 words drawn at random from the whole vocabulary ("hats seven the cold we"), which no template
binds, so a model must hear every word rather than guess it from its place in a sentence. Spoken
by several espeak-ng voices (accent + voice variant) at random speeds and pitches, then given light
noise, a random gain and a random start. Audio is made at training time and never stored.

Held out for evaluation: every text whose CRC32 is divisible by 10 (new sentences and sequences
built from known words), the example phrases of `EXAMPLE_PHRASES`, and the voice variant ``m4``
(never heard in training).

    >>> rng = random.Random(0)
    >>> text = sentence(rng, held_out=False)                       # "we buy the brown cup"
    >>> text = word_sequence(rng, held_out=False)                  # "hats chair"
    >>> samples = synthesise(text, Voice("en-us+m3", speed=150, pitch=50))   # float32 at 16 kHz
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from lenskit.errors import InputError
from lenskit.whisper.audio import SAMPLE_RATE, load_audio

SUBJECTS = ["I", "you", "we", "they"]
VERBS = ["see", "want", "have", "take", "find", "like", "need", "buy"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "brown", "pink"]
OBJECTS = ["cup", "ball", "hat", "book", "car", "chair", "bag", "dog", "cat", "bird", "shoe", "key"]
ADJECTIVES = ["big", "small", "old", "new", "hot", "cold", "clean", "wet"]
EXTRA_WORDS = ["one"]  # in word sequences only: the templates count two or more
EXAMPLE_PHRASES = ("three red cups", "seven green dogs", "one two three four")  # never in training
MAX_WORDS = 8  # the longest word sequence
KINDS = ("sentences", "sequences")

ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-us-nyc"]
TRAIN_VARIANTS = ["m1", "m2", "m3", "m5", "m6", "m7", "f1", "f2", "f3", "f5"]
HELD_OUT_VARIANT = "m4"
HELD_OUT_VOICE = f"en-us+{HELD_OUT_VARIANT}"
SPEEDS = (130, 190)  # words per minute
PITCHES = (25, 75)  # espeak-ng's 0-99 scale
MAX_SECONDS = 3.0  # the model's audio window


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice ("accent+variant"), its speed in words per minute and its pitch (0-99)."""

    name: str
    speed: int = 160
    pitch: int = 50


def sentence(rng: random.Random, held_out: bool) -> str:
    """A random sentence from the training set, or (``held_out=True``) from the held-out set."""
    while True:
        text = _any_sentence(rng)
        if is_held_out(text) == held_out:
            return text


def _any_sentence(rng: random.Random) -> str:
    template = rng.randrange(3)
    colour, thing = rng.choice(COLOURS), rng.choice(OBJECTS)
    if template == 0:
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(NUMBERS)} {colour} {thing}s"
    if template == 1:
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} the {colour} {thing}"
    return f"the {colour} {thing} is {rng.choice(ADJECTIVES)}"


def word_sequence(rng: random.Random, held_out: bool, max_words: int = MAX_WORDS) -> str:
    """1 to `max_words` words drawn uniformly (with replacement) from `words()`, from the training
    set or (``held_out=True``) from the held-out set."""
    vocabulary = words()
    while True:
        text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, max_words)))
        if is_held_out(text) == held_out:
            return text


def text(rng: random.Random, held_out: bool, kind: str = "sentences") -> str:
    """A template sentence (``kind="sentences"``) or a random word sequence (``kind="sequences"``)."""
    if kind not in KINDS:
        raise InputError(f"kind={kind!r}: expected one of {KINDS}")
    return sentence(rng, held_out) if kind == "sentences" else word_sequence(rng, held_out)


def is_held_out(text: str) -> bool:
    """Whether a text belongs to the held-out tenth (by its CRC32, so the split never changes) or is one
    of the `EXAMPLE_PHRASES`."""
    return zlib.crc32(text.encode()) % 10 == 0 or text in EXAMPLE_PHRASES


def words() -> list[str]:
    """Every word any text can use (plural objects included)."""
    return sorted(
        {
            *SUBJECTS,
            *VERBS,
            *NUMBERS,
            *COLOURS,
            *OBJECTS,
            *(o + "s" for o in OBJECTS),
            *ADJECTIVES,
            *EXTRA_WORDS,
            "the",
            "is",
        }
    )


def random_voice(rng: random.Random, held_out: bool) -> Voice:
    """A training voice (any accent, a training variant), or the held-out voice, at a random speed and pitch."""
    name = HELD_OUT_VOICE if held_out else f"{rng.choice(ACCENTS)}+{rng.choice(TRAIN_VARIANTS)}"
    return Voice(name, speed=rng.randint(*SPEEDS), pitch=rng.randint(*PITCHES))


def synthesise(text: str, voice: Voice) -> Float[Tensor, " sample"]:
    """`text` spoken by espeak-ng in `voice`: mono float32 samples at 16 kHz."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("speech synthesis needs espeak-ng (Debian: apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as folder:
        wav = Path(folder) / "utterance.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "-w", str(wav), text],
            check=True,
            capture_output=True,
        )
        return load_audio(wav)


def augment(samples: Float[Tensor, " sample"], generator: torch.Generator) -> Float[Tensor, " sample"]:
    """Light noise (signal-to-noise 20-40 dB), a gain of 0.5-1.5 and up to 0.3 s of silence before the speech."""
    uniform = torch.rand(3, generator=generator)
    snr_db, gain, delay = 20 + 20 * uniform[0], 0.5 + uniform[1], int(0.3 * SAMPLE_RATE * uniform[2])
    noise_scale = samples.pow(2).mean().sqrt() * 10 ** (-snr_db / 20)
    shifted = torch.cat([torch.zeros(delay), samples])
    return gain * (shifted + noise_scale * torch.randn(shifted.shape, generator=generator))


@dataclass
class Utterance:
    text: str
    voice: Voice
    samples: Float[Tensor, " sample"]


def utterances(
    n: int, seed: int, held_out_sentences: bool, held_out_voice: bool, progress: bool = True, kind: str = "sentences"
) -> list[Utterance]:
    """`n` synthesised utterances (no noise yet; see `augment`) short enough for the model's window:
    template sentences or word sequences (`kind`, see `text`), held out or not. A text too long
    for the window at its drawn speed is skipped, so long word sequences come mostly at faster speeds."""
    rng = random.Random(seed)
    made = []
    with tqdm(total=n, desc="synthesising speech", disable=not progress) as bar:
        while len(made) < n:
            words_, voice = text(rng, held_out_sentences, kind), random_voice(rng, held_out_voice)
            samples = synthesise(words_, voice)
            if len(samples) <= (MAX_SECONDS - 0.3) * SAMPLE_RATE:
                made.append(Utterance(words_, voice, samples))
                bar.update()
    return made
