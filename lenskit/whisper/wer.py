"""Word error rate, computed by jiwer on lenskit's normalised words (lower case, punctuation dropped)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from lenskit.errors import InputError


def normalise(text: str) -> list[str]:
    """Lower-case words, punctuation dropped (apostrophes inside words kept)."""
    return re.findall(r"[\w]+(?:'[\w]+)*", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / number of reference words, after `normalise` (``jiwer.wer``).

    0 is a perfect transcript; it exceeds 1 when the transcript adds many words.
    """
    return corpus_word_error_rate([reference], [hypothesis])


def corpus_word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Word errors over all pairs / reference words over all pairs, after `normalise` (``jiwer.wer`` on lists)."""
    if (
        isinstance(references, str)
        or isinstance(hypotheses, str)
        or not all(isinstance(text, str) for text in [*references, *hypotheses])
    ):
        raise InputError("word error rates compare texts: give a list of reference strings and one of transcripts")
    if len(references) != len(hypotheses):
        raise InputError(f"{len(references)} references for {len(hypotheses)} transcripts: give one transcript each")
    if not references:
        raise InputError("no references to compare against")
    refs = [" ".join(normalise(reference)) for reference in references]
    for reference, words in zip(references, refs):
        if not words:
            raise InputError(f"the reference {reference!r} has no words to compare against")
    try:
        import jiwer
    except ImportError:
        raise ImportError("word error rates need jiwer (pip install jiwer)") from None
    return float(jiwer.wer(refs, [" ".join(normalise(hypothesis)) for hypothesis in hypotheses]))
