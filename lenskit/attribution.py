"""Direct logit attribution: a logit (or logit difference) split into the model components that wrote it.

The final residual stream at the answer position is a sum of what each component wrote into it:
token and positional embeddings, every attention layer (a sum of heads, each a sum over source
positions of A[i, j] v_j W_O, plus the bias b_O) and every MLP layer (a sum of neurons, post_n W_out[n],
plus b_out). The final normalisation is linear once its scale is fixed, so with the scale read from the
run (``ln_final.hook_scale``) each part's contribution to the logit is exact and

    sum of parts + final bias (normalisation bias and b_U) = the model's logit (difference).

    >>> frame = lenskit.attribute(model, "When Mary and John went to the store, John gave a drink to",
    ...                           " Mary", " John", by="head")
    >>> frame.head()                   # component, layer, head, neuron, src_pos, token, value
    >>> frame.attrs["logit_diff"]      # the model's own logit difference; frame.value.sum() equals it
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import einops
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from lenskit import backend, checks, sites
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.readout import Readout
from lenskit.run import Run, as_run
from lenskit.tokens import Prompts, TokenLike, token_ids
from lenskit.viz import Figure, Pictured, heatmap

BY = ("layer", "head", "neuron", "position", "head_pos")
COLUMNS = ["component", "layer", "head", "neuron", "src_pos", "token", "value"]


def needed_hooks(model: Model, by: str) -> list[str]:
    """Hook names whose activations the decomposition `by` reads."""
    names = [*sites.embedding_names(model), sites.final_residual(model)]
    for layer in range(model.cfg.n_layers):
        names.append(sites.act_name("attn_out" if by in ("layer", "neuron") else "z", layer))
        if by in ("head_pos", "position"):
            names += [sites.act_name("pattern", layer), sites.act_name("v", layer)]
        names.append(sites.act_name("post" if by == "neuron" else "mlp_out", layer))
    return names


def attribute(
    model: Model,
    tokens: "Prompts | Run",
    answer: TokenLike | Sequence[TokenLike] | Tensor,
    wrong: TokenLike | Sequence[TokenLike] | Tensor | None = None,
    by: str = "layer",
    pos: int | Sequence[int] | Tensor = -1,
    per_prompt: bool = False,
    cache: Mapping[str, Tensor] | None = None,
) -> "Attribution":
    """Split logit(answer) (minus logit(wrong), if given) at position `pos` into component contributions.

    Args:
        tokens: a text, a list of texts (same length in tokens), ids [pos] / [batch, pos], or a
            `lenskit.Run` (its cached activations are used; what it lacks is computed and kept).
        answer, wrong: a token string (" Mary") or id, or one per prompt.
        by: "layer" (embeddings, each attention and MLP layer, biases included),
            "head" (attention layers split into heads, b_O apart as "attn_bias"),
            "neuron" (MLP layers split into neurons, b_out apart as "mlp_bias"),
            "head_pos" (heads split by source position: A[i, j] v_j W_O^h, b_V included),
            "position" (all heads of all layers summed per source position; embeddings, MLPs and
            biases kept as their own rows).
        pos: the position read, one for all prompts or one per prompt (e.g. the last real token of
            right-padded prompts).
        per_prompt: one row per prompt and component (column "prompt") instead of the batch mean.
        cache: activations of a run on `tokens` already at hand (a TransformerLens ActivationCache or
            a dict of full activations by hook name, e.g. from ``lenskit.hooks.cache``); it must hold
            every activation the decomposition reads. Else one forward pass caches just what is needed.

    Returns:
        An `Attribution`: a DataFrame (component, layer, head, neuron, src_pos, token, value) sorted by |value|, whose
        values sum to the logit (difference); ``.attrs`` holds "total" (sum of the parts) and "logit_diff"
        (the model's own value), both batch means, and "per_prompt" (the model's values [batch]).
        "token" is the source token of src_pos (left empty where prompts disagree).
    """
    if by not in BY:
        raise InputError(f"unknown by={by!r}; choose one of {BY}")
    run = as_run(model, tokens) if cache is None else Run(model, tokens, activations=cache, extend=False)
    tokens = run.tokens
    batch, n_pos = tokens.shape
    rows = torch.arange(batch)
    positions = _positions(pos, batch, n_pos)
    answer_ids = _per_prompt_ids(model, answer, batch, "answer")
    wrong_ids = None if wrong is None else _per_prompt_ids(model, wrong, batch, "wrong")

    readout = Readout(model)
    with torch.no_grad():
        store = run.require(needed_hooks(model, by))
        resid = store[sites.final_residual(model)][rows, positions]  # [batch, d_model]
        normalized, scale = readout.normalize_with_scale(resid)
        true_value = readout.row_logits(normalized, answer_ids)
        if wrong_ids is not None:
            true_value = true_value - readout.row_logits(normalized, wrong_ids)
        direction, constant = readout.direction(answer_ids, wrong_ids)
        parts = _parts(model, store, by, rows, positions, direction / scale)
    parts.append(Part("bias", constant))
    return _frame(model, tokens, parts, true_value, per_prompt)


class Attribution(Pictured, pd.DataFrame):
    """`attribute`'s result: the tidy DataFrame itself (so every pandas habit works), plus its picture.

    ``plot()`` draws lenskit's picture (pandas' own ``.plot`` accessor stays on ``to_frame()`` and on
    slices). Slices and other pandas operations return plain DataFrames; ``.attrs`` holds total, logit_diff
    and per_prompt as documented on `attribute`.
    """

    @property
    def _constructor(self):
        return pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        """The rows as a plain DataFrame (attrs kept)."""
        frame = pd.DataFrame(self)
        frame.attrs.update(self.attrs)
        return frame

    def plot(self, title: str = "direct logit attribution") -> Figure:
        """A heatmap of the decomposition (means over prompts): layer x head for heads, (layer, head) x
        source position for head_pos, source positions for position, attention / MLP x layer for layers,
        the 30 largest neurons for neurons. Components outside the grid are summed in the title."""
        frame = self.groupby(
            ["component", "layer", "head", "neuron", "src_pos"], dropna=False, sort=False, as_index=False
        ).agg(value=("value", "mean"), token=("token", "first"))
        heads = frame[frame.component == "head"]
        if heads.src_pos.notna().any():
            shown, rows, cols = heads, ["layer", "head"], "src_pos"
        elif len(heads):
            shown, rows, cols = heads, ["layer"], "head"
        elif (frame.component == "attn_src").any():
            shown, rows, cols = frame[frame.component == "attn_src"], ["component"], "src_pos"
        elif (frame.component == "neuron").any():
            shown = (
                frame[frame.component == "neuron"]
                .head(30)
                .assign(unit=lambda f: [f"L{l} N{n}" for l, n in zip(f.layer, f.neuron)], column="value")
            )
            shown, rows, cols = shown, ["unit"], "column"
        else:
            shown, rows, cols = frame[frame.component.isin(["attn", "mlp"])], ["component"], "layer"
        grid = shown.pivot_table(index=rows, columns=cols, values="value", aggfunc="sum", sort=True)
        col_labels = [str(c) for c in grid.columns]
        if cols == "src_pos":
            tokens = shown.drop_duplicates("src_pos").set_index("src_pos").token
            col_labels = [f"{int(c)} {tokens.get(c) or ''}".strip() for c in grid.columns]
        row_labels = [
            " ".join(
                _grid_label(name, value) for name, value in zip(rows, index if isinstance(index, tuple) else (index,))
            )
            for index in grid.index
        ]
        rest = frame.loc[~frame.index.isin(shown.index)].groupby("component", sort=False).value.sum()
        others = ", ".join(f"{name} {value:+.2f}" for name, value in rest.items())
        return heatmap(
            torch.tensor(grid.fillna(0.0).to_numpy(dtype=float)).float(),
            row_labels,
            col_labels,
            title=f"{title} ({others})" if others else title,
            row_title=" ".join(rows),
            col_title=cols,
        )

    def _repr_html_(self) -> str:
        return self.plot().html + super()._repr_html_()


def _grid_label(name: str, value) -> str:
    """A row label part: L3 for layer 3, H1 for head 1, anything else as it is."""
    prefix = {"layer": "L", "head": "H"}.get(name)
    return f"{prefix}{int(value)}" if prefix else str(value)


class Part:
    """Contributions [batch, *index dims] of one kind of component in one layer (e.g. all heads of layer 3)."""

    def __init__(self, component: str, values: Tensor, layer: int | None = None, dims: tuple[str, ...] = ()):
        self.component, self.layer, self.dims = component, layer, dims
        self.values = values.reshape(len(values), -1) if dims else values[:, None]  # [batch, n]
        self.shape = tuple(values.shape[1:])

    def labels(self) -> pd.DataFrame:
        """One row per entry: component, layer and the index of each dim."""
        return _labels([self])


def _parts(model, store, by, rows, positions, direction) -> list[Part]:
    """Every component's contributions; direction [batch, d_model] already divided by the final scale."""

    def read(name: str) -> Tensor:  # the activation's logit contribution at each prompt's position: [batch]
        return (store[name][rows, positions] * direction).sum(-1)

    parts = [Part("embed", read("hook_embed"))]
    if "hook_pos_embed" in store:
        parts.append(Part("pos_embed", read("hook_pos_embed")))
    by_source = []  # [batch, src_pos] per layer, for by="position"
    for layer in range(model.cfg.n_layers):
        if by in ("layer", "neuron"):
            parts.append(Part("attn", read(sites.act_name("attn_out", layer)), layer))
        else:
            head_directions = einops.einsum(
                model.blocks[layer].attn.W_O, direction, "head d_head d_model, batch d_model -> batch head d_head"
            )
            if by == "head":
                z = store[sites.act_name("z", layer)][rows, positions]  # [batch, head, d_head]
                parts.append(Part("head", (z * head_directions).sum(-1), layer, ("head",)))
            else:
                per_source = _head_source_contributions(model, store, layer, rows, positions, head_directions)
                if by == "head_pos":
                    parts.append(Part("head", per_source, layer, ("head", "src_pos")))
                else:
                    by_source.append(per_source.sum(1))
            parts.append(
                Part(
                    "attn_bias", direction @ backend.bias(model.blocks[layer].attn, "b_O", direction.shape[-1:]), layer
                )
            )
        if by == "neuron":
            post = store[sites.act_name("post", layer)][rows, positions]  # [batch, d_mlp]
            parts.append(Part("neuron", post * (model.blocks[layer].mlp.W_out @ direction.T).T, layer, ("neuron",)))
            parts.append(
                Part(
                    "mlp_bias", direction @ backend.bias(model.blocks[layer].mlp, "b_out", direction.shape[-1:]), layer
                )
            )
        else:
            parts.append(Part("mlp", read(sites.act_name("mlp_out", layer)), layer))
    if by == "position":
        parts.append(Part("attn_src", torch.stack(by_source).sum(0), dims=("src_pos",)))
    return parts


def _head_source_contributions(model, store, layer, rows, positions, head_directions) -> Tensor:
    """A[i, j] (v_j . W_O^h direction) for every head h and source j: [batch, head, src_pos]."""
    pattern = store[sites.act_name("pattern", layer)][rows, :, positions]  # [batch, head, src_pos]
    values = store[sites.act_name("v", layer)]  # [batch, src_pos, kv_head, d_head]
    values = values.repeat_interleave(model.cfg.n_heads // values.shape[2], dim=2)  # grouped-query attention
    value_logits = einops.einsum(values, head_directions, "batch src head d_head, batch head d_head -> batch head src")
    return pattern * value_logits


def _positions(pos, batch: int, n_pos: int) -> Tensor:
    """Non-negative positions [batch] from one position or one per prompt."""
    positions = torch.tensor(checks.integers(pos, "pos"), dtype=torch.long)
    if len(positions) not in (1, batch):
        raise InputError(f"pos: give one position or one per prompt ({batch}), got {len(positions)}")
    if ((positions < -n_pos) | (positions >= n_pos)).any():
        raise InputError(f"pos {positions.tolist()} out of range for prompts of {n_pos} tokens")
    return (positions % n_pos).expand(batch)


def _per_prompt_ids(model, tokens, batch: int, what: str) -> Tensor:
    """Token ids [batch]: one token for every prompt, or one per prompt."""
    ids = token_ids(model, tokens)
    if len(ids) not in (1, batch):
        raise InputError(f"{what}: give one token or one per prompt ({batch}), got {len(ids)}")
    return ids.expand(batch).to(model.cfg.device)


def _frame(model, tokens: Tensor, parts: list[Part], true_value: Tensor, per_prompt: bool) -> "Attribution":
    """The tidy result: one row per part (and prompt), sorted by |value|."""
    labels = _labels(parts)
    source_tokens = [_source_token(model, tokens, j) for j in range(tokens.shape[1])]
    has_source = labels["src_pos"].notna().to_numpy()
    labels["token"] = None
    labels.loc[has_source, "token"] = [source_tokens[j] for j in labels["src_pos"][has_source]]
    values = torch.cat([part.values for part in parts], dim=1).double().cpu()  # [batch, n_parts]
    if per_prompt:
        frame = pd.concat(
            [labels.assign(prompt=b, value=values[b].numpy()) for b in range(len(values))], ignore_index=True
        )
        frame = frame[["prompt", *COLUMNS]]
    else:
        frame = labels.assign(value=values.mean(0).numpy())
    frame = Attribution(frame.iloc[frame["value"].abs().argsort()[::-1]].reset_index(drop=True))
    frame.attrs.update(
        total=values.sum(1).mean().item(),
        logit_diff=true_value.float().mean().item(),
        per_prompt=true_value.float().cpu(),
    )
    return frame


def _labels(parts: list[Part]) -> pd.DataFrame:
    """The label columns (component, layer, head, neuron, src_pos) of every entry of `parts`, in order.

    Built from whole numpy columns (one row per entry, the last dim varying fastest), not one frame
    per part: a per-neuron decomposition has tens of thousands of rows in about a hundred parts.
    """
    sizes = [part.values.shape[1] for part in parts]
    total = sum(sizes)
    columns = {"component": pd.Series(np.repeat(np.array([part.component for part in parts], dtype=object), sizes))}
    integers = {name: (np.zeros(total, dtype=np.int64), np.ones(total, dtype=bool)) for name in COLUMNS[1:5]}
    start = 0
    for part, size in zip(parts, sizes):
        window = slice(start, start + size)
        if part.layer is not None:
            integers["layer"][0][window], integers["layer"][1][window] = part.layer, False
        if part.dims:
            index = np.indices(part.shape).reshape(len(part.dims), -1)
            for k, dim in enumerate(part.dims):
                integers[dim][0][window], integers[dim][1][window] = index[k], False
        start += size
    for name, (values, missing) in integers.items():
        columns[name] = pd.arrays.IntegerArray(values, missing)
    return pd.DataFrame(columns, index=pd.RangeIndex(total))


def _source_token(model, tokens: Tensor, src_pos: int) -> str | None:
    """The token at src_pos if every prompt has the same one there, else None."""
    column = tokens[:, src_pos]
    if not (column == column[0]).all():
        return None
    return model.to_single_str_token(int(column[0])) if model.tokenizer is not None else str(int(column[0]))
