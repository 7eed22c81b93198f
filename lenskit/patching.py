"""Activation patching, exact and fast, and attribution patching (its gradient estimate).

    result = lenskit.patch(model, clean, corrupted, metrics.logit_diff(" Mary", " John"),
                           site="z", by="layer_head_pos")
    result.tensor             # [layer, head, pos]: the metric with that one activation patched
    result.normalised()       # 0 = the corrupted run, 1 = the clean run
    result.to_frame(); result.plot()

Each cell of the grid is one run on the corrupted tokens in which a part of one activation (a
layer's `site`, restricted to a position, a head, ...) is overwritten with its value on the clean
tokens; the cell holds the metric of that run. The values equal those of
``transformer_lens.patching`` (``get_act_patch_resid_pre``, ``get_act_patch_attn_head_out_by_pos``
...), which run the whole model once per cell. lenskit computes the same numbers with much less work:

- a run patched at layer L starts at layer L from the corrupted run's cached residual stream;
- causal attention: positions before the first patched position keep their corrupted values, so a
  run computes only the positions from there on, reading the earlier positions' keys and values
  from the corrupted run; within the patched layer, a patch that cannot reach later positions there
  (every site but resid_pre, k and v) is computed at its own position only;
- cells where the clean and corrupted activations are equal are not run (the patch changes
  nothing: the value is the corrupted run's);
- many cells run as one batch, each joining it after its own layer; the batch is chunked so that
  memory stays bounded (`MEMORY_BUDGET`);
- a metric spec from `lenskit.metrics` is evaluated on the positions and vocabulary columns it
  reads only (a logit difference unembeds two columns at one position).

The patch itself is a TransformerLens hook on the site (``blocks.L.attn.hook_z`` ...), so the runs
are "this hook, on the corrupted run", as in TransformerLens.

Grouped-query attention (n_heads query heads sharing n_key_value_heads key/value heads): the k and v
sites have one head per key/value head, as TransformerLens' hook_k / hook_v do. A k or v cell patches
a key/value head, that is the keys (values) read by every query head of its group, and the result's
head dim is named "kv_head" (labels: key/value head numbers; ``lenskit.hooks.query_heads`` gives the
query heads of each). Patching one query head's keys alone needs the model ungrouped first
(``model.set_ungroup_grouped_query_attention(True)``): k and v then have n_heads heads, one copy per
query head, and the grid has a "head" dim as for q and z. (TransformerLens 3.9's patching functions
agree with the grouped grid; on an ungrouped model they still size k and v by n_key_value_heads and
leave the other query heads out.)

`attribution_patch` estimates the same grid to first order, with two forward passes and one
backward pass: ``(clean - corrupted activation) * d metric / d activation``, summed over each cell.

(This module is long because exact and attribution patching share one idea, the grid of cells: its
layouts, selections and reductions serve both; running blocks part way lives in `lenskit.resume`.)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from lenskit import checks, hooks, sites
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.labelled import LabelledTensor
from lenskit.metrics import MetricLike, MetricReader, bind, scalar, scalar_tensor
from lenskit.readout import Readout
from lenskit.resume import MEMORY_BUDGET, empty_entry, run_block, run_blocks
from lenskit.run import Run, as_run
from lenskit.tokens import Prompts, as_tokens, token_labels
from lenskit.viz import Figure, heatmap

SITES = {
    site: sites.act_name(site, 0).replace(".0.", ".{}.")
    for site in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern")
}
"""Patchable sites and their TransformerLens hook names (per layer: ``SITES[site].format(layer)``)."""

GRANULARITIES = {
    "layer": (),
    "layer_pos": ("pos",),
    "layer_head": ("head",),
    "layer_head_pos": ("head", "pos"),
    "layer_head_dest_src": ("head", "pos", "src"),
}
"""`by` values: what one cell patches besides its layer (all positions / heads when not named)."""

# Index dims of each site's activation after the batch dim ("pos" is the query position of a
# pattern), and whether a feature dim (d_model, d_head) follows them.
_LAYOUTS = {
    "resid": (("pos",), True),
    "head": (("pos", "head"), True),
    "pattern": (("head", "pos", "src"), False),
}


@dataclass(repr=False)
class PatchResult(LabelledTensor):
    """A patching grid: the metric after each patch, with the clean and corrupted runs' values.

    dims are ``("layer", ...)`` followed by the cell dims of `by` ("head", "pos"; "dest", "src" for
    ``layer_head_dest_src``; "kv_head" for k and v of a grouped-query model); labels hold the layer
    and head numbers and, on position dims, the string tokens of the first clean prompt (token ids
    when the model has no tokenizer).
    """

    clean_value: float = math.nan
    corrupted_value: float = math.nan

    def normalised(self) -> "PatchResult":
        """The grid rescaled so that 0 is the corrupted run's metric and 1 the clean run's."""
        span = self.clean_value - self.corrupted_value
        if span == 0 or math.isnan(span):
            raise InputError(
                f"cannot normalise: the clean and corrupted runs have the same metric value ({self.clean_value})"
            )
        return PatchResult((self.tensor - self.corrupted_value) / span, self.dims, self.labels, 1.0, 0.0)

    def plot(self, title: str = "") -> Figure:
        """A heatmap: the last dim as columns (tokens for positions), every other dim flattened into rows.

        A (layer, head, pos) grid gives one row per head ("L3 H1"); a per-layer grid one column.
        """
        *lead, last = self.dims
        if not lead:
            lead, last = [last], "value"
        rows = [
            " ".join(_index_label(d, self.labels[d][i]) for d, i in zip(lead, index))
            for index in itertools.product(*(range(len(self.labels[d])) for d in lead))
        ]
        cols = self.labels[last] if last in self.labels else [last]
        values = self.tensor.reshape(len(rows), len(cols))
        return heatmap(values, rows, [str(c) for c in cols], title=title, row_title=" ".join(lead), col_title=last)


def patch(
    model: Model,
    clean: Prompts,
    corrupted: Prompts,
    metric: MetricLike,
    site: str = "resid_pre",
    by: str = "layer_pos",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    max_cells: int | None = None,
    progress: bool = True,
) -> PatchResult:
    """Exact activation patching: the metric of the corrupted run with one clean activation part.

    Args:
        clean, corrupted: token ids [batch, pos] (or strings) of the same shape.
        metric: a `lenskit.metrics` spec, or any callable on logits [batch, pos, d_vocab] returning a
            scalar (TransformerLens' convention; it then sees the full logits of every cell).
        site: one of `SITES` (resid_pre, resid_mid, resid_post, attn_out, mlp_out, z, q, k, v, pattern).
            k and v have n_key_value_heads heads in grouped-query models: there a cell patches one
            key/value head (shared by its group of query heads) and the dim is named "kv_head".
        by: one of `GRANULARITIES`: layer (all positions), layer_pos, layer_head (all positions),
            layer_head_pos, layer_head_dest_src (pattern entries). "pos" is the query position of a pattern.
        layers, heads, positions: restrict the grid (default: all); labels keep the real indices.
        max_cells: cells per batched forward (default: as many as fit `MEMORY_BUDGET`).

    Returns:
        PatchResult [layer, *cell dims] of metric values (equal to transformer_lens.patching's).
    """
    if max_cells is not None:
        checks.integer(max_cells, "max_cells (None: fit the memory budget)", low=1)
    clean_run = as_run(model, clean)
    grid = _Grid.build(model, site, by, clean_run.tokens, corrupted, layers, heads, positions)
    clean_store, clean_logits = _clean_activations(clean_run, grid)
    with torch.inference_mode():
        metric = bind(metric, model, grid.clean, clean_logits)
        clean_value = scalar(metric, clean_logits)
        corrupted_run = _CorruptedRun(model, grid)
        corrupted_value = scalar(metric, corrupted_run.logits)
        values = torch.full(grid.shape, corrupted_value, dtype=torch.float32)
        plan = grid.plan(clean_store, corrupted_run.site)
        reader = MetricReader(model, metric, corrupted_run.logits)
        chunks = [
            (start, chunk)
            for start, cells in plan.items()
            for chunk in _chunks(cells, max_cells or grid.cells_per_batch(start, reader))
        ]
        for start, cells in tqdm(chunks, desc=f"patch {site} by {by}", disable=not progress):
            patched = corrupted_run.resume(cells, start, clean_store)
            values[tuple(cells.T)] = reader.values(patched, start).float().cpu()
    return grid.result(values, clean_value, corrupted_value)


def _clean_activations(clean: Run, grid: "_Grid") -> tuple[dict[str, Tensor], Tensor]:
    """The clean run's site activations {hook name: activation} and its logits (one forward pass at most)."""
    store = clean.require([*grid.hook_names(), sites.final_residual(clean.model)])
    return store, clean.logits


def attribution_patch(
    model: Model,
    clean: Prompts,
    corrupted: Prompts,
    metric: MetricLike,
    site: str = "resid_pre",
    by: str = "layer_pos",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> PatchResult:
    """Attribution patching: the first-order estimate of `patch`'s grid, from one backward pass.

    Each cell holds ``corrupted_value + sum((clean_act - corrupted_act) * grad)`` over the cell's
    entries and the batch, the gradient being that of the metric on the corrupted run with respect
    to the site's activation. Same arguments and layout as `patch`; the metric must be differentiable.

    Works inside ``torch.inference_mode()`` too: the backward pass needs gradients, so this function
    turns inference mode off for itself (and copies tokens made under it).
    """
    with torch.inference_mode(False):
        return _attribution_patch(model, clean, corrupted, metric, site, by, layers, heads, positions)


def _attribution_patch(model, clean, corrupted, metric, site, by, layers, heads, positions) -> PatchResult:
    clean_run = as_run(model, clean)
    grid = _Grid.build(model, site, by, clean_run.tokens.clone(), corrupted, layers, heads, positions)
    grid.corrupted = grid.corrupted.clone()  # an inference-mode tensor cannot be saved for backward
    clean_store, clean_logits = _clean_activations(clean_run, grid)
    metric = bind(metric, model, grid.clean, clean_logits)
    if not getattr(metric, "differentiable", True):
        raise InputError(f"attribution_patch needs a differentiable metric; {type(metric).__name__} is not")
    clean_value = scalar(metric, clean_logits)
    saved: dict[str, Tensor] = {}

    def keep_for_grad(activation: Tensor, hook) -> Tensor:
        if not activation.requires_grad:  # the first site reached: later sites depend on it
            activation = activation.detach().requires_grad_(True)
        saved[hook.name] = activation
        return activation

    with torch.enable_grad():
        with hooks.Hooks([(name, keep_for_grad) for name in grid.hook_names()]).on(model):
            value = scalar_tensor(metric, model(grid.corrupted))
        names = grid.hook_names()
        grads = torch.autograd.grad(value, [saved[n] for n in names], allow_unused=True)
    values = torch.stack(
        [
            grid.reduce_to_cells((clean_store[n] - saved[n].detach()) * _zero_if_none(g, saved[n]))
            for n, g in zip(names, grads)
        ]
    )
    corrupted_value = value.item()
    return grid.result(corrupted_value + values.float().cpu(), clean_value, corrupted_value)


# --- the grid of cells -----------------------------------------------------------------------


@dataclass
class _Grid:
    """What is patched: the site, the cells (layer + `by` indices), and the two token batches."""

    model: Model
    site: str
    by: str
    clean: Tensor
    corrupted: Tensor
    layers: list[int]
    choices: dict[str, list[int]]  # selected indices of each cell dim

    @classmethod
    def build(cls, model, site, by, clean, corrupted, layers, heads, positions) -> "_Grid":
        if site not in SITES:
            raise InputError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")
        if by not in GRANULARITIES:
            raise InputError(f"unknown by={by!r}; valid: {', '.join(GRANULARITIES)}")
        layout = _layout(site)
        missing = [d for d in GRANULARITIES[by] if d not in _LAYOUTS[layout][0]]
        if missing:
            raise InputError(
                f"by={by!r} does not apply to site {site!r}: it has no {missing[0]} dimension "
                f"(per-head sites: z, q, k, v, pattern; layer_head_dest_src: pattern only)"
            )
        if SITES[site].format(0) not in model.hook_dict:
            raise InputError(f"site {site!r} does not exist in this model (no hook {SITES[site].format(0)!r})")
        if model.cfg.positional_embedding_type == "shortformer":
            raise InputError("patching does not support shortformer positional embeddings")
        clean, corrupted = as_tokens(model, clean, "clean"), as_tokens(model, corrupted, "corrupted")
        if clean.shape != corrupted.shape:
            raise InputError(
                f"clean and corrupted tokens must have the same shape [batch, pos]; got "
                f"{tuple(clean.shape)} and {tuple(corrupted.shape)}"
            )
        n_pos = clean.shape[1]
        sizes = {"pos": n_pos, "src": n_pos, "head": sites.n_heads_at(model, SITES[site])}
        wanted = {"head": heads, "pos": positions}
        if "head" in GRANULARITIES[by] and _grouped(model, site):
            _check_key_value_heads(model, site, heads)
        choices = {d: _choose(wanted.get(d), sizes[d], d) for d in GRANULARITIES[by]}
        return cls(model, site, by, clean, corrupted, _choose(layers, model.cfg.n_layers, "layer"), choices)

    @property
    def cell_dims(self) -> tuple[str, ...]:
        return GRANULARITIES[self.by]

    @property
    def index_dims(self) -> tuple[str, ...]:
        return _LAYOUTS[_layout(self.site)][0]

    @property
    def patches_one_position(self) -> bool:
        """Whether a cell patches one position and, within its layer, changes nothing after it
        (true unless the site feeds attention's keys and values: resid_pre, k, v)."""
        return "pos" in self.cell_dims and self.site not in ("resid_pre", "k", "v")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.layers), *(len(self.choices[d]) for d in self.cell_dims))

    def hook_names(self) -> list[str]:
        return [SITES[self.site].format(layer) for layer in self.layers]

    def cells(self) -> Tensor:
        """Every cell as grid coordinates [n_cells, 1 + len(cell_dims)] (indices into the selections)."""
        return torch.cartesian_prod(*(torch.arange(n) for n in self.shape)).reshape(-1, len(self.shape))

    def masks(self, cells: Tensor, shape: Sequence[int]) -> Tensor:
        """Boolean masks [n_cells, *index dims] that are True on each cell's patched entries.

        `shape` is the size of the index dims (all positions; the caller slices them).
        """
        mask = torch.ones(len(cells), *shape, dtype=torch.bool)
        for dim, chosen in zip(self.cell_dims, self.chosen(cells)):
            axis = self.index_dims.index(dim)
            view = [len(cells)] + [1] * len(shape)
            view[1 + axis] = shape[axis]
            mask &= (torch.arange(shape[axis]) == chosen[:, None]).view(view)
        return mask

    def chosen(self, cells: Tensor) -> list[Tensor]:
        """The real index (head, position ...) of each cell along each cell dim."""
        return [torch.tensor(self.choices[dim])[cells[:, column]] for column, dim in enumerate(self.cell_dims, start=1)]

    def plan(self, clean: dict[str, Tensor], corrupted: dict[str, Tensor]) -> dict[int, Tensor]:
        """Cells to run, grouped by their first changed position and sorted by layer.

        A cell's run changes nothing before the first position where its clean and corrupted entries
        differ; cells whose entries are all equal are left out (their value is the corrupted run's).
        """
        groups: dict[int, list[Tensor]] = {}
        cells = self.cells()
        with_pos = self.cell_dims if "pos" in self.cell_dims else (*self.cell_dims, "pos")
        for row, name in enumerate(self.hook_names()):
            changed = _entries(clean[name] != corrupted[name], self.index_dims).any(-1).any(0).cpu()
            changed = _keep_dims(changed, self.index_dims, with_pos, torch.any)  # [*cell dims, (pos)]
            layer_cells = cells[cells[:, 0] == row]
            chosen = self.chosen(layer_cells)
            picked = changed[tuple(chosen)] if chosen else changed[None]  # [n_cells] or [n_cells, pos]
            if "pos" in self.cell_dims:
                has_change, starts = picked, chosen[self.cell_dims.index("pos")]
            else:
                has_change, starts = picked.any(-1), picked.int().argmax(-1)
            for start in starts[has_change].unique().tolist():
                groups.setdefault(start, []).append(layer_cells[has_change & (starts == start)])
        layer_of = torch.tensor(self.layers)
        return {start: _sorted_by(torch.cat(parts), layer_of) for start, parts in sorted(groups.items())}

    def cells_per_batch(self, start: int, reader: "MetricReader") -> int:
        """How many cells starting at position `start` one forward can hold within `MEMORY_BUDGET`."""
        cfg = self.model.cfg
        batch, n_pos = self.clean.shape
        width = max(cfg.d_mlp or 0, 3 * cfg.n_heads * cfg.d_head, 2 * cfg.n_heads * n_pos, cfg.d_model)
        per_cell = 4 * batch * (4 * width * (n_pos - start) + reader.width())
        return max(1, MEMORY_BUDGET // per_cell)

    def reduce_to_cells(self, contribution: Tensor) -> Tensor:
        """Sum a per-entry contribution [batch, *index dims, (feature)] over each cell: [*cell dims]."""
        summed = _keep_dims(
            _entries(contribution, self.index_dims).sum(-1).sum(0), self.index_dims, self.cell_dims, torch.sum
        )
        for axis, dim in enumerate(self.cell_dims):
            summed = summed.index_select(axis, torch.tensor(self.choices[dim], device=summed.device))
        return summed

    def result(self, values: Tensor, clean_value: float, corrupted_value: float) -> PatchResult:
        names = {"layer_head_dest_src": ("layer", "head", "dest", "src")}.get(self.by, ("layer", *self.cell_dims))
        if _grouped(self.model, self.site):
            names = tuple("kv_head" if name == "head" else name for name in names)
        tokens = token_labels(self.model, self.clean[0])
        labels = {"layer": list(self.layers)}
        for name, dim in zip(names[1:], self.cell_dims):
            labels[name] = list(self.choices[dim]) if dim == "head" else [tokens[i] for i in self.choices[dim]]
        return PatchResult(values, names, labels, clean_value, corrupted_value)


# --- runs --------------------------------------------------------------------------------------


class _CorruptedRun:
    """The corrupted run, cached for resuming: residual stream entering each block (and the final one),
    site activations, and every layer's keys and values."""

    def __init__(self, model: Model, grid: _Grid):
        self.model, self.grid = model, grid
        n_layers = model.cfg.n_layers
        resid, _, _, self.attention_mask = model.input_to_embed(grid.corrupted)
        entries = [empty_entry(model, resid) for _ in range(n_layers)]
        resid_names = [sites.act_name("resid_pre", layer) for layer in range(n_layers)]
        cache = hooks.cache([*resid_names, *grid.hook_names()])
        with cache.on(model):
            final = run_blocks(model, {0: resid}, lambda layer, rows: entries[layer], self.attention_mask)
        self.logits = Readout(model)(final)
        self.resid_in = [*(cache.store[name] for name in resid_names), final]
        self.site = {name: cache.store[name] for name in grid.hook_names()}
        self.keys_values = [(e.past_keys, e.past_values) for e in entries]

    def resume(self, cells: Tensor, start: int, clean: dict[str, Tensor]) -> Tensor:
        """Final residual streams [n_cells, batch, pos - start, d_model] of the patched runs of `cells`.

        A cell's layer runs on its own (the patch hook attached) from the cached residual stream, on
        positions start.. (only the patched position when the patch cannot reach later positions
        within the layer); the cell then joins the batch at the next layer. Positions before `start`
        are never recomputed: attention reads their keys and values from the corrupted run.
        """
        grid, model = self.grid, self.model
        batch, n_pos = grid.corrupted.shape
        stop = start + 1 if grid.patches_one_position else n_pos

        def entry(layer: int, rows: int) -> TransformerLensKeyValueCacheEntry | None:
            if start == 0:
                return None
            keys, values = (t[:, :start].repeat(rows // batch, 1, 1, 1) for t in self.keys_values[layer])
            return TransformerLensKeyValueCacheEntry(keys, values, frozen=True)

        joins = {}
        for row in cells[:, 0].unique_consecutive().tolist():  # cells come sorted by layer
            layer_cells = cells[cells[:, 0] == row]
            layer, name = grid.layers[row], grid.hook_names()[row]
            masks = grid.masks(layer_cells, self.site[name].shape[1 : 1 + len(grid.index_dims)])
            masks = _window(masks, grid.index_dims, start, stop, offset=1)
            masks = masks.reshape(*masks.shape, *[1] * _LAYOUTS[_layout(grid.site)][1]).unsqueeze(1)
            source = _window(clean[name], grid.index_dims, start, stop, offset=1)
            resid = self.resid_in[layer][:, start:stop].repeat(len(layer_cells), 1, 1)
            with hooks.Hooks([(name, _write_where(source, masks.to(source.device)))]).on(model):
                resid = run_block(model, layer, resid, entry, self.attention_mask)
            later = self.resid_in[layer + 1][:, stop:].repeat(len(layer_cells), 1, 1)
            joins[layer + 1] = torch.cat([resid, later], dim=1)
        final = run_blocks(model, joins, entry, self.attention_mask)
        return final.view(len(cells), batch, *final.shape[1:])


def _write_where(source: Tensor, masks: Tensor):
    """A hook writing `source` [batch, ...] where `masks` [n_cells, 1, ...] is True, into an
    activation [n_cells * batch, ...] (the runs of n_cells cells, batch rows each)."""

    def write(activation: Tensor, hook) -> Tensor:
        runs = activation.view(masks.shape[0], source.shape[0], *activation.shape[1:])
        return torch.where(masks, source, runs).flatten(0, 1)

    return write


# --- helpers -----------------------------------------------------------------------------------


def _layout(site: str) -> str:
    """Which `_LAYOUTS` entry a site's activation follows (from `lenskit.sites`)."""
    name = SITES[site]
    return "pattern" if sites.is_pair(name) else "head" if sites.layout(name)[1] is not None else "resid"


def _grouped(model: Model, site: str) -> bool:
    """Whether the site's heads are key/value heads each shared by several query heads."""
    return site in ("k", "v") and sites.n_heads_at(model, SITES[site]) < model.cfg.n_heads


def _check_key_value_heads(model: Model, site: str, heads) -> None:
    """Out-of-range heads of a grouped k / v site: ValueError naming the key/value heads and their groups."""
    if heads is None:
        return
    n_kv = sites.n_heads_at(model, SITES[site])
    group = model.cfg.n_heads // n_kv
    bad = [h for h in ([heads] if isinstance(heads, int) else [int(h) for h in heads]) if not -n_kv <= h < n_kv]
    if bad:
        raise InputError(
            f"head {bad[0]} out of range for site {site!r}: this grouped-query model has {n_kv} "
            f"key/value heads (valid 0..{n_kv - 1}, or negative from the end) shared by "
            f"{model.cfg.n_heads} query heads; key/value head h is read by query heads "
            f"{group}h..{group}h+{group - 1}. To patch one query head's {site}, first call "
            f"model.set_ungroup_grouped_query_attention(True)"
        )


def _choose(chosen: Sequence[int] | None, size: int, what: str) -> list[int]:
    if chosen is None:
        return list(range(size))
    chosen = checks.integers(chosen, f"{what}s")
    bad = [i for i in chosen if not -size <= i < size]
    if bad:
        raise InputError(
            f"{what} {bad[0]} out of range: there are {size} {what}s (valid 0..{size - 1}, or negative from the end)"
        )
    chosen = [i % size for i in chosen]
    if len(set(chosen)) < len(chosen):
        raise InputError(f"{what}s {chosen} name the same {what} twice")
    return chosen


def _zero_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    """A site the metric does not depend on gets a zero gradient."""
    return torch.zeros_like(like) if grad is None else grad


def _entries(activation: Tensor, index_dims: Sequence[str]) -> Tensor:
    """[batch, *index dims, (feature ...)] -> [batch, *index dims, features] (a dim of 1 when none)."""
    return activation.reshape(*activation.shape[: 1 + len(index_dims)], -1)


def _keep_dims(values: Tensor, index_dims: Sequence[str], dims: Sequence[str], reduce) -> Tensor:
    """Reduce `values` [*index dims] over the dims not in `dims`, and order the rest as `dims`."""
    for axis in reversed(range(len(index_dims))):
        if index_dims[axis] not in dims:
            values = reduce(values, axis)
    kept = [d for d in index_dims if d in dims]
    return values.permute(*[kept.index(d) for d in dims])


def _window(tensor: Tensor, index_dims: Sequence[str], start: int, stop: int, offset: int) -> Tensor:
    """The entries a run on positions start..stop-1 sees: query positions in [start, stop) and, for
    attention patterns, key positions in [0, stop). The index dims begin `offset` dims in."""
    window = tensor.narrow(offset + index_dims.index("pos"), start, stop - start)
    if "src" in index_dims:
        window = window.narrow(offset + index_dims.index("src"), 0, stop)
    return window


def _sorted_by(cells: Tensor, layer_of: Tensor) -> Tensor:
    """Cells ordered by their real layer: the order in which their rows enter a batched run."""
    return cells[torch.sort(layer_of[cells[:, 0]], stable=True).indices]


def _chunks(cells: Tensor, size: int) -> list[Tensor]:
    return [cells[i : i + size] for i in range(0, len(cells), size)]


def _index_label(dim: str, label) -> str:
    return {"layer": f"L{label}", "head": f"H{label}", "kv_head": f"KV{label}"}.get(dim, str(label))
