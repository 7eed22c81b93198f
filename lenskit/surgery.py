"""Layer surgery: run a model's blocks skipped, repeated or reordered, and see what changes.

A `Schedule` is the sequence of blocks the residual stream passes through, with a name::

    surgery.full(model)                       (0, 1, ..., L-1): the plain model
    surgery.skip_last(model, 2)               (0, ..., L-3)
    surgery.skip_first(model, 2)              (2, ..., L-1)
    surgery.skip_range(model, 2, 4)           every block but 2 and 3
    surgery.repeat(model, 3, times=2)         (0, 1, 2, 3, 3, 4, ..., L-1)
    surgery.sequence([0, 1, 2, 2, 3, 5, 4])   any sequence of block indices

    logits = surgery.run(model, tokens, schedule)                  [batch, pos, d_vocab]
    table = surgery.evaluate(model, [full(model), skip_last(model, 2)], texts)

How a schedule runs:

- One that keeps blocks in their order and only leaves some out is the model's own forward
  pass with `hooks.skip` on the left-out blocks (`schedule.hooks(model)`, usable by hand, e.g.
  with ``model.generate``): their outputs are zeroed, so the residual stream passes them
  unchanged, bit for bit. Left-out blocks still compute, and their hooks still fire.
- One that repeats or reorders blocks runs through `run_blocks`, which mirrors
  ``HookedTransformer.forward``: ``model.input_to_embed`` (token and positional embedding,
  attention mask), ``model.blocks[i](resid)`` for each i of the schedule, ``ln_final``, ``unembed``.
  Only the scheduled blocks run.

Either way every hook inside the blocks fires, so a ``model.hooks(...)`` context or
``Hooks.on(model)`` applies under a schedule. Hook names carry the block's index: a block that
runs twice fires its hooks twice under the same name (a `hooks.cache` keeps the second).

Positions and padding work as in ``model(tokens)``: rotary models rotate queries and keys by
token position inside each attention layer, whichever block runs; absolute positional
embeddings are added once, before the first block; an attention mask (given, or built by
TransformerLens for a left-padding tokenizer) reaches every block. Right padding needs no mask
under causal attention (only the pad positions see pads). `generate` expects unpadded rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lenskit import backend, checks, hooks
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.readout import Readout
from lenskit.resume import run_block
from lenskit.tokens import Prompts, as_tokens

ModelOrLayers = Model | int


@dataclass(frozen=True)
class Schedule:
    """The block indices the residual stream passes through, in order, and a readable name.

    Indices count from 0; they are checked against a model's blocks when the schedule runs.
    """

    blocks: tuple[int, ...]
    name: str = ""

    def __post_init__(self) -> None:
        blocks = tuple(checks.integers(list(self.blocks), "schedule blocks"))
        name = self.name or f"blocks {list(blocks)}"
        if not blocks:
            raise InputError(f"schedule {name!r} is empty: it must run at least one block")
        negative = [block for block in blocks if block < 0]
        if negative:
            raise InputError(f"schedule {name!r}: block {negative[0]} out of range: block indices count from 0")
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "name", name)

    def __str__(self) -> str:
        return self.name

    @property
    def in_order(self) -> bool:
        """True when the schedule only leaves blocks out (each runs at most once, in the model's order)."""
        return all(a < b for a, b in zip(self.blocks, self.blocks[1:]))

    def validate(self, model: ModelOrLayers) -> None:
        """Raise ValueError naming the first block index outside the model's range."""
        n_layers = _n_layers(model)
        outside = [block for block in self.blocks if block >= n_layers]
        if outside:
            raise InputError(
                f"schedule {self.name!r}: block {outside[0]} out of range: "
                f"the model has {n_layers} blocks (valid 0..{n_layers - 1})"
            )

    def hooks(self, model: Model) -> hooks.Hooks:
        """The `hooks.skip` hooks that make the model's forward pass run this schedule.

        Only for schedules that keep the blocks' order (`in_order`); repeats and reorderings
        need `run_blocks`.
        """
        self.validate(model)
        if not self.in_order:
            raise InputError(
                f"schedule {self.name!r} repeats or reorders blocks, which skip hooks cannot "
                "express: run it with surgery.run or surgery.run_blocks"
            )
        left_out = sorted(set(range(model.cfg.n_layers)) - set(self.blocks))
        return hooks.skip(model, left_out)


# --- schedules ------------------------------------------------------------------------------


def full(model: ModelOrLayers) -> Schedule:
    """Every block once, in order: the plain model."""
    return Schedule(tuple(range(_n_layers(model))), "full")


def skip_last(model: ModelOrLayers, n: int) -> Schedule:
    """Leave out the last `n` blocks (keep the first L - n: the logit lens at layer L - n)."""
    n_layers = _n_layers(model)
    _check_count("skip_last", n, n_layers)
    return Schedule(tuple(range(n_layers - n)), f"skip last {n}")


def skip_first(model: ModelOrLayers, n: int) -> Schedule:
    """Leave out the first `n` blocks."""
    n_layers = _n_layers(model)
    _check_count("skip_first", n, n_layers)
    return Schedule(tuple(range(n, n_layers)), f"skip first {n}")


def skip_range(model: ModelOrLayers, start: int, stop: int) -> Schedule:
    """Leave out blocks start, ..., stop - 1 (a middle range, like a Python slice)."""
    n_layers = _n_layers(model)
    if not 0 <= start < stop <= n_layers:
        raise InputError(
            f"skip_range: start={start}, stop={stop} is not a range of blocks: "
            f"need 0 <= start < stop <= {n_layers} (the model has {n_layers} blocks)"
        )
    _check_count("skip_range", stop - start, n_layers)
    kept = tuple(block for block in range(n_layers) if not start <= block < stop)
    return Schedule(kept, f"skip {start}..{stop - 1}")


def repeat(model: ModelOrLayers, layer: int, times: int = 2) -> Schedule:
    """Every block in order, with block `layer` run `times` times in a row."""
    n_layers = _n_layers(model)
    if not 0 <= checks.integer(layer, "repeat: layer") < n_layers:
        raise InputError(
            f"repeat: block {layer} out of range: the model has {n_layers} blocks (valid 0..{n_layers - 1})"
        )
    if checks.integer(times, "repeat: times") < 1:
        raise InputError(f"repeat: times must be at least 1, not {times}")
    blocks = (*range(layer), *[layer] * times, *range(layer + 1, n_layers))
    return Schedule(blocks, f"repeat {layer} x{times}")


def sequence(blocks: Iterable[int], name: str = "") -> Schedule:
    """Any sequence of block indices, e.g. a permutation ``[0, 1, 2, 2, 3, 5, 4]``."""
    return Schedule(tuple(blocks), name)


def as_schedule(schedule: Schedule | Sequence[int]) -> Schedule:
    """A `Schedule` as it is, or one made from a sequence of block indices."""
    if isinstance(schedule, str):
        raise InputError(f"schedule must be a Schedule or a list of block indices, not the string {schedule!r}")
    return schedule if isinstance(schedule, Schedule) else sequence(schedule)


# --- running --------------------------------------------------------------------------------


def run(
    model: Model,
    tokens: Prompts,
    schedule: Schedule | Sequence[int],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of `model` on `tokens` with its blocks run as `schedule` says.

    A schedule that keeps the blocks' order runs as ``model(tokens)`` under `schedule.hooks`;
    any other through `run_blocks`. Gradients flow (wrap in ``torch.no_grad()`` if unwanted).
    """
    schedule = as_schedule(schedule)
    if not schedule.in_order:
        return run_blocks(model, tokens, schedule, attention_mask)
    with schedule.hooks(model).on(model):
        return model(as_tokens(model, tokens), attention_mask=attention_mask)


def run_blocks(
    model: Model,
    tokens: Prompts,
    schedule: Schedule | Sequence[int],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits from embedding, then ``model.blocks[i]`` for each i of `schedule`, then ln_final and unembed.

    The same steps as ``HookedTransformer.forward`` (embedding, positional embedding and
    attention mask from ``model.input_to_embed``), with the block loop following the schedule.
    """
    schedule = as_schedule(schedule)
    schedule.validate(model)
    residual, _, shortformer_pos_embed, attention_mask = model.input_to_embed(
        as_tokens(model, tokens), attention_mask=attention_mask
    )
    for block in schedule.blocks:
        if backend.is_bridge(model):  # a Hugging Face layer: rotary cos/sin and a 4D mask from resume
            residual = run_block(model, block, residual, lambda layer, rows: None, attention_mask)
        else:
            residual = model.blocks[block](
                residual, shortformer_pos_embed=shortformer_pos_embed, attention_mask=attention_mask
            )
    return Readout(model)(residual)


@torch.no_grad()
def generate(
    model: Model,
    tokens: Prompts,
    schedule: Schedule | Sequence[int],
    n_tokens: int = 20,
) -> Int[Tensor, "batch pos_plus_n"]:
    """Greedy continuation under `schedule`: the prompt [batch, pos] followed by `n_tokens` new tokens.

    Each step runs the whole sequence again (no key/value cache) and appends the argmax at the
    last position, so it is exact for every positional embedding. Rows must be unpadded.
    """
    schedule = as_schedule(schedule)
    schedule.validate(model)
    tokens = as_tokens(model, tokens)
    if checks.integer(n_tokens, "generate: n_tokens") < 0:
        raise InputError(f"generate: n_tokens must be at least 0, not {n_tokens}")
    if tokens.shape[-1] + n_tokens > model.cfg.n_ctx:
        raise InputError(
            f"generate: {tokens.shape[-1]} prompt tokens + {n_tokens} new ones exceed "
            f"the model's context of {model.cfg.n_ctx}"
        )
    for _ in range(n_tokens):
        next_tokens = run(model, tokens, schedule)[:, -1].argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, next_tokens.to(tokens.device)], dim=-1)
    return tokens


@torch.no_grad()
def evaluate(
    model: Model,
    schedules: Iterable[Schedule | Sequence[int]],
    texts: str | Sequence[str],
    positions: Sequence[int] | None = None,
    generate_tokens: int = 20,
    top_k: int = 5,
    progress: bool = True,
) -> pd.DataFrame:
    """Loss, top next tokens and a greedy generation under each schedule: one row per schedule.

    Columns:
        schedule: its name; blocks: its block indices.
        loss: mean next-token cross-entropy over every predicted token of every text.
        top{top_k}@{p}: for each position p of `positions` (default ``[-1]``, the last) of the
            first text, the `top_k` tokens the schedule predicts next there, most likely first.
        generation: the first text's greedy continuation, `generate_tokens` new tokens (decoded).
    Each text is tokenized on its own (``lenskit.tokens.as_tokens``), so nothing is padded; the first
    text is the prompt for the top tokens and the generation.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    schedules = [as_schedule(schedule) for schedule in schedules]
    if not texts:
        raise InputError("evaluate: texts is empty; give at least one text")
    if not schedules:
        raise InputError("evaluate: schedules is empty; give at least one schedule")
    for schedule in schedules:
        schedule.validate(model)
    if not 1 <= top_k <= model.cfg.d_vocab:
        raise InputError(f"evaluate: top_k={top_k} out of range: 1..{model.cfg.d_vocab} (the vocabulary size)")
    token_rows = [as_tokens(model, text, "texts") for text in texts]
    for text, row in zip(texts, token_rows):
        if row.shape[-1] < 2:
            raise InputError(f"evaluate: text {text!r} is {row.shape[-1]} token long; the loss needs at least 2")
    positions = [-1] if positions is None else list(positions)
    prompt_length = token_rows[0].shape[-1]
    for pos in positions:
        if not -prompt_length <= pos < prompt_length:
            raise InputError(
                f"evaluate: position {pos} out of range: the first text has {prompt_length} "
                f"tokens (valid 0..{prompt_length - 1}, or negative from the end)"
            )

    rows = []
    for schedule in tqdm(schedules, desc="surgery", disable=not progress):
        all_logits = [run(model, row, schedule) for row in token_rows]
        losses = torch.cat(
            [model.loss_fn(logits, row, per_token=True).flatten() for logits, row in zip(all_logits, token_rows)]
        )
        top = {f"top{top_k}@{pos}": model.to_str_tokens(all_logits[0][0, pos].topk(top_k).indices) for pos in positions}
        continuation = generate(model, token_rows[0], schedule, generate_tokens)[0, prompt_length:]
        rows.append(
            {
                "schedule": schedule.name,
                "blocks": schedule.blocks,
                "loss": losses.mean().item(),
                **top,
                "generation": model.to_string(continuation),
            }
        )
    return pd.DataFrame(rows)


# --- helpers --------------------------------------------------------------------------------


def _n_layers(model: ModelOrLayers) -> int:
    return model if isinstance(model, int) else model.cfg.n_layers


def _check_count(who: str, n: int, n_layers: int) -> None:
    """`n` blocks may be left out of `n_layers` when at least one block still runs."""
    if not 0 <= n < n_layers:
        raise InputError(
            f"{who}: cannot leave out {n} blocks: the model has {n_layers} blocks, so 0..{n_layers - 1} "
            "may be left out (at least one must run)"
        )
