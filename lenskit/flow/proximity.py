"""The contribution measure of information-flow routes: proximity shares (Ferrando & Voita 2024).

For parts z_k of a sum y = sum_k z_k (vectors of d_model), the proximity of a part is

    prox_k = max(||y||_1 - ||y - z_k||_1, 0)

and its share is c_k = prox_k / sum_j prox_j, so the shares of one representation sum to 1.
Zero denominator: when every proximity is 0 (y is the zero vector, or removing any single part
brings y no closer to 0) all shares are 0, never NaN; such a representation gets no incoming edge.

    proximity(parts, whole)                          any parts, densely
    head_source_proximity(whole, sources, pattern)   the T x T x heads attention parts, exactly,
                                                     without materialising T x T x heads x d_model
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def proximity(parts: Float[Tensor, "part *batch d"], whole: Float[Tensor, "*batch d"]) -> Float[Tensor, "part *batch"]:  # noqa: F821
    """max(||whole||_1 - ||whole - part||_1, 0) for each part (dense: part x batch x d at once)."""
    return (whole.abs().sum(-1) - (whole - parts).abs().sum(-1)).clamp(min=0)


def shares(proximities: Tensor, total: Tensor) -> Tensor:
    """proximities / total, broadcast, with 0 wherever the total is 0."""
    return torch.where(total > 0, proximities / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)


def head_source_proximity(
    whole: Float[Tensor, "pos d_model"],
    sources: Float[Tensor, "src_pos head d_model"],
    pattern: Float[Tensor, "head pos src_pos"],
    budget: int = 2**21,
    block: int = 16,
) -> Float[Tensor, "pos src_pos head"]:
    """Proximity of every attention part z[i, j, h] = pattern[h, i, j] * sources[j, h] to whole[i].

    `sources[j, h]` is what head h writes for each unit of attention to position j (its value
    through W_O, plus its share of the biases). The result is exact, computed without the
    [pos, src_pos, head, d_model] tensor of parts. With y = whole[i], s = sign(y) (+1 at 0),
    r = |y|, a = pattern[h, i, j] >= 0 and w = sources[j, h]:

        ||y||_1 - ||y - a w||_1 = a <s, w> - 2 sum_d relu(a s_d w_d - r_d)

    The first term, for all (i, j, h), is one matrix product. The correction is non-zero only on
    coordinates with r_d < a |w_d| <= a max|w|: few wherever the residual stream is large next
    to one head's write from one token. For each block of `block` target positions it is summed
    over the K coordinates of smallest |y_d| (K chosen per block to minimise the work) for
    parts whose bound a max|w| does not exceed the (K+1)-th smallest |y_d|, and over every
    coordinate for the others. Working memory: a few [pos, src_pos * head] tensors, the signed
    sources [2 * d_model, src_pos * head], and chunks of about `budget` scalars (at least one
    target row's).
    """
    n_pos, d_model = whole.shape
    n_heads = pattern.shape[0]
    flat_sources = sources.reshape(-1, d_model)  # [src_pos * head, d], row j * n_heads + h
    weights = pattern.permute(1, 2, 0).reshape(n_pos, -1)  # [pos, src_pos * head]
    negative = whole < 0
    sign = 1.0 - 2.0 * negative.to(whole.dtype)
    magnitude = whole.abs()

    linear = weights * (sign @ flat_sources.T)
    bound = weights * flat_sources.abs().amax(-1)
    smallest, order = magnitude.sort(-1)
    correction = torch.zeros_like(linear)

    sizes = [2**m for m in range(3, d_model.bit_length()) if 2**m < d_model]
    unsafe = torch.stack(
        [(smallest[:, size, None] < bound).sum(1) for size in sizes]
        + [torch.zeros(n_pos, dtype=torch.long, device=whole.device)]
    ).cpu()  # [sizes + 1, pos]
    sizes.append(d_model)
    signed_columns = torch.cat([flat_sources.T, -flat_sources.T])  # row d: w[:, d]; row d_model + d: -w[:, d]
    limit = torch.full((n_pos, 1), torch.inf, dtype=whole.dtype, device=whole.device)
    attended = (weights > 0).cumsum(1).argmax(1).cpu() + 1  # per row: parts up to the last one with attention
    for start in range(0, n_pos, block):
        stop = min(start + block, n_pos)
        n_parts = int(attended[start:stop].max())
        work = n_parts * (stop - start) * torch.tensor(sizes) + d_model * unsafe[:, start:stop].sum(1)
        size = sizes[int(work.argmin())]
        if size < d_model:
            limit[start:stop, 0] = smallest[start:stop, size]
        step = max(1, budget // (size * n_parts))
        for first in range(start, stop, step):
            last = min(first + step, stop)
            coords = order[first:last, :size]
            signed = signed_columns[
                coords + d_model * negative[first:last].gather(1, coords), :n_parts
            ]  # [rows, size, parts]
            excess = torch.addcmul(-smallest[first:last, :size, None], weights[first:last, None, :n_parts], signed)
            correction[first:last, :n_parts] = excess.clamp_(min=0).sum(1)

    # The parts left, over every coordinate: relu(a s_d w_d - r_d) = -min(s_d (y_d - a w_d), 0), in chunks
    # small enough to stay in cache (few gathered rows each; a real model's massive activations leave
    # thousands of such parts per layer, as its attention sinks read large values).
    rows, cols = (limit < bound).nonzero().T
    step = max(1, min(budget, 2**16) // d_model)
    for start in range(0, len(rows), step):
        r, c = rows[start : start + step], cols[start : start + step]
        gap = torch.addcmul(whole[r], weights[r, c, None], flat_sources[c], value=-1).mul_(sign[r])
        correction[r, c] = gap.clamp_(max=0).sum(-1).neg_()
    return (linear - 2 * correction).clamp_(min=0).reshape(n_pos, -1, n_heads)
