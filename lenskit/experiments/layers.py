"""The layer-corruption study: run a model's blocks skipped, repeated or reordered, and see what breaks.

Two studies, chosen by the model (`run`):

- The seed study (`seed_study`), on a pretrained model with a real English vocabulary (e.g.
  ``lenskit reproduce layers --model smollm2-135m``): on passages of Ambrose Bierce's *The Devil's
  Dictionary* (public domain, from Debian's ``dict-devil``; see `lenskit.experiments.corpus`), each layer
  deleted and each adjacent pair swapped, with the loss and the top-1 agreement with the intact model
  (the measure of Lad et al. 2024, "The Remarkable Robustness of LLMs"); the last n and the first n
  layers skipped, with greedy continuations of the seed's prompts (`SEED_PROMPTS`) when the last n go;
  and Gromov et al.'s (2024, "The Unreasonable Ineffectiveness of the Deeper Layers") angular distance
  arccos(cos(x_l, x_l+n)) / pi between residual streams, set against the loss of removing the block of
  n layers whose ends are closest. Schedules reuse the intact run's cached residual stream up to their
  first change (`run_schedule_from`), so a change at layer l recomputes only the layers after it.
- The schedule study (`schedule_study`), on anything else, the zoo's default model included, as in
  "Transformer Layers as Painters" (Sun et al., 2024): every block (the plain model), all but the last
  n, all but the first n, all but a middle range, one block twice, two adjacent middle blocks swapped,
  every block in reverse order. Each schedule gets the next-token loss on a fixed text, its change from
  the plain model, the top next tokens at the end of a prompt, and the prompt's greedy continuation.
  Models whose tokenizer does not know the words of the generic story (the zoo) read their own IOI
  sentences and stories, with an IOI prompt.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lenskit import sites, surgery
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.experiments.bos import ZOO
from lenskit.experiments.corpus import NAME, passages
from lenskit.experiments.reproduction import Reproduction, resolve_model
from lenskit.readout import Readout
from lenskit.tokens import as_tokens, knows_every_word
from lenskit.viz import heatmap
from lenskit.zoo import DEFAULT_MODEL
from lenskit.zoo.data import ioi_dataset, story

STORY = (
    "Once upon a time",
    [
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
        "One day, she saw a big red ball under a tree. Lily was very happy."
    ],
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


def material(model: Model) -> tuple[str, list[str]]:
    """The generic story if the model reads it without unknown words, else the zoo's text, else ValueError."""
    for prompt, texts in (STORY, zoo_material()):
        if all(knows_every_word(model, text) for text in [prompt, *texts]):
            return prompt, texts
    raise InputError(f"neither the story {STORY[1][0]!r} nor the zoo's IOI sentences suit this model's tokenizer")


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


def run(model: Model | str | None = None, progress: bool = True, **options) -> Reproduction:
    """The seed study (`seed_study`) on a pretrained model with a real English vocabulary (at least
    `SEED_MIN_VOCAB` tokens, reading the seed's prompts without unknown tokens); the schedule study
    (`schedule_study`) on anything else, the zoo's default model included. `options` go to `seed_study`."""
    model = resolve_model(model, DEFAULT_MODEL)
    if reads_english(model):
        return seed_study(model, progress=progress, **options)
    if options:
        raise InputError(
            f"options {sorted(options)} apply to the seed study only, which needs a pretrained English "
            f"model (vocabulary of at least {SEED_MIN_VOCAB} tokens)"
        )
    return schedule_study(model, progress)


def schedule_study(model: Model, progress: bool = True) -> Reproduction:
    """Every schedule of `study_schedules` on the story (or the zoo's text): loss, top tokens, generation."""
    prompt, texts = material(model)
    table = surgery.evaluate(
        model,
        study_schedules(model.cfg.n_layers),
        [prompt, *texts],
        generate_tokens=GENERATED_TOKENS,
        top_k=TOP_K,
        progress=progress,
    )
    table = table.rename(columns={"blocks": "layers run", f"top{TOP_K}@-1": f"top {TOP_K} next"})
    table[f"top {TOP_K} next"] = [" ".join(map(repr, tokens)) for tokens in table[f"top {TOP_K} next"]]
    table.insert(3, "Δ loss", table["loss"] - table["loss"][0])
    delta = torch.tensor(table["Δ loss"].to_numpy())[:, None]
    figure = heatmap(
        delta,
        list(table["schedule"]),
        ["loss (Δ from full)"],
        text=[[f"{loss:.2f} ({change:+.2f})"] for loss, change in zip(table["loss"], table["Δ loss"])],
        title="Next-token loss under each layer schedule",
        row_title="schedule",
    )
    return Reproduction(
        f"Layer corruption: loss over the prompt and {len(texts)} more text(s); top tokens and greedy "
        f"generation after the prompt {prompt!r}",
        table,
        figures=[figure],
        notes="Sun et al. (2024), Transformer Layers as Painters: skipping or reordering middle layers degrades "
        "a model gracefully, while its first and last layers are essential.",
    )


# --- the seed study on a pretrained model ---------------------------------------------------

SEED_MIN_VOCAB = 10_000
SEED_PROMPTS = (
    "The distance between Rome and Paris is approximately",
    "1 + 3 = 4\n4 + 5 = 9\n2 + 3 =",
    "Obama was elected in the year",
    '{"name": "Ada Lovelace", "born": 1815, "occupation": "',
)
N_PASSAGES = 8
PASSAGE_TOKENS = 128
SEED_GENERATED_TOKENS = 12
GENERATION_COUNTS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25)
"""Numbers of final layers skipped for the greedy generations (those below the model's depth)."""


def reads_english(model: Model) -> bool:
    """A pretrained English model: a tokenizer of at least `SEED_MIN_VOCAB` tokens that reads the seed prompts."""
    return (
        model.tokenizer is not None
        and model.cfg.d_vocab >= SEED_MIN_VOCAB
        and all(knows_every_word(model, prompt) for prompt in SEED_PROMPTS)
    )


@torch.no_grad()
def residual_stack(model: Model, tokens: Int[Tensor, "batch pos"]) -> tuple[Tensor, Tensor]:
    """(the intact model's logits [batch, pos, vocab], the residual stream x_0..x_L [L+1, batch, pos, d_model]).

    x_l is the input of block l (``blocks.l.hook_resid_pre``), x_L the output of the last block.
    """
    names = sites.residual_names(model, "pre")
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    return logits, torch.stack([cache[name] for name in names])


def run_schedule_from(
    model: Model, stack: Tensor, blocks: Sequence[int], tokens: Int[Tensor, "batch pos"] | None = None
) -> Float[Tensor, "batch pos vocab"]:
    """Logits of `blocks` run in order, started from the cached residual stream where they begin.

    The longest prefix of `blocks` that is 0, 1, ..., k-1 is not recomputed: the run starts from x_k
    of `stack` (`residual_stack` of `tokens`). Equals ``surgery.run_blocks(model, tokens, blocks)``;
    `tokens` give the blocks the attention mask and shortformer positions TransformerLens would.
    """
    shortformer = mask = None
    if tokens is not None:
        _, _, shortformer, mask = model.input_to_embed(tokens)
    blocks = surgery.as_schedule(blocks).blocks
    start = 0
    while start < len(blocks) and blocks[start] == start:
        start += 1
    residual = stack[start]
    for block in blocks[start:]:
        residual = model.blocks[block](residual, shortformer_pos_embed=shortformer, attention_mask=mask)
    return Readout(model)(residual)


def angular_distances(stack: Tensor) -> Float[Tensor, "n l"]:
    """Gromov et al.'s angular distance between x_l and x_{l+n}: arccos(cosine similarity) / pi, averaged
    over every batch row and position; row n - 1 for n = 1..L, column l, NaN where l + n > L."""
    n_states = stack.shape[0]
    unit = torch.nn.functional.normalize(stack.double(), dim=-1)
    table = torch.full((n_states - 1, n_states - 1), float("nan"), dtype=torch.float64)
    for n in range(1, n_states):
        cosine = (unit[:-n] * unit[n:]).sum(-1).clamp(-1, 1)  # [L + 1 - n, batch, pos]
        table[n - 1, : n_states - n] = (torch.arccos(cosine) / torch.pi).flatten(1).mean(-1)
    return table.float()


def measures(logits: Tensor, tokens: Tensor, intact_top: Tensor) -> dict[str, float]:
    """loss (mean next-token cross-entropy), agreement (share of positions whose top-1 token is the intact
    model's) and accuracy (share whose top-1 token is the next token), over every position with a next token."""
    logits = logits[:, :-1].float()
    targets = tokens[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    top = logits.argmax(-1)
    return {
        "loss": loss,
        "agreement": (top == intact_top[:, :-1]).float().mean().item(),
        "accuracy": (top == targets).float().mean().item(),
    }


@torch.no_grad()
def greedy(model: Model, prompt: str, blocks: Sequence[int], n_tokens: int) -> str:
    """The greedy continuation of `prompt` (`n_tokens` new tokens, decoded) with only `blocks` running."""
    tokens = as_tokens(model, prompt, "prompt")
    for _ in range(n_tokens):
        next_token = surgery.run_blocks(model, tokens, blocks)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=-1)
    return model.to_string(tokens[0, -n_tokens:]) if n_tokens else ""


def seed_schedules(
    n_layers: int, counts: Sequence[int] | None = None, layers: Sequence[int] | None = None
) -> list[tuple[str, int, surgery.Schedule]]:
    """(study, layer or n, schedule): delete each layer of `layers` (default all); swap each of them with the
    next; skip the last n; skip the first n (n of `counts`, default 1..L-1). Block removal comes from the
    angular distances."""
    counts = range(1, n_layers) if counts is None else counts
    layers = range(n_layers) if layers is None else layers
    rows = [
        ("delete", layer, surgery.sequence([b for b in range(n_layers) if b != layer], f"delete {layer}"))
        for layer in layers
    ]
    for layer in layers:
        if layer + 1 < n_layers:
            order = list(range(n_layers))
            order[layer], order[layer + 1] = layer + 1, layer
            rows.append(("swap", layer, surgery.sequence(order, f"swap {layer} {layer + 1}")))
    rows += [("skip last", n, surgery.skip_last(n_layers, n)) for n in counts]
    rows += [("skip first", n, surgery.skip_first(n_layers, n)) for n in counts]
    return rows


@torch.no_grad()
def seed_study(
    model: Model,
    progress: bool = True,
    n_passages: int = N_PASSAGES,
    passage_tokens: int = PASSAGE_TOKENS,
    counts: Sequence[int] | None = None,
    generation_counts: Sequence[int] = GENERATION_COUNTS,
    generate_tokens: int = SEED_GENERATED_TOKENS,
    text: str | None = None,
    layers: Sequence[int] | None = None,
) -> Reproduction:
    """Delete, swap and skip layers of a pretrained model on The Devil's Dictionary (`corpus`).

    Table (one row per schedule): study ("intact", "delete", "swap", "skip last", "skip first",
    "remove block"), layer (the deleted layer, the first of a swapped pair, the first removed block) or
    n (layers skipped or removed), layers run, loss, Δ loss, agreement (top-1 agreement with the intact
    model), accuracy (top-1 = next token), accuracy kept (/ the intact model's), angular distance
    (delete: between x_l and x_{l+1}; remove block: between x_l and x_{l+n}, l chosen to minimise it).
    `tables["generations"]`: greedy continuations of `SEED_PROMPTS` with the last n layers skipped;
    `tables["angular distance"]`: d(x_l, x_{l+n}) for every l and n.
    `text` replaces the corpus (e.g. for tests); `counts` limits n for skip last / first and block removal,
    `layers` the layers deleted and swapped with the next (default: every one).
    """
    n_layers = model.cfg.n_layers
    counts = list(range(1, n_layers) if counts is None else counts)
    for n in counts:
        if not 1 <= n < n_layers:
            raise InputError(f"counts: {n} out of range: 1..{n_layers - 1} layers may be skipped")
    for layer in layers or ():
        if not 0 <= layer < n_layers:
            raise InputError(f"layers: {layer} out of range: the model has {n_layers} layers (valid 0..{n_layers - 1})")
    tokens = passages(model, n_passages, passage_tokens, text)
    intact_logits, stack = residual_stack(model, tokens)
    intact_top = intact_logits.argmax(-1)
    intact = measures(intact_logits, tokens, intact_top)
    del intact_logits
    distance = angular_distances(stack)

    plan = [("intact", None, None, surgery.full(n_layers))] + [
        (s, v, None, sch) for s, v, sch in seed_schedules(n_layers, counts, layers)
    ]
    for n in counts:  # the block of n layers whose ends are closest in angle (Gromov et al.)
        first = int(torch.nan_to_num(distance[n - 1], nan=float("inf")).argmin())
        plan.append(("remove block", first, n, surgery.skip_range(n_layers, first, first + n)))
    rows = []
    for study, layer, n, schedule in tqdm(plan, desc="layer schedules", disable=not progress):
        numbers = (
            intact
            if study == "intact"
            else measures(run_schedule_from(model, stack, schedule.blocks, tokens), tokens, intact_top)
        )
        if study in ("skip last", "skip first"):
            layer, n = None, layer
        elif study == "delete":
            n = 1
        angle = distance[n - 1, layer].item() if study in ("delete", "remove block") else float("nan")
        rows.append(
            {
                "study": study,
                "layer": layer,
                "n": n,
                "schedule": schedule.name,
                "layers run": len(schedule.blocks),
                **numbers,
                "angular distance": angle,
            }
        )
    table = pd.DataFrame(rows).astype({"layer": "Int64", "n": "Int64"})
    table.insert(6, "Δ loss", table["loss"] - intact["loss"])
    table["accuracy kept"] = table["accuracy"] / intact["accuracy"]
    table = table[
        [
            "study",
            "layer",
            "n",
            "schedule",
            "layers run",
            "loss",
            "Δ loss",
            "agreement",
            "accuracy",
            "accuracy kept",
            "angular distance",
        ]
    ]

    generation_counts = [n for n in generation_counts if 0 <= n < n_layers]
    generations = pd.DataFrame(
        [
            {
                "skip last": n,
                **{prompt: greedy(model, prompt, range(n_layers - n), generate_tokens) for prompt in SEED_PROMPTS},
            }
            for n in tqdm(generation_counts, desc="generations", disable=not progress)
        ]
    )
    angles = pd.DataFrame(
        distance.numpy(), index=pd.Index(range(1, n_layers + 1), name="n"), columns=[f"l={l}" for l in range(n_layers)]
    )
    deletion = table[table["study"] == "delete"]
    rho = deletion["angular distance"].rank().corr(deletion["Δ loss"].rank())  # Spearman: Pearson of ranks
    figures = seed_figures(table, distance, generations, n_layers)
    low, high = n_layers // 4, n_layers - 1 - n_layers // 4
    middle = table[table["study"].isin(["delete", "swap"]) & table["layer"].between(low, high)]
    by_layer = deletion.set_index("layer")["agreement"]
    ends = ", ".join(
        f"layer {layer} deleted: {by_layer[layer]:.0%}" for layer in (0, n_layers - 1) if layer in by_layer.index
    )
    span = (
        f"{middle['agreement'].min():.0%}-{middle['agreement'].max():.0%} (median {middle['agreement'].median():.0%}) "
        f"top-1 agreement with the intact model and {middle['accuracy kept'].median():.0%} of its top-1 accuracy "
        "(median)"
        if len(middle)
        else "(none measured)"
    )
    notes = (
        f"Text: {n_passages} passages of {passage_tokens} tokens spread over {NAME if text is None else 'the given text'}; "
        f"the intact model's loss {intact['loss']:.3f}, top-1 accuracy {intact['accuracy']:.1%}. "
        f"Middle layers ({low}..{high}): deleting or swapping one keeps {span}. Lad et al. (2024) report 72-95% kept "
        f"for middle layers, with fragile first and last layers; here {ends or 'first and last layers not measured'}. "
        f"Spearman correlation across the deleted layers of the angular distance d(x_l, x_l+1) with the loss of deleting "
        f"layer l: {rho:.2f} (Gromov et al. 2024 prune the block of n layers with the smallest d(x_l, x_l+n)); the "
        "'remove block' rows remove that block for each n."
    )
    return Reproduction(
        f"Layers skipped, repeated and permuted in a pretrained model ({n_layers} layers): loss and top-1 agreement "
        "with the intact model",
        table,
        figures=figures,
        notes=notes,
        tables={"generations (last n layers skipped)": generations, "angular distance d(x_l, x_l+n)": angles},
    )


def seed_figures(table: pd.DataFrame, distance: Tensor, generations: pd.DataFrame, n_layers: int) -> list:
    """Per-layer deletion and swap; skip last / first n; angular distances; block removal against skip last n."""
    figures = []
    per_layer = []
    for study in ("delete", "swap"):
        part = table[table["study"] == study].set_index("layer")
        per_layer.append([part["agreement"].get(l, float("nan")) for l in range(n_layers)])
    figures.append(
        heatmap(
            torch.tensor(per_layer),
            ["delete layer l", "swap l, l+1"],
            [str(l) for l in range(n_layers)],
            text=[[f"{v:.0%}" if v == v else "" for v in row] for row in per_layer],
            limit=1.0,
            title="Top-1 agreement with the intact model after deleting or swapping one layer",
            row_title="change",
            col_title="layer l",
        )
    )
    per_count = {
        study: table[table["study"] == study].set_index("n") for study in ("skip last", "skip first", "remove block")
    }
    ns = sorted(set(per_count["skip last"].index) | set(per_count["remove block"].index))
    values = [[per_count[s]["agreement"].get(n, float("nan")) for n in ns] for s in per_count]
    losses = [[per_count[s]["Δ loss"].get(n, float("nan")) for n in ns] for s in per_count]
    figures.append(
        heatmap(
            torch.tensor(values),
            ["skip last n", "skip first n", "remove closest block of n"],
            [str(n) for n in ns],
            text=[[f"{v:.0%}\n{d:+.2f}" if v == v else "" for v, d in zip(vr, dr)] for vr, dr in zip(values, losses)],
            limit=1.0,
            title="Top-1 agreement (and Δ loss) with n layers removed",
            row_title="removed",
            col_title="n",
        )
    )
    figures.append(
        heatmap(
            distance,
            [str(n) for n in range(1, n_layers + 1)],
            [str(l) for l in range(n_layers)],
            text=[[f"{v:.2f}" if v == v else "" for v in row] for row in distance.tolist()],
            title="Angular distance d(x_l, x_l+n) = arccos(cos) / pi, averaged over tokens",
            row_title="n",
            col_title="l",
        )
    )
    text = [[str(cell) for cell in row[1:]] for row in generations.itertuples(index=False)]
    figures.append(
        heatmap(
            torch.zeros(len(generations), len(SEED_PROMPTS)),
            [f"skip last {n}" for n in generations["skip last"]],
            list(SEED_PROMPTS),
            text=text,
            title="Greedy continuations with the last n layers skipped",
            row_title="schedule",
            col_title="prompt",
        )
    )
    return figures
