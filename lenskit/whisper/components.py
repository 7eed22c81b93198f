"""The parts of a Whisper block, each with TransformerLens hook points.

Parameters use TransformerLens' names and shapes (``W_Q`` [head, d_model, d_head], ``W_O``
[head, d_head, d_model], ``W_in`` [d_model, d_mlp], ...) and activations its layouts: residual
hooks [batch, pos, d_model], per-head hooks [batch, pos, head, d_head], attention scores and
pattern [batch, head, query_pos, key_pos].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from lenskit.errors import InputError


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens' ``hook_scale`` [batch, pos, 1] and ``hook_normalized`` [batch, pos, d_model].

    When a hook listens on ``hook_scale`` the scale is computed explicitly, as TransformerLens
    does, so the hook can read or replace it; otherwise the fused kernel computes the same
    normalisation (equal up to float rounding), and ``hook_normalized`` still fires.
    """

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if _listened(self.hook_scale):
            x = x - x.mean(-1, keepdim=True)
            normalized = x / self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        elif _listened(self.hook_normalized):
            normalized = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        else:
            return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)
        return self.hook_normalized(normalized) * self.w + self.b


def _listened(hook: HookPoint) -> bool:
    """Whether any forward or backward hook is attached to `hook`."""
    return bool(hook._forward_hooks or hook._backward_hooks)


@dataclass
class LayerCache:
    """Keys and values of one decoder block, kept between decoding steps (after their hooks).

    Self-attention keys and values fill preallocated buffers [batch, head, capacity, d_head]
    up to ``length``; cross-attention keys and values [batch, head, audio_pos, d_head] are
    computed from the audio once and reused.
    """

    capacity: int
    length: int = 0
    self_k: Tensor | None = None
    self_v: Tensor | None = None
    cross_k: Tensor | None = None
    cross_v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's keys and values [batch, head, new_pos, d_head]; return all of them so far."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise InputError(f"the key/value cache holds {self.capacity} positions; {end} were needed")
        if self.self_k is None:
            self.self_k = k.new_empty(*k.shape[:2], self.capacity, k.shape[3])
            self.self_v = v.new_empty(*v.shape[:2], self.capacity, v.shape[3])
        self.self_k[:, :, self.length : end] = k
        self.self_v[:, :, self.length : end] = v
        self.length = end
        return self.self_k[:, :, :end], self.self_v[:, :, :end]


@dataclass
class KeyValueCache:
    """Per-layer key/value caches of the decoder, for incremental (greedy) decoding."""

    layers: list[LayerCache] = field(default_factory=list)

    @classmethod
    def empty(cls, n_layers: int, capacity: int) -> "KeyValueCache":
        return cls([LayerCache(capacity) for _ in range(n_layers)])

    @property
    def length(self) -> int:
        """Number of token positions already cached."""
        return self.layers[0].length if self.layers else 0


class Attention(nn.Module):
    """Multi-head attention (self- or cross-); the key projection has no bias, as in Whisper.

    Computed heads first ([batch, head, pos, d_head]); hooks see TransformerLens' layouts.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = False):
        super().__init__()
        d_head = d_model // n_heads
        self.n_heads, self.d_head, self.causal = n_heads, d_head, causal
        self.W_Q = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.b_Q = nn.Parameter(torch.zeros(n_heads, d_head))
        self.W_K = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_V = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.b_V = nn.Parameter(torch.zeros(n_heads, d_head))
        self.W_O = nn.Parameter(torch.empty(n_heads, d_head, d_model))
        self.b_O = nn.Parameter(torch.zeros(d_model))
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, key_pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, key_pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        source: Float[Tensor, "batch key_pos d_model"] | None = None,
        cache: LayerCache | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attend from `x` to itself (source None) or to `source` (cross-attention).

        With a `cache`, self-attention appends this step's keys and values to it, and
        cross-attention computes the keys and values of `source` once and reuses them (their
        hooks fire only when they are computed).
        """
        q = _hooked(self.hook_q, self._project(x, self.W_Q, self.b_Q))
        k, v = self._keys_values(x, source, cache)
        scores = (q @ k.transpose(-1, -2)) / self.d_head**0.5
        if self.causal and q.shape[2] > 1:
            future = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=x.device)
            scores = scores.masked_fill(future.triu(k.shape[2] - q.shape[2] + 1), float("-inf"))
        pattern = self.hook_pattern(self.hook_attn_scores(scores).softmax(dim=-1))
        z = self.hook_z((pattern @ v).transpose(1, 2))  # [batch, pos, head, d_head]
        return F.linear(z.reshape(*z.shape[:2], -1), self.W_O.reshape(-1, self.W_O.shape[-1]).T, self.b_O)

    @staticmethod
    def _project(x: Float[Tensor, "batch pos d_model"], W: Tensor, b: Tensor | None) -> Tensor:
        """x @ W (+ b) per head, for W [head, d_model, d_head]: [batch, head, pos, d_head]."""
        out = x.unsqueeze(1) @ W
        return out if b is None else out + b[:, None, :]

    def _keys_values(self, x: Tensor, source: Tensor | None, cache: LayerCache | None) -> tuple[Tensor, Tensor]:
        """Keys and values [batch, head, key_pos, d_head], from the cache where it has them."""
        if source is not None:  # cross-attention
            if cache is not None and cache.cross_k is not None:
                return cache.cross_k, cache.cross_v
            k = _hooked(self.hook_k, self._project(source, self.W_K, None)).contiguous()
            v = _hooked(self.hook_v, self._project(source, self.W_V, self.b_V)).contiguous()
            if cache is not None:
                cache.cross_k, cache.cross_v = k, v
            return k, v
        k = _hooked(self.hook_k, self._project(x, self.W_K, None))
        v = _hooked(self.hook_v, self._project(x, self.W_V, self.b_V))
        return (k, v) if cache is None else cache.append(k, v)


def _hooked(
    hook: HookPoint, heads_first: Float[Tensor, "batch head pos d_head"]
) -> Float[Tensor, "batch head pos d_head"]:
    """Run `hook` on a heads-first activation in TransformerLens' [batch, pos, head, d_head] layout."""
    return hook(heads_first.transpose(1, 2)).transpose(1, 2)


class MLP(nn.Module):
    """Two-layer GELU MLP with ``hook_pre`` and ``hook_post`` [batch, pos, d_mlp]."""

    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(d_model, d_mlp))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_out = nn.Parameter(torch.empty(d_mlp, d_model))
        self.b_out = nn.Parameter(torch.zeros(d_model))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(F.linear(x, self.W_in.T, self.b_in))
        return F.linear(self.hook_post(F.gelu(pre)), self.W_out.T, self.b_out)


class EncoderBlock(nn.Module):
    """Pre-norm block: bidirectional self-attention, then MLP."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1, self.attn = LayerNorm(d_model), Attention(d_model, n_heads)
        self.ln2, self.mlp = LayerNorm(d_model), MLP(d_model, 4 * d_model)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())  # [batch, pos, d_model]

    def forward(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(self.ln1(resid))))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid))))


class DecoderBlock(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention to the audio, then MLP.

    Layer norms follow TransformerLens' T5 decoder: ``ln1`` before self-attention, ``ln2``
    before cross-attention, ``ln3`` before the MLP.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1, self.attn = LayerNorm(d_model), Attention(d_model, n_heads, causal=True)
        self.ln2, self.cross_attn = LayerNorm(d_model), Attention(d_model, n_heads)
        self.ln3, self.mlp = LayerNorm(d_model), MLP(d_model, 4 * d_model)
        for name in (
            "resid_pre",
            "attn_out",
            "resid_mid",
            "cross_attn_out",
            "resid_mid_cross",
            "mlp_out",
            "resid_post",
        ):
            setattr(self, f"hook_{name}", HookPoint())  # [batch, pos, d_model]

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        audio: Float[Tensor, "batch audio_pos d_model"],
        cache: LayerCache | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(self.ln1(resid), cache=cache)))
        cross = self.cross_attn(self.ln2(resid), source=audio, cache=cache)
        resid = self.hook_resid_mid_cross(resid + self.hook_cross_attn_out(cross))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln3(resid))))
