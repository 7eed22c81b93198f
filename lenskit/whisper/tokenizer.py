"""Whisper's tokenizer (openai-whisper's, built offline from the files in its package) and token helpers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import torch
from jaxtyping import Int
from torch import Tensor

if TYPE_CHECKING:
    from whisper.tokenizer import Tokenizer

    from lenskit.whisper.model import HookedWhisper

TokensLike = Union[Tensor, Sequence[int]]


def get_tokenizer(model: "HookedWhisper", language: str | None = "en", task: str = "transcribe") -> "Tokenizer":
    """openai-whisper's tokenizer for `model` (multilingual or English-only, as its vocabulary says).

    `language` and `task` set the start-of-transcript sequence of multilingual models (English-only
    models have none). Needs openai-whisper (``pip install 'lenskit[whisper]'``).
    """
    try:
        from whisper.tokenizer import get_tokenizer as whisper_tokenizer
    except ImportError:
        raise ImportError("Whisper's tokenizer comes from openai-whisper: pip install 'lenskit[whisper]'") from None
    if model.cfg.n_vocab < 51864:
        raise ValueError(f"this model's vocabulary ({model.cfg.n_vocab} tokens) is smaller than Whisper's "
                         "tokenizer (51864 or more): it has no text tokenizer")
    multilingual = model.is_multilingual
    return whisper_tokenizer(multilingual, num_languages=model.num_languages,
                             language=language if multilingual else None, task=task if multilingual else None)


def token_batch(tokens: TokensLike) -> Int[Tensor, "1 pos"]:
    """Token ids as a [1, pos] tensor, from a list of ids, a [pos] tensor or a [1, pos] tensor."""
    ids = torch.as_tensor(tokens, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"expected the token ids of one sequence ([pos] or [1, pos]), got shape {tuple(ids.shape)}")
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
        raise ValueError(f"{text!r} is not a single token: it splits into {len(ids)} tokens {pieces}")
    return ids[0]
