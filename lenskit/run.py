"""A shared run: the tokens of a batch of prompts and the activations computed on them so far.

Every analysis accepts a `Run` in place of tokens and takes what it needs from it; what the run
lacks is computed by one more forward pass that caches just that, and kept. So one run serves the
logit lens, attribution, the flow graph and the attention pictures of a prompt::

    run = lenskit.Run(model, "When Mary and John went to the store, John gave a drink to")
    run.require(["blocks.0.attn.hook_pattern", "blocks.1.hook_resid_post"])   # one pass, both cached
    run["blocks.0.attn.hook_pattern"]        # [batch, head, query_pos, key_pos]
    run.logits                               # [batch, pos, d_vocab] (from the cached final stream)
    lenskit.logit_lens(model, run); lenskit.attribute(model, run, " Mary", " John"); lenskit.flow(model, run)

`Run.everything(model, tokens)` caches every hook in one pass (as ``run_with_cache`` does), for
when several analyses will follow. TransformerLens' `ActivationCache` is the model: views over one run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit import hooks, sites, viz
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.readout import Readout
from lenskit.tokens import Prompts, as_tokens, str_tokens

BEFORE_BLOCKS = ("hook_embed", "hook_pos_embed", "hook_tokens", "embed.", "pos_embed.")
"""Hooks that fire before block 0: a pass that needs only these (and block hooks) can stop early."""


class Run:
    """Tokens [batch, pos] of a model's run and the activations cached from it, by hook name.

    Args:
        model: the model the run belongs to.
        tokens: anything `lenskit.tokens.as_tokens` takes (a text, a list of texts, ids).
        activations: activations of a run on exactly these tokens already at hand (a dict by hook
            name, or a TransformerLens ActivationCache).
        extend: whether missing activations may be computed; False makes `require` raise instead
            (a cache the caller vouches for).
    """

    def __init__(
        self,
        model: Model,
        tokens: Prompts,
        activations: Mapping[str, Tensor] | None = None,
        extend: bool = True,
    ):
        self.model = model
        self.tokens: Int[Tensor, "batch pos"] = as_tokens(model, tokens)
        self.activations: dict[str, Tensor] = dict(getattr(activations, "cache_dict", activations) or {})
        self.extend = extend
        self._logits: Tensor | None = None
        embed = self.activations.get("hook_embed")
        if embed is not None and tuple(embed.shape[:2]) != tuple(self.tokens.shape):
            raise InputError(
                f"cache holds a run on {tuple(embed.shape[:2])} tokens, not on tokens {tuple(self.tokens.shape)}"
            )

    @classmethod
    def everything(cls, model: Model, tokens: Prompts) -> "Run":
        """A run that caches every hook of the model and keeps the logits, in one forward pass."""
        run = cls(model, tokens)
        store: dict[str, Tensor] = {}
        with torch.no_grad(), hooks.cache(lambda name: True, store).on(model):
            run._logits = model(run.tokens)
        run.activations.update(store)
        return run

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)

    def __contains__(self, name: str) -> bool:
        return name in self.activations

    def __getitem__(self, name: str) -> Tensor:
        return self.require([name])[name]

    def require(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The activations `names`, after one forward pass caching those not yet here (if any).

        The pass stops after the last block the missing names sit in, so neither later blocks nor
        the unembedding run for them.
        """
        names = list(dict.fromkeys(names))
        missing = [name for name in names if name not in self.activations]
        if missing and not self.extend:
            raise InputError(f"cache lacks {len(missing)} activations this analysis reads, e.g. {missing[:3]}")
        if missing:
            for name in missing:
                hooks.check_hook_name(self.model, name)
            store: dict[str, Tensor] = {}
            with torch.no_grad(), hooks.cache(missing, store).on(self.model):
                self.model(self.tokens, stop_at_layer=_blocks_needed(missing))
            self.activations.update(store)
        return self.activations

    @property
    def logits(self) -> Float[Tensor, "batch pos vocab"]:
        """The model's logits: kept from `everything`, else read from the final residual stream."""
        if self._logits is None:
            final = self[sites.final_residual(self.model)]
            with torch.no_grad():
                self._logits = Readout(self.model)(final)
        return self._logits

    def attention_patterns(self, layer: int, batch: int = 0, title: str | None = None) -> viz.Figure:
        """Every head's attention pattern in block `layer` for prompt `batch`, read from the run
        (``blocks.{layer}.attn.hook_pattern``, computed if missing) and drawn by `lenskit.viz.attention_patterns`."""
        n_layers, (n_batch, n_pos) = self.model.cfg.n_layers, self.shape
        if not -n_layers <= layer < n_layers:
            raise InputError(f"layer {layer} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        if not -n_batch <= batch < n_batch:
            raise InputError(f"batch {batch} out of range: the tokens have {n_batch} batch rows (0..{n_batch - 1})")
        layer %= n_layers
        name = sites.act_name("pattern", layer)
        if name not in self and not self.extend:
            raise InputError(
                f"the cache holds no {name!r}; cache it (model.run_with_cache) or build the Run with extend=True"
            )
        pattern = self[name]
        expected = (n_batch, sites.n_heads_at(self.model, name), n_pos, n_pos)
        if tuple(pattern.shape) != expected:
            raise InputError(
                f"{name} in this run has shape {tuple(pattern.shape)}, but these tokens need {expected} "
                "[batch, head, query_pos, key_pos]"
            )
        return viz.attention_patterns(
            pattern[batch],
            self.str_tokens(batch),
            [f"L{layer}H{head}" for head in range(expected[1])],
            title=f"attention patterns, layer {layer}" if title is None else title,
        )

    def str_tokens(self, row: int = 0) -> list[str]:
        """The string of each token of prompt `row` (the ids themselves without a tokenizer)."""
        return list(str_tokens(self.model, self.tokens[row]))

    def __repr__(self) -> str:
        return f"Run(batch={self.shape[0]}, pos={self.shape[1]}, cached={len(self.activations)} activations)"


def as_run(model: Model, tokens: "Prompts | Run") -> Run:
    """`tokens` itself when it is a run of `model`; otherwise a new run on them (nothing computed yet)."""
    if isinstance(tokens, Run):
        if tokens.model is not model:
            raise InputError("this run belongs to another model: pass a run of the model being analysed")
        return tokens
    return Run(model, tokens)


def _blocks_needed(names: list[str]) -> int | None:
    """How many blocks must run for every hook in `names` to fire; None for the whole model, unembedding too."""
    needed = 0
    for name in names:
        layer = sites.layer_of(name)
        if layer is not None and name.startswith("blocks."):
            needed = max(needed, layer + 1)
        elif not name.startswith(BEFORE_BLOCKS):
            return None
    return needed
