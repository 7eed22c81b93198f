"""Turning what a user calls a token (a string or an id) into a token id, with errors that show the split."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

TokenLike = str | int


def token_id(model: HookedTransformer, token: TokenLike) -> int:
    """The id of a single token given as a string (e.g. " Mary") or an id.

    A string that is itself a vocabulary entry is that entry; any other string must tokenize to one
    token. Raises ValueError naming the string and how the tokenizer splits it when it is not one
    token, and for ids outside the vocabulary.
    """
    if isinstance(token, (int, torch.Tensor)) and not isinstance(token, bool):
        index = int(token)
        if not 0 <= index < model.cfg.d_vocab:
            raise ValueError(f"token id {index} is outside the vocabulary (0..{model.cfg.d_vocab - 1})")
        return index
    if not isinstance(token, str):
        raise ValueError(f"expected a token string or id, got {type(token).__name__}: {token!r}")
    vocabulary = model.tokenizer.get_vocab() if model.tokenizer is not None else {}
    if token in vocabulary:  # e.g. " time" in a llama2.c vocabulary, which tokenizes with an extra leading space
        return vocabulary[token]
    ids = model.to_tokens(token, prepend_bos=False)[0]
    if len(ids) != 1:
        raise ValueError(
            f"{token!r} is not a single token: it splits into {len(ids)} tokens "
            f"{model.to_str_tokens(token, prepend_bos=False)}"
        )
    return int(ids[0])


def token_ids(model: HookedTransformer, tokens: TokenLike | Sequence[TokenLike] | Tensor) -> Tensor:
    """Token ids [n] for one token or a sequence of them (strings or ids), each checked by `token_id`."""
    if isinstance(tokens, (str, int)) or (isinstance(tokens, Tensor) and tokens.ndim == 0):
        tokens = [tokens]
    return torch.tensor([token_id(model, t) for t in tokens], dtype=torch.long)


def as_tokens(model: HookedTransformer, tokens: str | Sequence[str] | Tensor) -> Tensor:
    """Token ids [batch, pos] from a text (BOS prepended as the model does), a list of texts, or ids [pos] / [batch, pos]."""
    if isinstance(tokens, str) or (isinstance(tokens, Sequence) and tokens and isinstance(tokens[0], str)):
        return model.to_tokens(tokens)
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(f"expected a text or token ids [pos] / [batch, pos], got a tensor of shape {tuple(tokens.shape)}")
    if tokens.min() < 0 or tokens.max() >= model.cfg.d_vocab:
        raise ValueError(f"token ids must lie in 0..{model.cfg.d_vocab - 1}, got {tokens.min().item()}..{tokens.max().item()}")
    return tokens.to(model.cfg.device)
