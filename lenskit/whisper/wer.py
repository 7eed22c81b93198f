"""Word error rate: word-level edit distance between a reference and a transcript."""

from __future__ import annotations

import re


def normalise(text: str) -> list[str]:
    """Lower-case words, punctuation dropped (apostrophes inside words kept)."""
    return re.findall(r"[\w]+(?:'[\w]+)*", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / number of reference words, after `normalise`.

    0 is a perfect transcript; it exceeds 1 when the transcript adds many words.
    """
    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        raise ValueError(f"the reference {reference!r} has no words to compare against")
    previous = list(range(len(hyp) + 1))  # distances from ref[:0] to each prefix of hyp
    for i, ref_word in enumerate(ref, start=1):
        current = [i]
        for j, hyp_word in enumerate(hyp, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1] / len(ref)
