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
from transformer_lens import HookedTransformer

from lenskit import hooks
from lenskit.tokens import TokenLike, as_tokens, token_ids

BY = ("layer", "head", "neuron", "position", "head_pos")
COLUMNS = ["component", "layer", "head", "neuron", "src_pos", "token", "value"]
CENTRED_NORMS = ("LN", "LNPre")


def unembedding_direction(
    model: HookedTransformer, answer: Tensor, wrong: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The residual direction read by logit(answer) - logit(wrong) before the final norm's scale, and the
    constant the final norm's bias and b_U add: ([batch, d_model], [batch]). answer, wrong: ids [batch]."""
    direction = model.W_U[:, answer].T  # [batch, d_model]
    constant = model.b_U[answer]
    if wrong is not None:
        direction = direction - model.W_U[:, wrong].T
        constant = constant - model.b_U[wrong]
    ln_final = getattr(model, "ln_final", None)
    if getattr(ln_final, "b", None) is not None:
        constant = constant + direction @ ln_final.b
    if getattr(ln_final, "w", None) is not None:
        direction = direction * ln_final.w
    if model.cfg.normalization_type in CENTRED_NORMS:  # LayerNorm subtracts the mean: (x - mean x) . d = x . (d - mean d)
        direction = direction - direction.mean(-1, keepdim=True)
    return direction, constant


def final_normalization(model: HookedTransformer, resid: Tensor) -> tuple[Tensor, Tensor]:
    """The final normalisation of residuals [batch, d_model]: (normalised [batch, d_model], its scale [batch, 1])."""
    if model.cfg.normalization_type is None:
        return resid, torch.ones_like(resid[:, :1])
    store: dict[str, Tensor] = {}
    with hooks.cache("ln_final.hook_scale", store).on(model):
        normalized = model.ln_final(resid[:, None])[:, 0]
    return normalized, store["ln_final.hook_scale"][:, 0]


def _activations(model: HookedTransformer, tokens: Tensor, names: list[str], cache) -> dict[str, Tensor]:
    """The activations `names` of a run on `tokens`: read from `cache` (an ActivationCache or a dict of
    full activations of that run) if given, else from one forward pass that stops before the unembedding."""
    if cache is None:
        store: dict[str, Tensor] = {}
        with hooks.cache(names, store).on(model):
            model(tokens, stop_at_layer=model.cfg.n_layers)
        return store
    store = getattr(cache, "cache_dict", cache)
    missing = [name for name in names if name not in store]
    if missing:
        raise ValueError(f"cache lacks {len(missing)} activations this decomposition reads, e.g. {missing[:3]}")
    if tuple(store["hook_embed"].shape[:2]) != tuple(tokens.shape):
        raise ValueError(f"cache holds a run on {tuple(store['hook_embed'].shape[:2])} tokens, not on tokens {tuple(tokens.shape)}")
    return store


def _read_logits(model: HookedTransformer, normalized: Tensor, answer: Tensor, wrong: Tensor | None) -> Tensor:
    """logit(answer) - logit(wrong) from final normalised residuals [batch, d_model], unembedding only those columns."""

    def logit(ids: Tensor) -> Tensor:
        return (normalized * model.W_U[:, ids].T).sum(-1) + model.b_U[ids]

    return logit(answer) - (0 if wrong is None else logit(wrong))


def needed_hooks(model: HookedTransformer, by: str) -> list[str]:
    """Hook names whose activations the decomposition `by` reads."""
    names = ["hook_embed", *(["hook_pos_embed"] if has_positional_embedding(model) else [])]
    names.append(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    for layer in range(model.cfg.n_layers):
        block = f"blocks.{layer}"
        names.append(f"{block}.hook_attn_out" if by in ("layer", "neuron") else f"{block}.attn.hook_z")
        if by in ("head_pos", "position"):
            names += [f"{block}.attn.hook_pattern", f"{block}.attn.hook_v"]
        names.append(f"{block}.mlp.hook_post" if by == "neuron" else f"{block}.hook_mlp_out")
    return names


def has_positional_embedding(model: HookedTransformer) -> bool:
    return model.cfg.positional_embedding_type == "standard"


def attribute(
    model: HookedTransformer,
    tokens: str | Sequence[str] | Tensor,
    answer: TokenLike | Sequence[TokenLike] | Tensor,
    wrong: TokenLike | Sequence[TokenLike] | Tensor | None = None,
    by: str = "layer",
    pos: int | Sequence[int] | Tensor = -1,
    per_prompt: bool = False,
    cache: Mapping[str, Tensor] | None = None,
) -> pd.DataFrame:
    """Split logit(answer) (minus logit(wrong), if given) at position `pos` into component contributions.

    Args:
        tokens: a text, a list of texts (same length in tokens), or ids [pos] / [batch, pos].
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
            a dict of full activations by hook name, e.g. from ``lenskit.hooks.cache``); else one
            forward pass caches just what is needed.

    Returns:
        A DataFrame (component, layer, head, neuron, src_pos, token, value) sorted by |value|, whose
        values sum to the logit (difference); ``.attrs`` holds "total" (sum of the parts) and "logit_diff"
        (the model's own value), both batch means, and "per_prompt" (the model's values [batch]).
        "token" is the source token of src_pos (left empty where prompts disagree).
    """
    if by not in BY:
        raise ValueError(f"unknown by={by!r}; choose one of {BY}")
    tokens = as_tokens(model, tokens)
    batch, n_pos = tokens.shape
    rows = torch.arange(batch)
    positions = _positions(pos, batch, n_pos)
    answer_ids = _per_prompt_ids(model, answer, batch, "answer")
    wrong_ids = None if wrong is None else _per_prompt_ids(model, wrong, batch, "wrong")

    with torch.no_grad():
        store = _activations(model, tokens, needed_hooks(model, by), cache)
        resid = store[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][rows, positions]  # [batch, d_model]
        normalized, scale = final_normalization(model, resid)
        true_value = _read_logits(model, normalized, answer_ids, wrong_ids)
        direction, constant = unembedding_direction(model, answer_ids, wrong_ids)
        parts = _parts(model, store, by, rows, positions, direction / scale)
    parts.append(Part("bias", constant))
    return _frame(model, tokens, parts, true_value, per_prompt)


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
        block = f"blocks.{layer}"
        if by in ("layer", "neuron"):
            parts.append(Part("attn", read(f"{block}.hook_attn_out"), layer))
        else:
            head_directions = einops.einsum(model.blocks[layer].attn.W_O, direction, "head d_head d_model, batch d_model -> batch head d_head")
            if by == "head":
                z = store[f"{block}.attn.hook_z"][rows, positions]  # [batch, head, d_head]
                parts.append(Part("head", (z * head_directions).sum(-1), layer, ("head",)))
            else:
                per_source = _head_source_contributions(model, store, block, rows, positions, head_directions)
                if by == "head_pos":
                    parts.append(Part("head", per_source, layer, ("head", "src_pos")))
                else:
                    by_source.append(per_source.sum(1))
            parts.append(Part("attn_bias", direction @ model.blocks[layer].attn.b_O, layer))
        if by == "neuron":
            post = store[f"{block}.mlp.hook_post"][rows, positions]  # [batch, d_mlp]
            parts.append(Part("neuron", post * (model.blocks[layer].mlp.W_out @ direction.T).T, layer, ("neuron",)))
            parts.append(Part("mlp_bias", direction @ model.blocks[layer].mlp.b_out, layer))
        else:
            parts.append(Part("mlp", read(f"{block}.hook_mlp_out"), layer))
    if by == "position":
        parts.append(Part("attn_src", torch.stack(by_source).sum(0), dims=("src_pos",)))
    return parts


def _head_source_contributions(model, store, block, rows, positions, head_directions) -> Tensor:
    """A[i, j] (v_j . W_O^h direction) for every head h and source j: [batch, head, src_pos]."""
    pattern = store[f"{block}.attn.hook_pattern"][rows, :, positions]  # [batch, head, src_pos]
    values = store[f"{block}.attn.hook_v"]  # [batch, src_pos, kv_head, d_head]
    values = values.repeat_interleave(model.cfg.n_heads // values.shape[2], dim=2)  # grouped-query attention
    value_logits = einops.einsum(values, head_directions, "batch src head d_head, batch head d_head -> batch head src")
    return pattern * value_logits


def _positions(pos, batch: int, n_pos: int) -> Tensor:
    """Non-negative positions [batch] from one position or one per prompt."""
    positions = torch.as_tensor(pos, dtype=torch.long).reshape(-1)
    if len(positions) not in (1, batch):
        raise ValueError(f"pos: give one position or one per prompt ({batch}), got {len(positions)}")
    if ((positions < -n_pos) | (positions >= n_pos)).any():
        raise ValueError(f"pos {positions.tolist()} out of range for prompts of {n_pos} tokens")
    return (positions % n_pos).expand(batch)


def _per_prompt_ids(model, tokens, batch: int, what: str) -> Tensor:
    """Token ids [batch]: one token for every prompt, or one per prompt."""
    ids = token_ids(model, tokens)
    if len(ids) not in (1, batch):
        raise ValueError(f"{what}: give one token or one per prompt ({batch}), got {len(ids)}")
    return ids.expand(batch).to(model.cfg.device)


def _frame(model, tokens: Tensor, parts: list[Part], true_value: Tensor, per_prompt: bool) -> pd.DataFrame:
    """The tidy result: one row per part (and prompt), sorted by |value|."""
    labels = _labels(parts)
    source_tokens = [_source_token(model, tokens, j) for j in range(tokens.shape[1])]
    has_source = labels["src_pos"].notna().to_numpy()
    labels["token"] = None
    labels.loc[has_source, "token"] = [source_tokens[j] for j in labels["src_pos"][has_source]]
    values = torch.cat([part.values for part in parts], dim=1).double().cpu()  # [batch, n_parts]
    if per_prompt:
        frame = pd.concat([labels.assign(prompt=b, value=values[b].numpy()) for b in range(len(values))], ignore_index=True)
        frame = frame[["prompt", *COLUMNS]]
    else:
        frame = labels.assign(value=values.mean(0).numpy())
    frame = frame.iloc[frame["value"].abs().argsort()[::-1]].reset_index(drop=True)
    frame.attrs.update(total=values.sum(1).mean().item(), logit_diff=true_value.float().mean().item(),
                       per_prompt=true_value.float().cpu())
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
