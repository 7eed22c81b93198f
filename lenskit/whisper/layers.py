"""Removing Whisper's final layers: the transcript and word error rate as the encoder or decoder gets shallower.

The experiment of the whisper_logit_lens study: on whisper-medium the decoder tolerated about
3 removed layers of 24 and the encoder about 8 before the output turned into repetition and
unrelated text. Removing a block is `hooks.skip` on it (its attention, cross-attention and MLP
outputs zeroed, so the residual stream passes through unchanged); the final layer norm and
everything after it stay.

    >>> layer_removal(model, "speech.wav", "the quick brown fox", part="encoder", counts=[0, 2, 4])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from lenskit import checks, hooks
from lenskit.errors import InputError
from lenskit.hooks import Hooks
from lenskit.sites import act_name
from lenskit.whisper.audio import AudioLike, model_input
from lenskit.whisper.decoding import blank_tokens, model_suppressed_tokens, transcribe
from lenskit.whisper.model import HookedWhisper
from lenskit.whisper.tokenizer import get_tokenizer
from lenskit.whisper.wer import word_error_rate

Part = Literal["encoder", "decoder"]


def remove_final_layers(model: HookedWhisper, part: Part, count: int) -> Hooks:
    """Hooks that make the last `count` blocks of the encoder or decoder the identity."""
    n_layers = _n_layers(model, part)
    if not 0 <= checks.integer(count, "count") <= n_layers:
        raise InputError(f"cannot remove {count} layers: the {part} has {n_layers} (valid 0..{n_layers})")
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
        transcript = transcribe(
            model,
            mel,
            hooks=remove_final_layers(model, part, count),
            max_tokens=max_tokens,
            language=language,
            progress=False,
        )
        rows.append(
            dict(
                part=part,
                removed=count,
                layers_left=n_layers - count,
                transcript=transcript.text,
                wer=word_error_rate(reference_text, transcript.text),
            )
        )
    return pd.DataFrame(rows)


@torch.no_grad()
def truncated_encodings(model: HookedWhisper, mel: Float[Tensor, "batch n_mels frame"]) -> list[Tensor]:
    """Audio features [batch, audio_pos, d_model] with the last c encoder blocks removed, for c = 0..n_layers.

    One encoder pass: ``ln_post`` of each block's output (and of the first block's input for c = n_layers),
    which equals encoding under `remove_final_layers` (skipped blocks pass the residual stream unchanged).
    """
    n_layers = model.cfg.n_audio_layer
    names = [
        act_name("resid_pre", 0, "encoder"),
        *(act_name("resid_post", layer, "encoder") for layer in range(n_layers)),
    ]
    cache = hooks.cache(names)
    with cache.on(model):
        model.encode(mel.to(model.device))
    return [model.encoder.ln_post(cache.store[names[n_layers - count]]) for count in range(n_layers + 1)]


@torch.no_grad()
def greedy_batch(
    model: HookedWhisper,
    audio_features: Float[Tensor, "batch audio_pos d_model"],
    hooks: Iterable | None = None,
    max_tokens: int = 224,
    language: str | None = "en",
) -> list[list[int]]:
    """`transcribe`'s greedy decoding (same prompt, suppressed and blank tokens) for a batch of encoded
    recordings at once, with `hooks` on: the sampled tokens of each row, up to its end of text."""
    tokenizer = get_tokenizer(model, language=language)
    prompt = list(tokenizer.sot_sequence_including_notimestamps)
    suppressed = torch.tensor(model_suppressed_tokens(model, tokenizer), dtype=torch.long, device=model.device)
    blank = blank_tokens(tokenizer) if model.begin_suppress_tokens is None else list(model.begin_suppress_tokens)
    blank = torch.tensor(blank, dtype=torch.long, device=model.device)
    batch = audio_features.shape[0]
    sampled: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    step_input = torch.tensor([prompt] * batch, device=model.device)
    with Hooks(hooks or []).on(model):
        cache = model.new_cache()
        for step in range(max_tokens):
            if len(prompt) + step > model.cfg.n_text_ctx:
                break
            logits = model.decode(step_input, audio_features, cache)[:, -1]
            logits[:, suppressed] = float("-inf")
            if step == 0:
                logits[:, blank] = float("-inf")
            next_tokens = logits.argmax(-1)
            for row, token in enumerate(next_tokens.tolist()):
                if not done[row]:
                    if token == tokenizer.eot:
                        done[row] = True
                    else:
                        sampled[row].append(token)
            if all(done):
                break
            step_input = next_tokens[:, None]
    return sampled


def repeats(tokens: Sequence[int], max_tokens: int, times: int = 3) -> bool:
    """Whether a transcript is in the repeating regime: it ran to `max_tokens` without ending, or some run of
    1-8 tokens comes `times` times in a row."""
    if len(tokens) >= max_tokens:
        return True
    for width in range(1, 9):
        for start in range(len(tokens) - width * times + 1):
            chunk = list(tokens[start : start + width])
            if all(list(tokens[start + k * width : start + (k + 1) * width]) == chunk for k in range(1, times)):
                return True
    return False


@torch.no_grad()
def layer_removal_batch(
    model: HookedWhisper,
    audios: Sequence[AudioLike],
    references: Sequence[str],
    parts: Sequence[Part] = ("encoder", "decoder"),
    max_tokens: int = 96,
    language: str | None = "en",
    progress: bool = True,
) -> pd.DataFrame:
    """`layer_removal` for many recordings at once, every count of each part: one row per (part, count, recording).

    Columns: part, removed, layers_left, utterance (index), reference, transcript, wer (jiwer, this
    recording), repeats (`repeats`). The encoder runs once per recording (`truncated_encodings`); each
    (part, count) decodes all recordings as one batch (`greedy_batch`), at most `max_tokens` tokens each.
    """
    if len(audios) != len(references):
        raise InputError(f"{len(audios)} recordings for {len(references)} reference texts")
    for part in parts:
        _n_layers(model, part)
    mels = [model_input(audio, model.cfg.n_mels, n_frames=model.cfg.n_frames) for audio in audios]
    encodings = [
        truncated_encodings(model, mel) for mel in tqdm(mels, desc="encoding", disable=not progress, leave=False)
    ]
    tokenizer = get_tokenizer(model, language=language)
    jobs = [(part, count) for part in parts for count in range(_n_layers(model, part) + 1)]
    rows = []
    for part, count in tqdm(jobs, desc="removing layers", disable=not progress):
        features = torch.cat([encoding[count if part == "encoder" else 0] for encoding in encodings])
        removal = remove_final_layers(model, "decoder", count) if part == "decoder" else None
        for i, tokens in enumerate(greedy_batch(model, features, removal, max_tokens, language)):
            text = tokenizer.decode(tokens).strip()
            rows.append(
                dict(
                    part=part,
                    removed=count,
                    layers_left=_n_layers(model, part) - count,
                    utterance=i,
                    reference=references[i],
                    transcript=text,
                    wer=word_error_rate(references[i], text),
                    repeats=repeats(tokens, max_tokens),
                )
            )
    return pd.DataFrame(rows)


def _n_layers(model: HookedWhisper, part: str) -> int:
    if part not in ("encoder", "decoder"):
        raise InputError(f"part must be 'encoder' or 'decoder', not {part!r}")
    return model.cfg.n_audio_layer if part == "encoder" else model.cfg.n_text_layer
