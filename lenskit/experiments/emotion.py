"""The emotion experiment: where in the residual stream two sentences that differ in one word diverge.

The norm of the residual-stream difference between "You have happy emotion in yourself!" and "You have
angry emotion in yourself!", per layer and position, as a heatmap. Models whose tokenizer does not know
these words (the zoo) use a pair in their own vocabulary. Where the two differing words split into
different numbers of tokens, the differing span is compared at its last token and the rest aligned. Positions before the differing word stay at
zero (causal attention), which the heatmap shows.
"""

from __future__ import annotations

import torch

from lenskit.backend import Model
from lenskit.cache import residual_stream
from lenskit.errors import InputError
from lenskit.experiments.reproduction import Reproduction, resolve_model
from lenskit.labelled import LabelledTensor
from lenskit.tokens import knows_every_word
from lenskit.zoo import DEFAULT_MODEL

PAIRS = [
    ("You have happy emotion in yourself!", "You have angry emotion in yourself!"),
    ("Then Mary was happy.", "Then Mary was sad."),  # in the zoo's vocabulary
]
"""The original pair first; the first pair a model reads without unknown words is used."""


def aligned_positions(first: list[str], second: list[str]) -> tuple[list[int], list[int], list[str]]:
    """Positions to compare in two token lists that differ in one span: the common prefix, the last token
    of each differing span (where the word has been read whole), and the common suffix aligned from the end.
    Returns (positions in first, positions in second, column labels)."""
    prefix = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
    suffix = 0
    while suffix < min(len(first), len(second)) - prefix and first[-1 - suffix] == second[-1 - suffix]:
        suffix += 1
    if prefix == len(first) == len(second):
        raise InputError(f"the two texts tokenize identically: {first}")
    span = "".join(first[prefix : len(first) - suffix]) + "/" + "".join(second[prefix : len(second) - suffix])
    first_positions = [*range(prefix), *range(len(first) - suffix - 1, len(first))]
    second_positions = [*range(prefix), *range(len(second) - suffix - 1, len(second))]
    return first_positions, second_positions, [*first[:prefix], span, *first[len(first) - suffix :]]


def residual_difference(model: Model, first: str, second: str) -> LabelledTensor:
    """||resid(first) - resid(second)|| per layer boundary and aligned position: [layer, pos], labelled by tokens."""
    first_positions, second_positions, labels = aligned_positions(
        model.to_str_tokens(first), model.to_str_tokens(second)
    )
    with torch.no_grad():
        a, b = residual_stream(model, first), residual_stream(model, second)  # [layer, 1, pos, d_model]
    difference = (a.tensor[:, 0, first_positions] - b.tensor[:, 0, second_positions]).norm(dim=-1)
    return LabelledTensor(difference, ("layer", "pos"), {"layer": a.labels["component"], "pos": labels})


def run(model: Model | str | None = None, progress: bool = True) -> Reproduction:
    model = resolve_model(model, DEFAULT_MODEL)
    usable = [pair for pair in PAIRS if all(knows_every_word(model, text) for text in pair)]
    if not usable:
        raise InputError(f"none of the emotion sentence pairs suits this model's tokenizer: {PAIRS}")
    first, second = usable[0]
    difference = residual_difference(model, first, second)
    table = difference.to_frame().pivot(index="layer_label", columns="pos", values="value")
    table.columns = difference.labels["pos"]
    table = table.loc[difference.labels["layer"]].reset_index().rename(columns={"layer_label": "layer"})
    return Reproduction(
        f"Residual-stream difference: {first!r} vs {second!r}",
        table,
        figures=[difference.plot(title="||resid(first) - resid(second)|| by layer and position")],
    )
