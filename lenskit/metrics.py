"""Metric specs: functions of a model's logits that say which positions and vocabulary columns they read.

A metric spec is a plain callable on logits, as TransformerLens' patching functions expect::

    metric = metrics.logit_diff(" Mary", " John").bind(model)
    metric(logits)                      # logits [batch, pos, d_vocab] -> scalar tensor

and it also tells lenskit what it reads (``positions``, ``columns``), so that `lenskit.patch` can
unembed only those: a logit difference needs two columns of ``W_U`` at one position, not the whole
vocabulary at every position.

Conventions, shared by every spec:

- ``pos`` selects the positions read: an int (default ``-1``, the last position), a list of ints, or
  None for every position. Values are averaged over the selected positions, then over the batch:
  every metric is the **mean over prompts** of a per-prompt value, like the metrics of
  TransformerLens' IOI demos.
- Answers are strings (``" Mary"``, which must be a single token) or ids; one token for every prompt,
  or a list with one token per prompt.
- Specs holding strings or left-open references must be bound to a model first (``spec.bind(model)``);
  `lenskit.patch` and `lenskit.attribution_patch` bind them for you: `loss` with no targets predicts
  the clean tokens, `kl_to` with no reference compares with the clean run's logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lenskit import checks
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.readout import Readout
from lenskit.tokens import TokenLike, token_ids

Answers = TokenLike | Sequence[TokenLike] | Tensor
"""Answer or target tokens: one token (a string or id) for every prompt, or one per prompt."""
Positions = int | Sequence[int] | None


class Metric:
    """Base of the metric specs: a mean over prompts of `per_prompt` values read from selected logits.

    Subclasses define `per_prompt` on the selected logits [..., batch, n_positions, n_columns], where
    the positions are `positions(n_pos)` and the columns `columns()` (None: the whole vocabulary).
    """

    pos: Positions
    differentiable = True

    def bind(self, model: Model, tokens: Tensor | None = None, logits: Tensor | None = None) -> "Metric":
        """Resolve token strings to ids; fill left-open targets / references from the given run.

        tokens: the run's tokens [batch, pos] (`loss` targets); logits: its logits [batch, pos, d_vocab]
        (`kl_to` reference). Returns a new spec; the original is unchanged.
        """
        return self

    def columns(self) -> Tensor | None:
        """Vocabulary ids read (sorted, unique), or None when the metric needs the whole vocabulary."""
        return None

    def positions(self, n_pos: int) -> list[int]:
        """Absolute positions read, in a sequence of `n_pos` positions."""
        return _positions(self.pos, n_pos)

    def per_prompt(self, selected: Tensor) -> Tensor:
        """Per-prompt values [..., batch] from selected logits [..., batch, n_positions, n_columns]."""
        raise NotImplementedError

    def select(self, logits: Tensor) -> Tensor:
        """The logits this metric reads: [..., batch, pos, d_vocab] -> [..., batch, n_positions, n_columns]."""
        selected = logits[..., self.positions(logits.shape[-2]), :]
        columns = self.columns()
        return selected if columns is None else selected[..., columns.to(logits.device)]

    def __call__(self, logits: Tensor) -> Tensor:
        """The metric on full logits [batch, pos, d_vocab]: a scalar tensor (mean over the batch)."""
        return self.per_prompt(self.select(logits)).mean(-1)


MetricLike = Metric | Callable[[Tensor], Tensor]
"""What the patching functions take as a metric: a spec, or any callable on logits returning a scalar."""


@dataclass(frozen=True)
class LogitDiff(Metric):
    """logit(answer) - logit(wrong), averaged over `pos` and the batch."""

    answer: Answers
    wrong: Answers
    pos: Positions = -1

    def bind(self, model, tokens=None, logits=None):
        return dataclasses.replace(self, answer=token_ids(model, self.answer), wrong=token_ids(model, self.wrong))

    def columns(self) -> Tensor:
        return torch.unique(torch.cat([_ids(self.answer, "logit_diff"), _ids(self.wrong, "logit_diff")]))

    def per_prompt(self, selected: Tensor) -> Tensor:
        columns = self.columns()
        answer = _pick(selected, _column_index(columns, self.answer))
        wrong = _pick(selected, _column_index(columns, self.wrong))
        return (answer - wrong).mean(-1)


@dataclass(frozen=True)
class Prob(Metric):
    """Softmax probability of `token`, averaged over `pos` and the batch."""

    token: Answers
    pos: Positions = -1

    def bind(self, model, tokens=None, logits=None):
        return dataclasses.replace(self, token=token_ids(model, self.token))

    def per_prompt(self, selected: Tensor) -> Tensor:
        return _pick(selected.softmax(-1), _ids(self.token, "prob")).mean(-1)


@dataclass(frozen=True)
class Rank(Metric):
    """Rank of `token` among the vocabulary (0 = the top logit), averaged over `pos` and the batch."""

    token: Answers
    pos: Positions = -1
    differentiable = False

    def bind(self, model, tokens=None, logits=None):
        return dataclasses.replace(self, token=token_ids(model, self.token))

    def per_prompt(self, selected: Tensor) -> Tensor:
        own = _pick(selected, _ids(self.token, "rank"))
        return (selected > own.unsqueeze(-1)).sum(-1).to(selected.dtype).mean(-1)


@dataclass(frozen=True)
class Loss(Metric):
    """Next-token cross-entropy: logits at t predict ``targets[:, t + 1]``; mean over `pos` and the batch.

    targets: token ids [batch, pos]; None is filled by `bind` with the run's tokens (in `lenskit.patch`:
    the clean tokens). pos: prediction positions (default: all but the last).
    """

    targets: Tensor | None = None
    pos: Positions = None

    def bind(self, model, tokens=None, logits=None):
        return self if self.targets is not None else dataclasses.replace(self, targets=tokens)

    def positions(self, n_pos: int) -> list[int]:
        chosen = _positions(self.pos, n_pos - 1) if self.pos is None else _positions(self.pos, n_pos)
        if n_pos - 1 in chosen:
            raise InputError(f"loss: position {n_pos - 1} is the last one and has no next token to predict")
        return chosen

    def per_prompt(self, selected: Tensor) -> Tensor:
        targets = _required(self.targets, "loss", "targets (token ids [batch, pos])")
        positions = self.positions(targets.shape[-1])
        next_tokens = targets[:, [p + 1 for p in positions]].to(selected.device)  # [batch, n_positions]
        _check_batch(next_tokens, selected, "loss targets")
        log_probs = selected.log_softmax(-1)
        picked = log_probs.gather(-1, next_tokens.expand(*selected.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        return -picked.mean(-1)


@dataclass(frozen=True)
class KLTo(Metric):
    """KL(reference || model) of the next-token distributions, averaged over `pos` and the batch.

    reference: logits [batch, pos, d_vocab] of the reference run; None is filled by `bind` with the
    given run's logits (in `lenskit.patch`: the clean run). 0 when the model matches the reference.
    """

    reference: Tensor | None = None
    pos: Positions = -1

    def bind(self, model, tokens=None, logits=None):
        if self.reference is not None:
            return self
        return dataclasses.replace(self, reference=None if logits is None else logits.detach())

    def per_prompt(self, selected: Tensor) -> Tensor:
        reference = _required(self.reference, "kl_to", "reference logits [batch, pos, d_vocab]")
        if not reference.is_floating_point() or reference.ndim != 3:
            raise InputError(
                f"kl_to: the reference must be logits [batch, pos, d_vocab], got a "
                f"{reference.dtype} tensor of shape {tuple(reference.shape)}"
            )
        if reference.shape[-1] != selected.shape[-1] and self.columns() is None:
            raise InputError(
                f"kl_to: the reference logits have {reference.shape[-1]} vocabulary columns, the model's "
                f"{selected.shape[-1]}"
            )
        reference = self.select(reference.to(selected.device)).log_softmax(-1)
        _check_batch(reference[..., 0], selected, "kl_to reference")
        log_probs = selected.log_softmax(-1)
        return (reference.exp() * (reference - log_probs)).sum(-1).mean(-1)


def logit_diff(answer: Answers, wrong: Answers, pos: Positions = -1) -> LogitDiff:
    """logit(answer) - logit(wrong) at `pos`, mean over prompts (reads only those two columns)."""
    return LogitDiff(answer, wrong, pos)


def prob(token: Answers, pos: Positions = -1) -> Prob:
    """Probability of `token` at `pos`, mean over prompts."""
    return Prob(token, pos)


def rank(token: Answers, pos: Positions = -1) -> Rank:
    """Rank of `token` at `pos` (0 = top), mean over prompts. Not differentiable."""
    return Rank(token, pos)


def loss(targets: Tensor | None = None, pos: Positions = None) -> Loss:
    """Next-token cross-entropy against `targets` (default: the clean tokens), mean over positions and prompts."""
    return Loss(targets, pos)


def kl_to(reference: Tensor | None = None, pos: Positions = -1) -> KLTo:
    """KL(reference || model) at `pos`, reference logits defaulting to the clean run's, mean over prompts."""
    return KLTo(reference, pos)


# --- evaluating a metric ----------------------------------------------------------------------


def bind(metric: MetricLike, model: Model, tokens: Tensor, logits: Tensor) -> MetricLike:
    """A spec bound to the run on `tokens` with `logits` (see `Metric.bind`); any other callable as it is."""
    if isinstance(metric, Metric):
        return metric.bind(model, tokens, logits)
    if not callable(metric):
        raise InputError(f"metric must be a lenskit.metrics spec or a callable on logits, got {metric!r}")
    return metric


def scalar_tensor(metric: MetricLike, logits: Tensor) -> Tensor:
    """metric(logits) as a 0-d tensor; ValueError unless the metric returns one number for the batch."""
    value = metric(logits)
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise InputError(f"the metric must return a scalar tensor (one number for the batch), got {shape}")
    return value.reshape(())


def scalar(metric: MetricLike, logits: Tensor) -> float:
    """metric(logits) as a float."""
    return scalar_tensor(metric, logits).item()


class MetricReader:
    """Reads a metric off final residual streams of many runs, unembedding only what the metric needs.

    A `Metric` spec reads its positions and vocabulary columns; any other callable gets full logits.
    Positions before a run's first changed position are taken from the reference (corrupted) run.
    """

    def __init__(self, model: Model, metric: MetricLike, reference_logits: Tensor):
        self.model, self.metric, self.readout = model, metric, Readout(model)
        n_pos = reference_logits.shape[1]
        if isinstance(metric, Metric):
            self.positions = metric.positions(n_pos)
            self.columns = metric.columns()
            self.reference = metric.select(reference_logits)
        else:
            self.positions, self.columns, self.reference = list(range(n_pos)), None, reference_logits

    def width(self) -> int:
        """Floats per prompt of one run's selected logits."""
        return len(self.positions) * (self.readout.d_vocab if self.columns is None else len(self.columns))

    def values(self, final: Tensor, start: int) -> Tensor:
        """Metric values [n_runs] from final residual streams [n_runs, batch, pos - start, d_model]."""
        selected = self.reference.expand(final.shape[0], *self.reference.shape).clone()
        late = [i for i, p in enumerate(self.positions) if p >= start]
        if late:
            resid = final[:, :, [self.positions[i] - start for i in late]]
            selected[:, :, late] = self.readout(resid.flatten(0, 1), self.columns).view(*resid.shape[:-1], -1)
        if isinstance(self.metric, Metric):
            return self.metric.per_prompt(selected).mean(-1)
        return torch.stack([scalar_tensor(self.metric, logits) for logits in selected])


# --- helpers ---------------------------------------------------------------------------------


def _positions(pos: Positions, n_pos: int) -> list[int]:
    if pos is None:
        return list(range(n_pos))
    chosen = checks.integers(pos, "metric position")
    bad = [p for p in chosen if not -n_pos <= p < n_pos]
    if bad:
        raise InputError(
            f"metric position {bad[0]} out of range for {n_pos} positions "
            f"(valid 0..{n_pos - 1}, or negative from the end)"
        )
    return [p % n_pos for p in chosen]


def _ids(tokens: Answers, who: str) -> Tensor:
    """Token ids [n] of an already-bound token spec; strings are refused (bind to a model first)."""
    if isinstance(tokens, Tensor):
        return tokens.reshape(-1).long()
    items = [tokens] if isinstance(tokens, (str, int)) else list(tokens)
    if any(not isinstance(t, int) for t in items):
        raise InputError(f"{who}: tokens {tokens!r} must be bound to a model first: metric.bind(model)")
    return torch.tensor(items, dtype=torch.long)


def _column_index(columns: Tensor, tokens: Answers) -> Tensor:
    """Positions in `columns` of each token id."""
    return torch.searchsorted(columns, _ids(tokens, "metric"))


def _pick(values: Tensor, ids: Tensor) -> Tensor:
    """values[..., b, p, ids[b]] -> [..., batch, n_positions]; `ids` holds one id or one per prompt."""
    batch = values.shape[-3]
    if len(ids) not in (1, batch):
        raise InputError(f"metric: {len(ids)} tokens given for a batch of {batch} prompts (give 1 or {batch})")
    index = ids.to(values.device).view(-1, 1, 1).expand(*values.shape[:-1], 1)
    return values.gather(-1, index).squeeze(-1)


def _required(value: Tensor | None, who: str, what: str) -> Tensor:
    if value is None:
        raise InputError(
            f"{who}: no {what} given; pass them, or bind the metric to a run "
            f"(lenskit.patch does this with the clean run)"
        )
    return value


def _check_batch(per_prompt: Tensor, selected: Tensor, what: str) -> None:
    if per_prompt.shape[0] != selected.shape[-3]:
        raise InputError(f"metric: {what} cover {per_prompt.shape[0]} prompts, the logits {selected.shape[-3]}")
