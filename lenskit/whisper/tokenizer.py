"""Whisper's tokenizer (openai-whisper's, built offline from the files in its package) and token helpers."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Union

import torch
from jaxtyping import Int
from torch import Tensor

from lenskit.errors import InputError

if TYPE_CHECKING:
    from whisper.tokenizer import Tokenizer

    from lenskit.whisper.model import HookedWhisper

TokensLike = Union[Tensor, Sequence[int]]


def get_tokenizer(model: "HookedWhisper", language: str | None = "en", task: str = "transcribe") -> "Tokenizer":
    """openai-whisper's tokenizer for `model` (multilingual or English-only, as its vocabulary says).

    `language` and `task` set the start-of-transcript sequence of multilingual models (English-only
    models have none). A model with a `vocabulary` (a subset of the multilingual tokens, like the
    zoo's speech model) gets a `SubsetTokenizer` over it. Needs openai-whisper (``pip install 'lenskit[whisper]'``).
    """
    try:
        from whisper.tokenizer import LANGUAGES
        from whisper.tokenizer import get_tokenizer as whisper_tokenizer
    except ImportError:
        raise ImportError("Whisper's tokenizer comes from openai-whisper: pip install 'lenskit[whisper]'") from None
    if language is not None and language not in LANGUAGES:
        raise InputError(f"language={language!r} is not a Whisper language code; valid: {', '.join(LANGUAGES)}")
    if model.vocabulary is not None:
        full = whisper_tokenizer(True, language=language or "en", task=task)
        return SubsetTokenizer(full, model.vocabulary)
    if model.cfg.n_vocab < 51864:
        raise InputError(
            f"this model's vocabulary ({model.cfg.n_vocab} tokens) is smaller than Whisper's "
            "tokenizer (51864 or more): it has no text tokenizer"
        )
    multilingual = model.is_multilingual
    return whisper_tokenizer(
        multilingual,
        num_languages=model.num_languages,
        language=language if multilingual else None,
        task=task if multilingual else None,
    )


def token_batch(tokens: TokensLike) -> Int[Tensor, "1 pos"]:
    """Token ids as a [1, pos] tensor, from a list of ids, a [pos] tensor or a [1, pos] tensor (integers only)."""
    if isinstance(tokens, str):
        raise InputError(
            f"expected token ids, got the text {tokens!r}; tokenize it first (get_tokenizer(model).encode)"
        )
    try:
        ids = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"expected the token ids of one sequence, got {type(tokens).__name__} ({error})") from None
    if ids.numel() and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
        raise InputError(f"token ids must be integers, got {ids.dtype}")
    ids = ids.long()
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise InputError(f"expected the token ids of one sequence ([pos] or [1, pos]), got shape {tuple(ids.shape)}")
    return ids


def str_tokens(tokens: TokensLike, tokenizer: "Tokenizer | None" = None) -> list[str]:
    """Each token as text (special tokens as ``<|...|>``), or as its id when no tokenizer is given."""
    ids = token_batch(tokens)[0].tolist()
    if tokenizer is None:
        return [str(i) for i in ids]
    return [tokenizer.decode_with_timestamps([i]) for i in ids]


def single_token(tokenizer: "Tokenizer", text: str) -> int:
    """The id of `text` as one token; ValueError showing how it splits otherwise."""
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise InputError(f"{text!r} is not a single token: it splits into {len(ids)} tokens {pieces}")
    return ids[0]


class SubsetTokenizer:
    """openai-whisper's multilingual tokenizer restricted to a subset of its tokens, renumbered.

    Row ``i`` of the model's embedding is Whisper token ``vocabulary[i]``. Encoding text outside
    the subset raises ValueError naming the missing pieces; special tokens the subset lacks
    (e.g. ``translate`` in a transcribe-only model) are None. Offers the attributes of
    openai-whisper's `Tokenizer` that lenskit's decoding and analyses use.
    """

    def __init__(self, full: "Tokenizer", vocabulary: Sequence[int]):
        self.full = full
        self.vocabulary = [int(i) for i in vocabulary]
        self.index = {whisper_id: i for i, whisper_id in enumerate(self.vocabulary)}
        if len(self.index) != len(self.vocabulary):
            raise InputError("the vocabulary lists a Whisper token more than once")

    def to_subset(self, whisper_ids: Sequence[int]) -> list[int]:
        """Whisper ids -> subset ids; ValueError naming the tokens the subset lacks."""
        missing = [i for i in whisper_ids if i not in self.index]
        if missing:
            pieces = [self.full.decode_with_timestamps([i]) for i in missing]
            raise InputError(f"tokens {pieces} are not in this model's {len(self.vocabulary)}-token vocabulary")
        return [self.index[i] for i in whisper_ids]

    def to_whisper(self, ids: Sequence[int]) -> list[int]:
        """Subset ids -> Whisper ids."""
        return [self.vocabulary[i] for i in ids]

    def _special(self, whisper_id: int) -> int | None:
        return self.index.get(whisper_id)

    def encode(self, text: str) -> list[int]:
        return self.to_subset(self.full.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.full.decode(self.to_whisper(ids))

    def decode_with_timestamps(self, ids: Sequence[int]) -> str:
        return self.full.decode_with_timestamps(self.to_whisper(ids))

    @property
    def sot_sequence_including_notimestamps(self) -> tuple[int, ...]:
        return tuple(self.to_subset(self.full.sot_sequence_including_notimestamps))

    @property
    def sot_sequence(self) -> tuple[int, ...]:
        return tuple(self.to_subset(self.full.sot_sequence))

    @cached_property
    def non_speech_tokens(self) -> tuple[int, ...]:
        return tuple(self.index[i] for i in self.full.non_speech_tokens if i in self.index)

    @cached_property
    def all_language_tokens(self) -> tuple[int, ...]:
        return tuple(self.index[i] for i in self.full.all_language_tokens if i in self.index)

    @cached_property
    def all_language_codes(self) -> tuple[str, ...]:
        codes = dict(zip(self.full.all_language_tokens, self.full.all_language_codes))
        return tuple(codes[i] for i in self.full.all_language_tokens if i in self.index)

    def __getattr__(self, name: str) -> int | None:
        """Single special tokens (eot, sot, transcribe, translate, no_speech, no_timestamps, ...)."""
        if name in ("eot", "sot", "sot_prev", "sot_lm", "transcribe", "translate", "no_speech", "no_timestamps"):
            return self._special(getattr(self.full, name))
        raise AttributeError(name)
