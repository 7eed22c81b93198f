"""Direct logit attribution the TransformerLens way: ActivationCache decompositions through logit_attrs
(apply_ln_to_stack with the run's final scale, dotted with the logit-difference direction). Shares no
code with lenskit.attribution; exact on weight-processed models (fold_ln, center_writing_weights)."""

from __future__ import annotations

import torch
from transformer_lens import ActivationCache

from lenskit.backend import Model


def transformer_lens_neurons(
    model: Model,
    tokens: torch.Tensor,
    answer,
    wrong,
    pos: int = -1,
    cache: ActivationCache | None = None,
    neurons: list[int] | None = None,
) -> dict[str, float]:
    """{"L{layer}N{neuron}": attribution} of every neuron (or of `neurons` in each layer) to
    logit(answer) - logit(wrong) at `pos` of prompt 0: stack_neuron_results, then logit_attrs.

    answer, wrong: token ids or single-token strings. cache: a run_with_cache of `tokens` (made here when None).
    """
    if cache is None:
        _, cache = model.run_with_cache(tokens)
    stack, labels = cache.stack_neuron_results(-1, pos_slice=pos, neuron_slice=neurons, return_labels=True)
    attrs = cache.logit_attrs(stack, tokens=answer, incorrect_tokens=wrong, pos_slice=pos)[:, 0]
    return dict(zip(labels, attrs.tolist()))
