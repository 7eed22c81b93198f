"""Removing Whisper's final layers: the transcript and word error rate as the encoder or decoder gets shallower.

The experiment of the whisper_logit_lens study: on whisper-medium the decoder tolerated about
3 removed layers of 24 and the encoder about 8 before the output turned into repetition and
unrelated text. Removing a block is `hooks.skip` on it (its attention, cross-attention and MLP
outputs zeroed, so the residual stream passes through unchanged); the final layer norm and
everything after it stay.

    >>> layer_removal(model, "speech.wav", "the quick brown fox", part="encoder", counts=[0, 2, 4])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import pandas as pd
from tqdm.auto import tqdm

from lenskit import hooks
from lenskit.hooks import Hooks
from lenskit.whisper.audio import AudioLike, model_input
from lenskit.whisper.decoding import transcribe
from lenskit.whisper.model import HookedWhisper
from lenskit.whisper.wer import word_error_rate

Part = Literal["encoder", "decoder"]


def remove_final_layers(model: HookedWhisper, part: Part, count: int) -> Hooks:
    """Hooks that make the last `count` blocks of the encoder or decoder the identity."""
    n_layers = _n_layers(model, part)
    if not 0 <= count <= n_layers:
        raise ValueError(f"cannot remove {count} layers: the {part} has {n_layers} (valid 0..{n_layers})")
    layers = list(range(n_layers - count, n_layers))
    return hooks.skip(model, layers, stack=f"{part}.blocks") if layers else Hooks()


def layer_removal(
    model: HookedWhisper,
    audio: AudioLike,
    reference_text: str,
    part: Part = "decoder",
    counts: Iterable[int] | None = None,
    max_tokens: int = 224,
    language: str | None = "en",
    progress: bool = True,
) -> pd.DataFrame:
    """Transcribe with 0, 1, ... final layers of `part` removed; one row per count.

    Columns: part, removed, layers_left, transcript, wer (word error rate against `reference_text`).
    `counts` defaults to every count from 0 to the number of layers.
    """
    n_layers = _n_layers(model, part)
    counts = list(range(n_layers + 1) if counts is None else counts)
    mel = model_input(audio, model.cfg.n_mels, n_frames=model.cfg.n_frames)
    rows = []
    for count in tqdm(counts, desc=f"removing {part} layers", disable=not progress):
        transcript = transcribe(model, mel, hooks=remove_final_layers(model, part, count), max_tokens=max_tokens,
                                language=language, progress=False)
        rows.append(dict(part=part, removed=count, layers_left=n_layers - count, transcript=transcript.text,
                         wer=word_error_rate(reference_text, transcript.text)))
    return pd.DataFrame(rows)


def _n_layers(model: HookedWhisper, part: str) -> int:
    if part not in ("encoder", "decoder"):
        raise ValueError(f"part must be 'encoder' or 'decoder', not {part!r}")
    return model.cfg.n_audio_layer if part == "encoder" else model.cfg.n_text_layer
