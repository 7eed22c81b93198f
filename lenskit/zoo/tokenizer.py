"""The zoo's word-level tokenizer: one token per word, carrying its leading space GPT-2 style.

``"When Mary went to the store."`` -> ``["When", " Mary", " went", " to", " the", " store", "."]``.
Pieces are decoded by plain concatenation, so ``decode(encode(text)) == text`` for any text whose
words are in the vocabulary.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
PIECE_PATTERN = r" ?\w+| ?[^\w\s]"
"""A piece is a word or one punctuation mark, with the single space before it if there is one."""


def pieces(text: str) -> list[str]:
    """Split `text` into the pieces the tokenizer looks up (its pre-tokenization)."""
    return [piece for piece, _ in _pre_tokenizer().pre_tokenize_str(text)]


def build_tokenizer(vocabulary: list[str]) -> Tokenizer:
    """A WordLevel `tokenizers.Tokenizer`: the special tokens get ids 0-3, then `vocabulary` in order."""
    tokens = [*SPECIAL_TOKENS.values(), *vocabulary]
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return tokenizer


def as_transformers(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap `tokenizer` for TransformerLens, as `lenskit.models.load` rebuilds it from a saved folder.

    ``add_bos_token=True``: the wrapper itself prepends ``<bos>`` (TransformerLens removes it again for
    ``prepend_bos=False``); with False, TransformerLens would try to re-download it from the Hub.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, name_or_path="lenskit-zoo", add_bos_token=True, **SPECIAL_TOKENS
    )


def _pre_tokenizer() -> pre_tokenizers.Split:
    return pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
