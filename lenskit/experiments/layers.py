"""The layer-corruption study: run a model's blocks skipped, repeated or reordered, and see what breaks.

As in "Transformer Layers as Painters" (Sun et al., 2024) and the logit lens: the model runs its
blocks as a schedule says (`lenskit.surgery`): every block (the plain model), all but the last n,
all but the first n, all but a middle range, one block twice, two adjacent middle blocks swapped,
every block in reverse order. Each schedule gets the next-token loss on a fixed text, its change
from the plain model, the top next tokens at the end of a prompt, and the prompt's greedy
continuation. Models whose tokenizer does not know the words of the generic story (the zoo) read
their own IOI sentences and stories, with an IOI prompt.
"""

from __future__ import annotations

import random

import torch
from transformer_lens import HookedTransformer

from lenskit import surgery
from lenskit.experiments.bos import ZOO, knows_every_word
from lenskit.experiments.reproduction import Reproduction, resolve_model
from lenskit.viz import heatmap
from lenskit.zoo import DEFAULT_MODEL
from lenskit.zoo.data import ioi_dataset, story

STORY = (
    "Once upon a time",
    ["Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
     "One day, she saw a big red ball under a tree. Lily was very happy."],
)
"""(prompt, evaluation texts) for any model that reads English."""
ZOO_SENTENCES = 4
"""Held-out IOI sentences and stories of the zoo's own data, of each kind."""
TOP_K = 5
GENERATED_TOKENS = 12


def zoo_material() -> tuple[str, list[str]]:
    """(an IOI prompt, held-out IOI sentences and templated stories): text in the zoo's vocabulary."""
    rng = random.Random(0)
    texts = [example.text for example in ioi_dataset(ZOO_SENTENCES, held_out=True)]
    return ZOO[0], texts + [story(rng) for _ in range(ZOO_SENTENCES)]


def material(model: HookedTransformer) -> tuple[str, list[str]]:
    """The generic story if the model reads it without unknown words, else the zoo's text, else ValueError."""
    for prompt, texts in (STORY, zoo_material()):
        if all(knows_every_word(model, text) for text in [prompt, *texts]):
            return prompt, texts
    raise ValueError(f"neither the story {STORY[1][0]!r} nor the zoo's IOI sentences suit this model's tokenizer")


def study_schedules(n_layers: int) -> list[surgery.Schedule]:
    """Full; skip the last / first n for n = 1..L-1; skip the middle (keep the first and last L // 3 blocks,
    L >= 3); repeat each block once; swap the two middle blocks (L >= 4); reverse the order (L >= 2)."""
    schedules = [surgery.full(n_layers)]
    schedules += [surgery.skip_last(n_layers, n) for n in range(1, n_layers)]
    schedules += [surgery.skip_first(n_layers, n) for n in range(1, n_layers)]
    if n_layers >= 3:
        schedules.append(surgery.skip_range(n_layers, n_layers // 3, n_layers - n_layers // 3))
    schedules += [surgery.repeat(n_layers, layer) for layer in range(n_layers)]
    orders = []
    if n_layers >= 4:
        swapped, middle = list(range(n_layers)), (n_layers - 1) // 2
        swapped[middle], swapped[middle + 1] = swapped[middle + 1], swapped[middle]
        orders.append(swapped)
    if n_layers >= 2:
        orders.append(list(reversed(range(n_layers))))
    return schedules + [surgery.sequence(order, "order " + " ".join(map(str, order))) for order in orders]


def run(model: HookedTransformer | str | None = None, progress: bool = True) -> Reproduction:
    model = resolve_model(model, DEFAULT_MODEL)
    prompt, texts = material(model)
    table = surgery.evaluate(model, study_schedules(model.cfg.n_layers), [prompt, *texts],
                             generate_tokens=GENERATED_TOKENS, top_k=TOP_K, progress=progress)
    table = table.rename(columns={"blocks": "layers run", f"top{TOP_K}@-1": f"top {TOP_K} next"})
    table[f"top {TOP_K} next"] = [" ".join(map(repr, tokens)) for tokens in table[f"top {TOP_K} next"]]
    table.insert(3, "Δ loss", table["loss"] - table["loss"][0])
    delta = torch.tensor(table["Δ loss"].to_numpy())[:, None]
    figure = heatmap(delta, list(table["schedule"]), ["loss (Δ from full)"],
                     text=[[f"{loss:.2f} ({change:+.2f})"] for loss, change in zip(table["loss"], table["Δ loss"])],
                     title="Next-token loss under each layer schedule", row_title="schedule")
    return Reproduction(
        f"Layer corruption: loss over the prompt and {len(texts)} more text(s); top tokens and greedy "
        f"generation after the prompt {prompt!r}", table, figures=[figure],
        notes="Sun et al. (2024), Transformer Layers as Painters: skipping or reordering middle layers degrades "
              "a model gracefully, while its first and last layers are essential.",
    )
