"""The hook vocabulary: factories that return `Hooks`, lists of TransformerLens hook pairs.

Every factory returns a `Hooks` value: an ordered list of ``(name_or_filter, fn)`` pairs with
``fn(activation, hook) -> activation | None``, exactly what TransformerLens takes::

    h = hooks.ablate("blocks.1.attn.hook_z", head=3) + hooks.cache("blocks.*.hook_resid_post")
    logits = model.run_with_hooks(tokens, fwd_hooks=h)   # plain TransformerLens
    with h.on(model):                                    # checks names, always cleans up
        model.generate("Once upon", max_new_tokens=5)
    h.store["blocks.0.hook_resid_post"]                  # what `cache` saved

Activation layouts follow TransformerLens: most hooks are [batch, pos, ...]; per-head hooks
(q, k, v, z, result, *_input) are [batch, pos, head, ...]; attention pattern and scores are
[batch, head, query_pos, key_pos] (``pos`` selects the query position there). ``neuron``
selects along the last dimension. Indices are checked against each activation when the hook
runs: an index out of range raises ValueError naming the valid range.

Grouped-query attention (Llama, Mistral, Qwen2, SmolLM2: n_heads query heads sharing
n_key_value_heads key/value heads, ``group = n_heads // n_key_value_heads``). TransformerLens
computes keys and values once per key/value head, so ``hook_k``, ``hook_v``, ``hook_rot_k``
(and ``hook_k_input`` / ``hook_v_input`` with ``use_split_qkv_input``) are
[batch, pos, n_key_value_heads, ...] while q, z, result and the pattern have n_heads. ``head=``
on those k/v hooks therefore names a **key/value head**: head h is the one read by query heads
``h * group .. (h + 1) * group - 1``, and ablating, resampling or patching it changes what all of
them read (`query_heads` lists them). That is the only intervention the grouped activation
holds, and it is what the model computes: one key vector per key/value head. To change the keys or
values of a single query head, ungroup first with TransformerLens' own switch,
``model.set_ungroup_grouped_query_attention(True)`` (the same outputs; k/v hooks then hold one
copy per query head, [batch, pos, n_heads, d_head]), and ``head=`` indexes query heads there
(TransformerLens 3.9's ``generate`` with its key/value cache fails on an ungrouped model: pass
``use_past_kv_cache=False``).
An index outside the key/value heads (head=5 where there are 3) raises ValueError naming the
valid range and the grouping.

Position-specific hooks index the positions of the activation the hook sees. Under
``model.generate`` with its key/value cache, later steps see only the new position, so use
``use_past_kv_cache=False`` when a hook must address absolute prompt positions.
"""

from __future__ import annotations

import difflib
import fnmatch
import numbers
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Literal, Mapping, Sequence, Union

import torch
from torch import Tensor
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from lenskit import backend, checks, sites
from lenskit.errors import InputError
from lenskit.sites import n_key_value_heads  # noqa: F401 (part of the hook vocabulary: hooks.n_key_value_heads)

HookFn = Callable[[Tensor, HookPoint], Union[Tensor, None]]
NameOrFilter = Union[str, Callable[[str], bool]]
Index = Union[int, Sequence[int], None]
Source = Union[Tensor, Mapping[str, Tensor]]


class Hooks(list):
    """An ordered list of ``(name_or_filter, fn)`` pairs, usable as ``fwd_hooks=``.

    ``a + b`` composes (a's hooks run first at a shared hook point). ``store`` holds what a
    `cache` hook saved; ``a + b`` keeps it when exactly one side has one.
    """

    def __init__(self, pairs: Iterable[tuple[NameOrFilter, HookFn]] = (), store: dict | None = None):
        super().__init__(pairs)
        self.store = store

    def __add__(self, other: Iterable[tuple[NameOrFilter, HookFn]]) -> "Hooks":
        stores = [s for s in (self.store, getattr(other, "store", None)) if s is not None]
        return Hooks([*self, *other], store=stores[0] if len(stores) == 1 else None)

    def __repr__(self) -> str:
        return f"Hooks({[_describe(name) for name, _ in self]})"

    def validate(self, model: HookedRootModule) -> None:
        """Raise ValueError if a hook name is unknown to `model` (naming the nearest valid ones)."""
        for name, _ in self:
            check_hook_name(model, name)

    @contextmanager
    def on(self, model: HookedRootModule) -> Iterator[HookedRootModule]:
        """Attach the hooks for the duration of a ``with`` block, removing exactly these after.

        The removal happens even when the forward pass raises; hooks the model had before are
        left alone.
        """
        self.validate(model)
        with model.hooks(fwd_hooks=backend.fwd_hooks(model, self)):
            yield model

    def run(self, model: HookedRootModule, *args, **kwargs):
        """``model(*args, **kwargs)`` with these hooks attached (names checked first)."""
        with self.on(model):
            return model(*args, **kwargs)


class NameFilter:
    """A hook-name filter from a glob pattern ("blocks.*.hook_resid_post") or a list of names."""

    def __init__(self, patterns: Sequence[str]):
        self.patterns = list(patterns)

    def __call__(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns)

    def __repr__(self) -> str:
        return f"NameFilter({self.patterns})"


def check_hook_name(model: HookedRootModule, name: NameOrFilter) -> None:
    """Raise ValueError unless `name` is a hook of `model` (or a filter matching at least one)."""
    valid = list(model.hook_dict)
    if isinstance(name, str):
        if name not in model.hook_dict:
            close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
            hint = f"; did you mean: {', '.join(close)}" if close else f"; hooks look like {valid[:3]}"
            raise InputError(f"unknown hook name {name!r} for this model{hint}")
        return
    if not any(name(n) for n in valid):
        raise InputError(f"hook filter {_describe(name)} matches no hook of this model")


def hook_names(model: HookedRootModule, names: NameOrFilter | Sequence[str]) -> list[str]:
    """The model's hook names selected by an exact name, a glob, a list of these, or a filter; a
    pattern gives one name per HookPoint (a bridge's HookPoint answers to its own name and an alias)."""
    selector = _selector(names)
    for name in selector:
        check_hook_name(model, name)
    return [
        n
        for n, point in model.hook_dict.items()
        if n in selector or (point.name == n and any(_matches(sel, n) for sel in selector))
    ]


# --- factories ------------------------------------------------------------------------------


def cache(
    names: NameOrFilter | Sequence[str],
    store: dict | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Hooks:
    """Save activations (detached) into ``store`` (a new dict if None), keyed by hook name.

    Args:
        names: an exact hook name, a glob such as ``"blocks.*.hook_resid_post"``, a list of
            these, or a callable filter on names.
        device, dtype: move / cast what is saved (e.g. ``"cpu"``, ``torch.float16``).
    """
    store = {} if store is None else store

    def save(activation: Tensor, hook: HookPoint) -> None:
        store[hook.name] = activation.detach().to(device=device, dtype=dtype)

    return Hooks([(sel, save) for sel in _selector(names)], store=store)


def ablate(
    name: NameOrFilter,
    how: Literal["zero", "mean"] = "zero",
    head: Index = None,
    pos: Index = None,
    neuron: Index = None,
    mean_from: Source | None = None,
    mean_over: Literal["batch", "batch_pos"] = "batch_pos",
) -> Hooks:
    """Replace the selected part of an activation by zero or by its mean.

    ``how="mean"`` uses the mean of ``mean_from`` (a tensor shaped like the activation, or a
    cache holding the hook's name) or, when None, of the activation itself; the mean is over
    the batch, and also over positions when ``mean_over="batch_pos"`` (attention patterns
    and scores are only ever averaged over the batch).
    """
    if how not in ("zero", "mean"):
        raise InputError(f"ablate: how must be 'zero' or 'mean', not {how!r}")
    if mean_over not in ("batch", "batch_pos"):
        raise InputError(f"ablate: mean_over must be 'batch' or 'batch_pos', not {mean_over!r}")

    def replacement(activation: Tensor, hook: HookPoint) -> Tensor:
        if how == "zero":
            return torch.zeros_like(activation)
        reference = activation if mean_from is None else _source_for(mean_from, hook, "ablate")
        pos_dim, _ = sites.layout(hook.name)
        dims = (0, pos_dim) if mean_over == "batch_pos" and not sites.is_pair(hook.name) else (0,)
        _check_trailing_shape(reference, activation, dims, hook.name, "ablate mean_from")
        return reference.mean(dim=dims, keepdim=True).to(activation.dtype)

    return _replace(name, replacement, head, pos, neuron)


def resample(name: NameOrFilter, source: Source, head: Index = None, pos: Index = None, seed: int = 0) -> Hooks:
    """Resample ablation: each batch row takes the activation of a random row of `source`.

    `source` is another run's activations (a tensor, or a cache holding the hook's name),
    with any batch size and otherwise the activation's shape. Rows are drawn uniformly with
    replacement from a generator seeded with `seed`, so repeated runs draw the same rows.
    """

    def replacement(activation: Tensor, hook: HookPoint) -> Tensor:
        donor = _source_for(source, hook, "resample")
        _check_trailing_shape(donor, activation, (0,), hook.name, "resample source")
        generator = torch.Generator().manual_seed(checks.integer(seed, "resample: seed"))
        rows = torch.randint(len(donor), (activation.shape[0],), generator=generator)
        return donor[rows.to(donor.device)].to(activation.device, activation.dtype)

    return _replace(name, replacement, head, pos, None)


def patch(name: NameOrFilter, source: Source, head: Index = None, pos: Index = None) -> Hooks:
    """Write another run's activation into the selected part (activation patching).

    `source` is a tensor shaped like the activation (batch 1 broadcasts), or a cache / dict
    from which the hook's own name is read (so one cache can patch many hooks via a glob).
    """
    if isinstance(source, Tensor) and not (isinstance(name, str) and not _is_glob(name)):
        raise InputError("patch: a tensor source needs one exact hook name; pass a cache to patch many")

    def replacement(activation: Tensor, hook: HookPoint) -> Tensor:
        donor = _source_for(source, hook, "patch")
        if donor.shape != activation.shape and not (donor.shape[0] == 1 and donor.shape[1:] == activation.shape[1:]):
            raise InputError(
                f"patch {hook.name}: source shape {tuple(donor.shape)} does not match the "
                f"activation shape {tuple(activation.shape)}"
            )
        return donor.to(activation.device, activation.dtype)

    return _replace(name, replacement, head, pos, None)


def add(name: NameOrFilter, vector: Tensor, pos: Index = None, scale: float = 1.0, head: Index = None) -> Hooks:
    """Activation addition (steering): add ``scale * vector`` at the selected positions.

    `vector` broadcasts against the activation: usually [d_model] for the residual stream,
    [d_head] or [head, d_head] for per-head hooks, or the activation's full shape.
    """
    if not isinstance(vector, Tensor) or not vector.is_floating_point() or not torch.isfinite(vector).all():
        raise InputError(f"add: vector must be a finite floating-point tensor, got {vector!r:.80}")
    checks.number(scale, "add: scale")

    def replacement(activation: Tensor, hook: HookPoint) -> Tensor:
        steer = vector.to(activation.device, activation.dtype)
        try:
            return activation + scale * steer
        except RuntimeError:
            raise InputError(
                f"add {hook.name}: vector of shape {tuple(vector.shape)} does not broadcast "
                f"against the activation shape {tuple(activation.shape)}"
            ) from None

    return _replace(name, replacement, head, pos, None)


def skip(
    model: HookedRootModule,
    layers: int | Sequence[int],
    part: Literal["block", "attn", "cross_attn", "mlp"] = "block",
    stack: str = "blocks",
) -> Hooks:
    """Make blocks (or their attention / cross-attention / MLP) the identity on the residual stream.

    Skipping zeroes the block's output hooks (``hook_attn_out``, ``hook_mlp_out``, and
    ``hook_cross_attn_out`` in a Whisper decoder block), so the residual stream passes through
    unchanged, bit for bit, while hooks inside the skipped block still fire. `stack` names the
    block list ("blocks"; "encoder.blocks" or "decoder.blocks" for Whisper).
    """
    parts = {"block": ("attn", "cross_attn", "mlp"), "attn": ("attn",), "cross_attn": ("cross_attn",), "mlp": ("mlp",)}
    if part not in parts:
        raise InputError(f"skip: part must be one of {sorted(parts)}, not {part!r}")
    n_layers = count_layers(model, stack)
    chosen = [layers] if isinstance(layers, int) else list(layers)
    pairs = []
    for layer in chosen:
        if not -n_layers <= layer < n_layers:
            raise InputError(
                f"skip: layer {layer} out of range: {stack} has {n_layers} layers (valid 0..{n_layers - 1})"
            )
        outputs = [f"{stack}.{layer % n_layers}.hook_{p}_out" for p in parts[part]]
        present = [n for n in outputs if n in model.hook_dict]
        if not present:
            raise InputError(f"skip: {stack}.{layer} has no {part} output hook ({', '.join(outputs)})")
        pairs += [(n, _zero) for n in present]
    return Hooks(pairs)


def query_heads(model: HookedRootModule, kv_head: int) -> list[int]:
    """The query heads that read key/value head `kv_head` (all of ``head=kv_head`` on hook_k / hook_v).

    Under grouped-query attention key/value head h serves query heads ``h * group .. (h + 1) * group - 1``
    with ``group = n_heads // n_key_value_heads`` (TransformerLens' ``repeat_interleave``); without
    grouping, or with ``cfg.ungroup_grouped_query_attention``, each query head has its own: ``[kv_head]``.
    """
    n_kv = n_key_value_heads(model)
    if not -n_kv <= kv_head < n_kv:
        raise InputError(
            f"query_heads: kv_head {kv_head} out of range: the model has {n_kv} key/value heads (valid 0..{n_kv - 1})"
        )
    group = model.cfg.n_heads // n_kv
    return list(range((kv_head % n_kv) * group, (kv_head % n_kv + 1) * group))


def count_layers(model: HookedRootModule, stack: str = "blocks") -> int:
    """Number of blocks in `stack`, read from the model's hook names."""
    prefix = f"{stack}."
    layers = {
        int(n[len(prefix) :].split(".")[0])
        for n in model.hook_dict
        if n.startswith(prefix) and n[len(prefix) :].split(".")[0].isdigit()
    }
    if not layers:
        raise InputError(f"model has no block stack named {stack!r}")
    return max(layers) + 1


# --- helpers ---------------------------------------------------------------------------------


def _zero(activation: Tensor, hook: HookPoint) -> Tensor:
    return torch.zeros_like(activation)


def _replace(
    name: NameOrFilter,
    replacement: Callable[[Tensor, HookPoint], Tensor],
    head: Index,
    pos: Index,
    neuron: Index,
) -> Hooks:
    """A hook writing ``replacement(activation, hook)`` into the selected entries only."""
    for what, index in (("head", head), ("pos", pos), ("neuron", neuron)):
        if index is not None:
            _indices(what, index, _describe(name) if not isinstance(name, (list, tuple)) else str(name))

    def hook_fn(activation: Tensor, hook: HookPoint) -> Tensor:
        mask = selection_mask(activation, hook.name, head=head, pos=pos, neuron=neuron)
        new = replacement(activation, hook)
        return new.expand_as(activation).contiguous() if mask is None else torch.where(mask, new, activation)

    return Hooks([(sel, hook_fn) for sel in _selector(name)])


def selection_mask(
    activation: Tensor, name: str, head: Index = None, pos: Index = None, neuron: Index = None
) -> Tensor | None:
    """A boolean mask broadcastable to `activation` that is True on the selected entries.

    Returns None when nothing is restricted (the whole activation is selected).
    """
    pos_dim, head_dim = sites.layout(name)
    wanted = []
    if head is not None:
        if head_dim is None:
            raise InputError(f"{name} has no head dimension; head= applies to per-head hooks such as attn.hook_z")
        wanted.append(("head", head_dim, head))
    if pos is not None:
        wanted.append(("pos", pos_dim, pos))
    if neuron is not None:
        if sites.is_pair(name):
            raise InputError(f"{name} is an attention pattern; neuron= does not apply to it")
        wanted.append(("neuron", activation.ndim - 1, neuron))
    if not wanted:
        return None
    mask = torch.ones([1] * activation.ndim, dtype=torch.bool, device=activation.device)
    for what, dim, index in wanted:
        size = activation.shape[dim]
        indices = _indices(what, index, name)
        bad = [i for i in indices if not -size <= i < size]
        if bad and what == "head" and sites.is_key_value(name):
            raise InputError(
                f"{name}: head {bad[0]} out of range: keys and values here have {size} key/value "
                f"heads along dim {dim} (valid 0..{size - 1}, or negative from the end); under "
                f"grouped-query attention head= on k/v names a key/value head, shared by a group "
                f"of query heads (lenskit.hooks.query_heads)"
            )
        if bad:
            raise InputError(
                f"{name}: {what} {bad[0]} out of range: the activation has {size} "
                f"{what}s along dim {dim} (valid 0..{size - 1}, or negative from the end)"
            )
        axis = torch.zeros(size, dtype=torch.bool, device=activation.device)
        axis[indices] = True
        shape = [1] * activation.ndim
        shape[dim] = size
        mask = mask & axis.view(shape)
    return mask


def _indices(what: str, index: Index, name: str) -> list[int]:
    """An int or a sequence (list, tuple, tensor) of ints as a list; InputError for anything else
    (a string such as "10" would otherwise select heads 1 and 0; a float or bool a wrong index)."""
    items = index.tolist() if isinstance(index, Tensor) else index
    items = [items] if not isinstance(items, (list, tuple, range)) else list(items)
    bad = [i for i in items if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if bad or not items:
        raise InputError(f"{name}: {what}= must be an int or a non-empty list of ints, got {index!r}")
    return [int(i) for i in items]


def _source_for(source: Source, hook: HookPoint, who: str) -> Tensor:
    if isinstance(source, Tensor):
        return source
    try:
        return source[hook.name]
    except KeyError:
        raise InputError(f"{who}: the source cache has no activation for {hook.name}") from None


def _check_trailing_shape(
    reference: Tensor, activation: Tensor, reduced: tuple[int, ...], name: str, what: str
) -> None:
    """Shapes must agree except along the `reduced` dims."""
    same_rank = reference.ndim == activation.ndim
    if not same_rank or any(
        r != a for d, (r, a) in enumerate(zip(reference.shape, activation.shape)) if d not in reduced
    ):
        raise InputError(
            f"{name}: {what} has shape {tuple(reference.shape)}, which does not fit the "
            f"activation shape {tuple(activation.shape)}"
        )


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def _selector(names: NameOrFilter | Sequence[str]) -> list[NameOrFilter]:
    """Normalise a name spec to a list of exact names and filters."""
    if callable(names):
        return [names]
    if isinstance(names, str):
        return [NameFilter([names])] if _is_glob(names) else [names]
    if not isinstance(names, (Sequence, set, frozenset)):
        raise InputError(f"hook names must be a name, a glob, a list of them or a filter function, got {names!r}")
    selected = list(names)
    if not selected:
        raise InputError("no hook names given")
    return [sel for name in selected for sel in _selector(name)]


def _matches(selector: NameOrFilter, name: str) -> bool:
    return selector == name if isinstance(selector, str) else bool(selector(name))


def _describe(name: NameOrFilter) -> str:
    return name if isinstance(name, str) else repr(name)
