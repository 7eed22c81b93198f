"""Vocabulary projection of heads, neurons and residual directions; attention head detectors.

Projection reads a d_model vector through the unembedding and lists the tokens it promotes
(largest logits) and suppresses (most negative)::

    vocab.project(model, direction)                       # any residual direction
    vocab.neuron(model, layer=2, neuron=117)              # W_out[2, 117] @ W_U
    vocab.head_output(model, tokens, layer=1, head=3)     # hook_z[pos, 3] @ W_O[1, 3] @ W_U

Each returns a DataFrame with columns kind ("promoted" / "suppressed"), rank, token, token_id
and value: k promoted rows, largest value first, then k suppressed rows, most negative first.
Bias terms (b_O, b_out, ln_final.b, b_U) belong to no single head or neuron and are left out.

``normalize=True`` (the default) applies what the final normalisation does linearly to a
residual vector: centring (LayerNorm only) and the weight ``ln_final.w`` where the model has
one. For `head_output` it also divides by the final normalisation's scale cached at that
position (``ln_final.hook_scale``, as ``ActivationCache.apply_ln_to_stack`` does), so the values
are the head's direct contribution to the logits there. A direction or a weight row has no
position, hence no scale: their values are per unit of that scale. With TransformerLens'
default weight processing (``fold_ln``, ``center_writing_weights``) the centring and weight are
already inside the weights, so both settings agree there up to the scale; ``normalize=False``
is the plain ``vector @ W_U``.

Head detectors score every head's attention pattern against the pattern a previous-token,
duplicate-token or induction head would show, exactly as TransformerLens' ``detect_head``::

    vocab.head_scores(model, "a b c d a b c d", kind="induction").plot()
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lenskit import checks, sites
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.labelled import LabelledTensor
from lenskit.readout import Readout
from lenskit.run import Run, as_run
from lenskit.tokens import Prompts, as_tokens

HeadKind = Literal["previous_token", "duplicate_token", "induction"]
HEAD_KINDS = ("previous_token", "duplicate_token", "induction")
ERROR_MEASURES = ("mul", "abs")


# --- vocabulary projection -----------------------------------------------------------------


def project(model: Model, direction: Float[Tensor, " d_model"], k: int = 10, normalize: bool = True) -> pd.DataFrame:
    """The k tokens a residual direction promotes most and the k it suppresses most."""
    if not isinstance(direction, Tensor) or tuple(direction.shape) != (model.cfg.d_model,):
        shape = tuple(direction.shape) if isinstance(direction, Tensor) else type(direction).__name__
        raise InputError(
            f"project: direction must be a tensor of shape (d_model,) = ({model.cfg.d_model},), got {shape}"
        )
    if not torch.isfinite(direction).all():
        raise InputError("project: direction holds NaN or infinite entries; give a finite vector")
    readout = Readout(model)
    vector = direction.to(readout.W_U.device, readout.W_U.dtype)
    return top_tokens(model, readout.contributions(vector, normalize=normalize), k, source="direction")


def neuron(model: Model, layer: int, neuron: int, k: int = 10, normalize: bool = True) -> pd.DataFrame:
    """The tokens promoted / suppressed by an MLP neuron's output weights, ``W_out[layer, neuron] @ W_U``.

    Works for plain and gated (Llama-style) MLPs alike: both write to the residual through W_out.
    """
    layer = _check_index("layer", layer, model.cfg.n_layers)
    mlp = getattr(model.blocks[layer], "mlp", None)
    if getattr(mlp, "W_out", None) is None:
        raise InputError(f"neuron: block {layer} has no MLP with output weights W_out")
    neuron = _check_index("neuron", neuron, mlp.W_out.shape[0])
    logits = Readout(model).contributions(mlp.W_out[neuron].detach(), normalize=normalize)
    return top_tokens(model, logits, k, source=f"L{layer}N{neuron}")


def head_output(
    model: Model,
    tokens: Prompts,
    layer: int,
    head: int,
    pos: int = -1,
    k: int = 10,
    normalize: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """The tokens promoted / suppressed by one head's output at a position.

    The head's output is ``hook_z[pos, head] @ W_O[layer, head]`` (its share of the attention
    output, without b_O). With ``normalize`` it goes through the final normalisation using the
    scale cached at `pos`, so the values are the head's direct effect on the logits.

    Args:
        tokens: a prompt (string or token ids [pos]), or several (strings, or ids [batch, pos]);
            with several, the logit contributions are averaged over prompts. `pos` indexes each
            prompt's own positions (pos=-1 is every prompt's last token).
    """
    layer = _check_index("layer", layer, model.cfg.n_layers)
    head = _check_index("head", head, model.cfg.n_heads)
    readout = Readout(model)
    W_O = model.blocks[layer].attn.W_O[head].detach()  # [d_head, d_model]
    total, count = 0.0, 0
    for run in _runs(model, tokens, progress):
        index = _check_index("pos", pos, run.shape[1])
        with torch.no_grad():
            final = run[sites.final_residual(model)][:, index]  # [batch, d_model]
            output = run[sites.act_name("z", layer)][:, index, head] @ W_O  # [batch, d_model]
            scale = readout.normalize_with_scale(final)[1] if normalize else None  # [batch, 1]
        total = total + readout.contributions(output, scale, normalize).sum(0)
        count += run.shape[0]
    return top_tokens(model, total / count, k, source=f"L{layer}H{head} at pos {pos}")


def top_tokens(model: Model, logits: Float[Tensor, " d_vocab"], k: int, source: str = "") -> pd.DataFrame:
    """A frame of the k largest (promoted) and k most negative (suppressed) entries of `logits`."""
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    k = min(k, logits.shape[-1])
    promoted = logits.topk(k)
    suppressed = (-logits).topk(k)
    ids = torch.cat([promoted.indices, suppressed.indices]).tolist()
    frame = pd.DataFrame(
        {
            "kind": ["promoted"] * k + ["suppressed"] * k,
            "rank": list(range(k)) * 2,
            "token": _token_strings(model, ids),
            "token_id": ids,
            "value": torch.cat([promoted.values, -suppressed.values]).detach().float().cpu().numpy(),
        }
    )
    frame.attrs["source"] = source
    return frame


def _token_strings(model: Model, ids: list[int]) -> list[str]:
    if model.tokenizer is None:
        return [f"<{i}>" for i in ids]
    return list(model.to_str_tokens(torch.tensor(ids)))


# --- head detectors -------------------------------------------------------------------------


def head_scores(
    model: Model,
    tokens: Prompts,
    kind: HeadKind = "induction",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: Literal["mul", "abs"] = "mul",
    progress: bool = True,
) -> LabelledTensor:
    """How much each head [layer, head] behaves like a previous-token, duplicate-token or induction head.

    Equals ``transformer_lens.head_detector.detect_head(model, tokens, kind + "_head", ...)``
    with the same options: ``"mul"`` is the fraction of attention on the query-key pairs of
    `detection_pattern`; ``"abs"`` is 1 - sum |pattern - detection| / pos (not rounded to 3
    decimals as TransformerLens does). `exclude_bos` ignores attention to position 0,
    `exclude_current_token` attention to the query's own position.

    Args:
        tokens: strings (tokenized with ``model.to_tokens``, so with BOS by default) or token ids
            [batch, pos] / [pos]. Several prompts are scored one by one and averaged, as in
            TransformerLens; prompts of equal length share one forward pass (no padding).
    """
    if kind not in HEAD_KINDS:
        raise InputError(f"head_scores: unknown kind {kind!r}; choose one of {HEAD_KINDS}")
    if error_measure not in ERROR_MEASURES:
        raise InputError(f"head_scores: unknown error_measure {error_measure!r}; choose one of {ERROR_MEASURES}")
    names = [sites.act_name("pattern", layer) for layer in range(model.cfg.n_layers)]
    total, count = 0.0, 0
    for run in _runs(model, tokens, progress, min_length=2):
        batch, store = run.tokens.cpu(), run.require(names)
        target = detection_pattern(batch, kind)[:, None]  # [batch, 1, q, k]
        keep = torch.ones(batch.shape[1], batch.shape[1])  # [q, k]: the query-key pairs compared
        if exclude_bos:
            keep[:, 0] = 0
        if exclude_current_token:
            keep.fill_diagonal_(0)
        scores = torch.stack([_similarity(store[name].float(), target, keep, error_measure) for name in names])
        total = total + scores.sum(1)  # [layer, head]
        count += len(batch)
    return LabelledTensor((total / count).cpu(), dims=("layer", "head"))


def _similarity(
    pattern: Float[Tensor, "batch head q k"],
    target: Float[Tensor, "batch 1 q k"],
    keep: Float[Tensor, "q k"],
    error_measure: str,
) -> Float[Tensor, "batch head"]:
    """detect_head's score of each attention pattern against the detection pattern, on the kept pairs."""
    target, keep = target.to(pattern.device), keep.to(pattern.device)
    if error_measure == "mul":
        kept = pattern * keep
        return (kept * target).sum((-2, -1)) / kept.sum((-2, -1))
    return 1 - ((pattern - target).abs() * keep).sum((-2, -1)) / pattern.shape[-1]


def detection_pattern(tokens: Int[Tensor, "batch pos"], kind: HeadKind) -> Float[Tensor, "batch pos pos"]:
    """The attention pattern [batch, query, key] (0 / 1) an ideal head of this kind would show.

    previous_token: key = query - 1. duplicate_token: an earlier key holding the query's token.
    induction: a key whose previous token is the query's token.
    """
    if kind not in HEAD_KINDS:
        raise InputError(f"detection_pattern: unknown kind {kind!r}; choose one of {HEAD_KINDS}")
    batch, n = tokens.shape
    same = tokens[:, :, None] == tokens[:, None, :]  # [batch, q, k]: token q == token k
    if kind == "previous_token":
        pattern = torch.ones(n - 1, dtype=torch.bool, device=tokens.device).diag(-1).expand(batch, n, n)
    elif kind == "duplicate_token":
        pattern = same & torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-1)
    else:
        pattern = torch.zeros_like(same)
        causal = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril()
        pattern[:, :, 1:] = same[:, :, :-1] & causal[:, 1:]  # token q == token k-1, k <= q
    return pattern.float()


# --- running prompts ------------------------------------------------------------------------


def _runs(model: Model, tokens: "Prompts | Run", progress: bool, min_length: int = 1) -> Iterator[Run]:
    """A run of each group of equal-length prompts (nothing padded); a given Run is the only group."""
    if isinstance(tokens, Run) or isinstance(tokens, Tensor):
        groups = [as_run(model, tokens)]
    else:
        prompts = [tokens] if isinstance(tokens, str) else list(tokens)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError("tokens must be a string, a non-empty list of strings, or a tensor of token ids")
        by_length: dict[int, list[Tensor]] = {}
        for prompt in prompts:
            ids = as_tokens(model, prompt)[0]
            by_length.setdefault(len(ids), []).append(ids)
        groups = [Run(model, torch.stack(rows)) for rows in by_length.values()]
    for run in groups:
        if run.shape[1] < min_length:
            raise InputError(
                f"prompts must have {min_length}..{model.cfg.n_ctx} tokens (the model's n_ctx); "
                f"got one with {run.shape[1]}"
            )
    yield from tqdm(groups, desc="prompt lengths", disable=not progress or len(groups) == 1)


def _check_index(what: str, index: int, size: int) -> int:
    """`index` made non-negative, or InputError naming the valid range."""
    if not -size <= checks.integer(index, what) < size:
        raise InputError(f"{what} {index} out of range: valid 0..{size - 1} (or negative from the end)")
    return int(index) % size
