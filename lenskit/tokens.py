"""The one place where user input becomes token ids: prompts, answers and targets, every check here.

    as_tokens(model, "When Mary and John")      # [1, pos], BOS prepended as the model does
    as_tokens(model, ["a b", "c d"])            # [2, pos] (right-padded when lengths differ)
    as_tokens(model, torch.tensor([5, 9, 2]))   # [1, 3]: integer ids, checked
    token_id(model, " Mary"); token_ids(model, [" Mary", 1234])   # single tokens (answers, targets)
    str_tokens(model, ids)                      # the string of each id, shaped like ids
    document_ids(model, corpus_text)            # [n]: a document of any length, no BOS (cut into rows later)

Checks, each an `InputError` naming the argument, the value and what is valid: ids are integers
(not floats or bools) inside 0..d_vocab-1; a prompt fits the model's context (no silent
truncation: TransformerLens' ``to_tokens`` would cut it to n_ctx); a single token is one token of
the vocabulary, never a string the tokenizer reads as its unknown token. A prompt the tokenizer
reads with its unknown token is allowed (models meet unknown words) but warned about
(`UnknownTokenWarning`, naming the words).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from lenskit.backend import Model
from lenskit.errors import InputError

TokenLike = str | int


class UnknownTokenWarning(UserWarning):
    """A prompt holds words the tokenizer reads as its unknown token."""


Prompts = str | Sequence[str] | Int[Tensor, "batch pos"] | Int[Tensor, "pos"]


def token_id(model: Model, token: TokenLike, what: str = "token") -> int:
    """The id of a single token given as a string (e.g. " Mary") or an id.

    A string that is itself a vocabulary entry is that entry; any other string must tokenize to one
    token that is not the unknown token. Raises InputError naming `what` (the argument), the string
    and how the tokenizer splits it, or the id and the vocabulary range.
    """
    if isinstance(token, Tensor) and token.ndim == 0:
        if token.is_floating_point() or token.dtype == torch.bool:
            raise InputError(f"{what}: token ids must be integers, got a {token.dtype} tensor {token.item()!r}")
        token = int(token)
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        index = int(token)
        if not 0 <= index < model.cfg.d_vocab:
            raise InputError(f"{what}: token id {index} is outside the vocabulary (0..{model.cfg.d_vocab - 1})")
        return index
    if not isinstance(token, str):
        raise InputError(f"{what}: expected a token string or id (an integer), got {type(token).__name__}: {token!r}")
    if model.tokenizer is None:
        raise InputError(f"{what}: {token!r} is a string but this model has no tokenizer; give token ids")
    vocabulary = model.tokenizer.get_vocab()
    if token in vocabulary:  # e.g. " time" in a llama2.c vocabulary, which tokenizes with an extra leading space
        return vocabulary[token]
    ids = model.to_tokens(token, prepend_bos=False, truncate=False)[0]
    if len(ids) != 1:
        raise InputError(
            f"{what}: {token!r} is not a single token: it splits into {len(ids)} tokens "
            f"{model.to_str_tokens(token, prepend_bos=False)}"
        )
    unk = getattr(model.tokenizer, "unk_token_id", None)
    if unk is not None and int(ids[0]) == unk:
        raise InputError(
            f"{what}: {token!r} is not in the vocabulary (the tokenizer reads it as its unknown "
            f"token {model.tokenizer.unk_token!r})"
        )
    return int(ids[0])


def token_ids(model: Model, tokens: TokenLike | Sequence[TokenLike] | Tensor, what: str = "token") -> Tensor:
    """Token ids [n] for one token or a sequence of them (strings or ids), each checked by `token_id`."""
    if not isinstance(tokens, (Sequence, Tensor, np.ndarray)) or (isinstance(tokens, Tensor) and tokens.ndim == 0):
        tokens = [tokens]  # one token: token_id checks what it is
    if isinstance(tokens, str):
        tokens = [tokens]
    if isinstance(tokens, Tensor) and tokens.ndim != 1:
        raise InputError(f"{what}: expected one token or a list of them, got a tensor of shape {tuple(tokens.shape)}")
    tokens = list(tokens)
    if not tokens:
        raise InputError(f"{what}: no tokens given")
    return torch.tensor([token_id(model, t, what) for t in tokens], dtype=torch.long)


def as_tokens(
    model: Model, tokens: Prompts, what: str = "tokens", prepend_bos: bool | None = None
) -> Int[Tensor, "batch pos"]:
    """Token ids [batch, pos] on the model's device from a text (BOS prepended as the model does, or as
    `prepend_bos` says), a list of texts, or integer ids [pos] / [batch, pos]; a `lenskit.Run` gives its own."""
    run_tokens = getattr(tokens, "tokens", None)
    if isinstance(run_tokens, Tensor):  # a Run
        return run_tokens
    if isinstance(tokens, str) or (
        isinstance(tokens, Sequence)
        and not isinstance(tokens, Tensor)
        and tokens
        and all(isinstance(t, str) for t in tokens)
    ):
        if model.tokenizer is None:
            raise InputError(f"{what}: this model has no tokenizer, so give token ids rather than text")
        ids = model.to_tokens(tokens, prepend_bos=prepend_bos, truncate=False)
        check_context(model, ids.shape[1], what)
        _warn_unknown(model, [tokens] if isinstance(tokens, str) else list(tokens), what)
        return ids
    if isinstance(tokens, Sequence) and not tokens:
        raise InputError(f"{what}: no prompts given (an empty list)")
    if isinstance(tokens, Sequence) and any(isinstance(t, str) for t in tokens):
        raise InputError(f"{what}: a list mixes texts and other things; give texts only, or token ids")
    try:
        ids = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(
            f"{what}: expected a text, a list of texts or integer token ids, got {type(tokens).__name__} ({error})"
        ) from None
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.numel() == 0:
        raise InputError(
            f"{what}: expected a text or token ids [pos] / [batch, pos], got a tensor of shape {tuple(ids.shape)}"
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InputError(
            f"{what} must be a text, a list of texts or integer token ids [batch, pos] or [pos], "
            f"not a {ids.dtype} tensor of shape {tuple(ids.shape)}: token ids must be integer ids "
            "(cast with .long() if you mean it)"
        )
    outside = ids[(ids < 0) | (ids >= model.cfg.d_vocab)].unique()
    if len(outside):
        raise InputError(
            f"{what}: token ids {outside[:10].tolist()} are outside the vocabulary; token ids must "
            f"lie in 0..{model.cfg.d_vocab - 1}"
        )
    check_context(model, ids.shape[1], what)
    return ids.long().to(model.cfg.device)


def _warn_unknown(model: Model, texts: list[str], what: str) -> None:
    """A warning (not silence, not an error: a prompt may hold words the model never saw) when the
    tokenizer reads a text with its unknown token, naming the words."""
    unk = getattr(model.tokenizer, "unk_token", None)
    for text in texts:
        if unk is not None and unk not in text and not knows_every_word(model, text):
            warnings.warn(
                f"{what}: the tokenizer does not know {_unknown_words(model, text)} in {text!r} and "
                f"reads {unk!r} there",
                UnknownTokenWarning,
                stacklevel=3,
            )


def _unknown_words(model: Model, text: str) -> list[str] | str:
    """The parts of `text` the tokenizer reads as its unknown token (the whole text if it cannot say)."""
    try:
        encoded = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return text
    return [
        text[start:end]
        for id_, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
        if id_ == model.tokenizer.unk_token_id
    ]


def knows_every_word(model: Model, text: str) -> bool:
    """Whether the tokenizer reads `text` without its unknown token."""
    unk = getattr(model.tokenizer, "unk_token_id", None)
    return unk is None or unk not in model.to_tokens(text, prepend_bos=False, truncate=False)[0]


def document_ids(model: Model, text: str, what: str = "text") -> Int[Tensor, " n"]:
    """The token ids [n] of a text of any length, without BOS and not held to the context: a document
    that the caller cuts into rows (`lenskit.shards.stream_cache`)."""
    if model.tokenizer is None:
        raise InputError(f"{what}: this model has no tokenizer, so give token ids rather than text")
    return model.to_tokens(text, prepend_bos=False, truncate=False)[0]


def check_context(model: Model, n_pos: int, what: str = "tokens") -> None:
    """InputError unless `n_pos` positions fit the model's context (cfg.n_ctx)."""
    if n_pos > model.cfg.n_ctx:
        raise InputError(
            f"{what}: {n_pos} tokens do not fit the model's context of n_ctx={model.cfg.n_ctx} "
            f"tokens; shorten the prompt (lenskit never truncates silently)"
        )


def str_tokens(model: Model, ids: Int[Tensor, "..."]) -> np.ndarray:
    """The string of each token id, as a numpy array of str shaped like `ids` (the id itself without a tokenizer)."""
    ids = torch.as_tensor(ids).cpu()
    unique, inverse = ids.unique(return_inverse=True)
    names = model.to_str_tokens(unique) if model.tokenizer is not None else [str(i) for i in unique.tolist()]
    return np.array(names, dtype=object)[inverse.numpy()]


def token_labels(model: Model, ids: Int[Tensor, " pos"]) -> list[str]:
    """The string of each token of one prompt, as a list (the ids as text without a tokenizer)."""
    return list(str_tokens(model, ids))
