"""The readout: a model's final normalisation and unembedding, written once for every analysis.

    read = Readout(model)
    read(resid)                               # logits [..., vocab] of residual streams [..., d_model]
    read(resid, columns=torch.tensor([5, 9])) # only those vocabulary columns (a logit difference needs two)
    normalized, scale = read.normalize_with_scale(resid)   # ln_final's output and its scale [..., 1]
    direction, constant = read.direction(answer, wrong)    # the stream direction a logit difference reads
    read.contributions(vectors, scale)        # what vectors add to the logits once the scale is frozen

Works for HookedTransformer (LayerNorm, RMSNorm, their folded Pre forms or no final norm; the
output soft-cap of Gemma-2-style models) and for HookedWhisper's decoder (LayerNorm, unembedding
tied to the token embedding, no bias). The unembedding is a plain product with ``W_U`` (columns
picked first when asked): ``model.unembed`` would copy ``W_U`` transposed on every call.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.utilities.activation_functions import apply_softcap

from lenskit import hooks

CENTRED_NORMS = ("LN", "LNPre")
"""TransformerLens normalisation types that subtract the mean (the others only rescale)."""


class Readout:
    """The final norm and unembedding of `model`, read from its modules (nothing is copied)."""

    def __init__(self, model: nn.Module):
        self.model = model
        decoder = getattr(model, "decoder", None)
        if decoder is not None and hasattr(decoder, "ln_final"):  # HookedWhisper
            self.norm, self.centred, self.b_U, self.softcap = decoder.ln_final, True, None, 0.0
        else:
            cfg = model.cfg
            self.norm = getattr(model, "ln_final", None) if cfg.normalization_type is not None else None
            self.centred = cfg.normalization_type in CENTRED_NORMS
            self.b_U, self.softcap = model.b_U, cfg.output_logits_soft_cap
        self.W_U: Float[Tensor, "d_model vocab"] = model.W_U

    @property
    def d_vocab(self) -> int:
        return self.W_U.shape[1]

    def __call__(
        self, resid: Float[Tensor, "... d_model"], columns: Int[Tensor, " column"] | None = None, normalize: bool = True
    ) -> Float[Tensor, "... column"]:
        """Logits of residual streams: the final norm (computing its own scale; skipped when not
        `normalize`), then the unembedding of `columns` (all when None)."""
        return self.logits(self.normalize(resid) if normalize else resid, columns)

    def normalize(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The final norm's output (the stream itself when the model has none)."""
        return resid if self.norm is None else self.norm(resid)

    def normalize_with_scale(self, resid: Float[Tensor, "... d_model"]) -> tuple[Tensor, Tensor]:
        """(the final norm's output [..., d_model], the scale it divided by [..., 1]); scale 1 without a norm."""
        if self.norm is None or not hasattr(self.norm, "hook_scale"):
            return self.normalize(resid), torch.ones_like(resid[..., :1])
        store: dict[str, Tensor] = {}
        name = self.norm.hook_scale.name
        with hooks.cache(name, store).on(self.model):
            normalized = self.norm(resid[:, None] if resid.ndim == 2 else resid)
        scale = store[name]
        if resid.ndim == 2:  # the norm wants [batch, pos, d_model]
            normalized, scale = normalized[:, 0], scale[:, 0]
        return normalized, scale

    def logits(
        self, normalized: Float[Tensor, "... d_model"], columns: Int[Tensor, " column"] | None = None
    ) -> Float[Tensor, "... column"]:
        """The unembedding of already normalised streams: W_U (and b_U) of `columns`, then the soft-cap."""
        W_U, b_U = self.W_U, self.b_U
        if columns is not None:
            columns = columns.to(W_U.device)
            W_U, b_U = W_U[:, columns], None if b_U is None else b_U[columns]
        logits = normalized @ W_U
        if b_U is not None:
            logits = logits + b_U
        return apply_softcap(logits, self.softcap) if self.softcap else logits

    def row_logits(
        self, normalized: Float[Tensor, "batch d_model"], ids: Int[Tensor, " batch"]
    ) -> Float[Tensor, " batch"]:
        """The logit of token ids[b] for each row b of normalised streams (one column per row; no soft-cap,
        so that it equals the sum of `direction`'s linear parts)."""
        logits = (normalized * self.W_U[:, ids].T).sum(-1)
        return logits if self.b_U is None else logits + self.b_U[ids]

    def direction(
        self, answer: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"] | None = None
    ) -> tuple[Float[Tensor, "batch d_model"], Float[Tensor, " batch"]]:
        """The residual direction that logit(answer) - logit(wrong) reads before the final norm's scale,
        and the constant the norm's bias and b_U add: with s the scale, logit = (resid / s) . direction + constant.

        No soft-cap: a capped logit is not linear in the stream.
        """
        direction = self.W_U[:, answer].T  # [batch, d_model]
        constant = torch.zeros(len(answer), device=direction.device, dtype=direction.dtype)
        if self.b_U is not None:
            constant = constant + self.b_U[answer]
        if wrong is not None:
            direction = direction - self.W_U[:, wrong].T
            if self.b_U is not None:
                constant = constant - self.b_U[wrong]
        if getattr(self.norm, "b", None) is not None:
            constant = constant + direction @ self.norm.b
        if getattr(self.norm, "w", None) is not None:
            direction = direction * self.norm.w
        if self.centred:  # (x - mean x) . d = x . (d - mean d)
            direction = direction - direction.mean(-1, keepdim=True)
        return direction, constant

    def contributions(
        self, vectors: Float[Tensor, "... d_model"], scale: Float[Tensor, "... 1"] | None = None, normalize: bool = True
    ) -> Float[Tensor, "... vocab"]:
        """What vectors written into the final stream add to the logits, without b_U.

        With `normalize`: centred (LayerNorm), divided by `scale` (the run's final-norm scale) if
        given, times the norm's weight if any; the plain ``vectors @ W_U`` otherwise.
        """
        if normalize and self.norm is not None:
            if self.centred:
                vectors = vectors - vectors.mean(-1, keepdim=True)
            if scale is not None:
                vectors = vectors / scale
            if getattr(self.norm, "w", None) is not None:
                vectors = vectors * self.norm.w.detach()
        return vectors @ self.W_U.detach()
