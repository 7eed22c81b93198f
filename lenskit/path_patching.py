"""Path patching (Wang et al. 2022, the IOI paper): a sender's effect along direct paths only.

    result = lenskit.path_patch(model, clean, corrupted, metrics.logit_diff(" Mary", " John"),
                                senders="heads", receivers="logits")          # [layer, head]
    result = lenskit.path_patch(model, clean, corrupted, metric,
                                receivers=[(9, 9, "q"), (9, 6, "q"), (10, 0, "q")])  # into name movers' queries
    result.normalised().plot()

The base run is the corrupted run; a sender's output comes from the clean run, as in
`lenskit.patch`. A sender's output is what it adds to the residual stream at every position:
``z[h] @ W_O[h]`` for a head (its bias share cancels), ``hook_mlp_out`` for an MLP. Each sender is
patched on its own; the receivers take it together:

- ``receivers="logits"``: the final residual stream is the corrupted one with the sender's output
  swapped for its clean value (corrupted + clean output - corrupted output); the final norm is
  recomputed on it (it belongs to the receiver), then the unembedding and the metric. Nothing else
  changes, so no block runs again.
- ``receivers=[(layer, head, "q" | "k" | "v"), ...]``: each receiver head's input residual
  stream is the corrupted ``blocks.{layer}.hook_resid_pre`` with the sender's output swapped; its q
  (or k, v) is recomputed from it through the block's own ``ln1`` and the head's weights and
  written into the corrupted run at ``blocks.{layer}.attn.hook_q`` (``hook_k``, ``hook_v``), which then
  runs on normally from the first receiver's layer. Only senders in earlier layers than a receiver
  reach it; a sender that reaches no receiver gets NaN. Under grouped-query attention, the head of a
  k or v receiver is a key/value head (shared by its group of query heads), as at the k and v
  sites of `lenskit.patch`.

Exact, and batched: the clean and corrupted runs are made once; senders run in chunks, each chunk
one batched forward from the first receiver's layer (none for the logits). The IOI paper's
two-run-per-sender recipe (patch the sender, freeze every other component, record the receivers;
then run again with the receivers patched) gives the same numbers: tests/reference/path_patching.py
holds it, the tests compare against it, and benchmarks/bench_path_patching.py times both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from lenskit import backend, hooks, sites
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.metrics import MetricLike, MetricReader, bind, scalar
from lenskit.patching import PatchResult
from lenskit.resume import MEMORY_BUDGET, run_blocks
from lenskit.run import as_run
from lenskit.tokens import Prompts, as_tokens

Receiver = tuple[int, int, str]
RECEIVER_KINDS = ("q", "k", "v")


def path_patch(
    model: Model,
    clean: Prompts,
    corrupted: Prompts,
    metric: MetricLike,
    senders: str | Sequence[tuple[int, int] | int] = "heads",
    receivers: str | Sequence[Receiver] = "logits",
    max_senders: int | None = None,
    progress: bool = True,
) -> PatchResult:
    """The metric of the corrupted run with one sender's clean output reaching only the receivers.

    Args:
        clean, corrupted: token ids [batch, pos] (or strings) of the same shape.
        metric: a `lenskit.metrics` spec or a callable on logits returning a scalar.
        senders: "heads" (every layer and head), "mlps" (every layer), or a list of (layer, head)
            pairs for heads and ints for MLPs.
        receivers: "logits", or a list of (layer, head, "q" | "k" | "v").
        max_senders: senders per batched forward (default: as many as fit `MEMORY_BUDGET`).

    Returns:
        PatchResult [layer, head] for "heads", [layer] for "mlps", [sender] for a list (labels "L3H1",
        "MLP2"); NaN where a sender reaches no receiver.
    """
    clean_run = as_run(model, clean)
    clean_tokens, corrupted_tokens = clean_run.tokens, as_tokens(model, corrupted, "corrupted")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise InputError(
            f"path_patch: clean and corrupted tokens must have the same shape [batch, pos]; got "
            f"{tuple(clean_tokens.shape)} and {tuple(corrupted_tokens.shape)}"
        )
    sender_list, dims, labels = _senders(model, senders)
    receiver_list = _receivers(model, receivers)
    if max_senders is not None and max_senders < 1:
        raise InputError(f"path_patch: max_senders must be at least 1, not {max_senders}")
    names = sorted({_output_hook(sender) for sender in sender_list})
    resid_names = (
        [sites.final_residual(model)]
        if receiver_list is None
        else [sites.act_name("resid_pre", layer) for layer in sorted({r[0] for r in receiver_list})]
    )
    clean_store = clean_run.require([*names, sites.final_residual(model)])
    clean_logits = clean_run.logits
    with torch.inference_mode():
        corrupted_cache = hooks.cache([*names, *resid_names])
        corrupted_logits = corrupted_cache.run(model, corrupted_tokens)
        metric = bind(metric, model, clean_tokens, clean_logits)
        clean_value, corrupted_value = scalar(metric, clean_logits), scalar(metric, corrupted_logits)
        reader = MetricReader(model, metric, corrupted_logits)
        values = torch.full((len(sender_list),), float("nan"), dtype=torch.float32)
        reaching = [
            i for i, s in enumerate(sender_list) if receiver_list is None or any(r[0] > s[0] for r in receiver_list)
        ]
        size = max_senders or _senders_per_batch(model, corrupted_tokens, reader, receiver_list)
        chunks = [reaching[i : i + size] for i in range(0, len(reaching), size)]
        for chunk in tqdm(
            chunks, desc=f"path patch to {'logits' if receiver_list is None else 'receivers'}", disable=not progress
        ):
            deltas = torch.stack(
                [
                    _output(model, clean_store, s) - _output(model, corrupted_cache.store, s)
                    for s in (sender_list[i] for i in chunk)
                ]
            )  # [senders, batch, pos, d_model]
            if receiver_list is None:
                final = corrupted_cache.store[resid_names[0]] + deltas
            else:
                final = _run_from_receivers(
                    model,
                    corrupted_cache.store,
                    deltas,
                    [sender_list[i] for i in chunk],
                    receiver_list,
                    corrupted_tokens,
                )
            values[chunk] = reader.values(final, 0).float().cpu()
    return PatchResult(values.reshape([len(l) for l in labels.values()]), dims, labels, clean_value, corrupted_value)


def _run_from_receivers(
    model,
    corrupted: dict[str, Tensor],
    deltas: Float[Tensor, "senders batch pos d_model"],
    senders: list[tuple[int, int | None]],
    receivers: list[Receiver],
    tokens: Tensor,
) -> Tensor:
    """Final residual streams [senders, batch, pos, d_model] of the corrupted run with each receiver's
    q/k/v recomputed from the corrupted input plus its sender's delta (where the sender is earlier)."""
    n_senders, batch = deltas.shape[:2]
    first = min(layer for layer, _, _ in receivers)
    writes = []
    for layer, head, kind in receivers:
        reaches = torch.tensor([sender[0] < layer for sender in senders]).view(n_senders, 1, 1, 1)
        resid = corrupted[sites.act_name("resid_pre", layer)] + deltas  # [senders, batch, pos, d_model]
        weight, bias = _projection(model.blocks[layer].attn, kind, head)
        recomputed = model.blocks[layer].ln1(resid.flatten(0, 1)) @ weight + bias  # [senders * batch, pos, d_head]
        writes.append((sites.act_name(kind, layer), _write_head(head, recomputed, reaches, batch)))
    start = corrupted[sites.act_name("resid_pre", first)].repeat(n_senders, 1, 1)
    _, _, _, attention_mask = model.input_to_embed(tokens)
    with hooks.Hooks(writes).on(model):
        final = run_blocks(model, {first: start}, lambda layer, rows: None, attention_mask)
    return final.view(n_senders, batch, *final.shape[1:])


def _write_head(head: int, recomputed: Tensor, reaches: Tensor, batch: int):
    """A hook setting head `head` of q/k/v [senders * batch, pos, heads, d_head] to `recomputed` for the
    senders that reach it (`reaches` [senders, 1, 1, 1]); the others keep the corrupted value."""

    def write(activation: Tensor, hook) -> Tensor:
        activation = activation.clone()
        current = activation[:, :, head].view(reaches.shape[0], batch, *activation.shape[1:2], -1)
        new = recomputed.view_as(current)
        activation[:, :, head] = torch.where(reaches.to(new.device), new, current).flatten(0, 1)
        return activation

    return write


def _projection(attn, kind: str, head: int) -> tuple[Tensor, Tensor]:
    """The weight [d_model, d_head] and bias [d_head] of one head's q, k or v, as the hook sees them
    (k and v per key/value head when the model is grouped)."""
    letter = kind.upper()
    grouped = hasattr(attn, f"_W_{letter}") and not backend.flag(attn.cfg, "ungroup_grouped_query_attention")
    prefix = "_" if grouped else ""
    weights = getattr(attn, f"{prefix}W_{letter}")  # [head, d_model, d_head]
    return weights[head], backend.bias(attn, f"{prefix}b_{letter}", weights.shape[::2])[head]


def _output(model, store: dict[str, Tensor], sender: tuple[int, int | None]) -> Float[Tensor, "batch pos d_model"]:
    """What a sender adds to the residual stream (without the attention bias, which cancels)."""
    layer, head = sender
    if head is None:
        return store[sites.act_name("mlp_out", layer)]
    return store[sites.act_name("z", layer)][:, :, head] @ model.blocks[layer].attn.W_O[head]


def _output_hook(sender: tuple[int, int | None]) -> str:
    layer, head = sender
    return sites.act_name("mlp_out" if head is None else "z", layer)


def _senders(model, senders) -> tuple[list[tuple[int, int | None]], tuple[str, ...], dict[str, list]]:
    """Senders as (layer, head or None for the MLP), with the result's dims and labels."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if senders == "heads":
        return (
            [(layer, head) for layer in range(n_layers) for head in range(n_heads)],
            ("layer", "head"),
            {"layer": list(range(n_layers)), "head": list(range(n_heads))},
        )
    if senders == "mlps":
        if model.cfg.attn_only:
            raise InputError("path_patch: senders='mlps' but this model has no MLPs (attn_only)")
        return [(layer, None) for layer in range(n_layers)], ("layer",), {"layer": list(range(n_layers))}
    if isinstance(senders, str) or not isinstance(senders, Sequence) or not senders:
        raise InputError(
            f"path_patch: senders must be 'heads', 'mlps' or a non-empty list of (layer, head) "
            f"pairs and MLP layer ints; got {senders!r}"
        )
    parsed = []
    for sender in senders:
        if isinstance(sender, int) and not isinstance(sender, bool):
            layer, head = sender, None
        elif (
            isinstance(sender, Sequence)
            and len(sender) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in sender)
        ):
            layer, head = sender
        else:
            raise InputError(f"path_patch: sender {sender!r} is neither (layer, head) nor an MLP layer int")
        _check_index("sender layer", layer, n_layers)
        if head is not None:
            _check_index("sender head", head, n_heads)
        parsed.append((layer, head))
    labels = [f"MLP{layer}" if head is None else f"L{layer}H{head}" for layer, head in parsed]
    return parsed, ("sender",), {"sender": labels}


def _receivers(model, receivers) -> list[Receiver] | None:
    """None for the logits, else checked (layer, head, kind) triples."""
    if isinstance(receivers, str):
        if receivers != "logits":
            raise InputError(
                f"path_patch: receivers must be 'logits' or a list of (layer, head, 'q'|'k'|'v'); got {receivers!r}"
            )
        return None
    if not isinstance(receivers, Sequence) or not receivers:
        raise InputError(
            f"path_patch: receivers must be 'logits' or a non-empty list of (layer, head, kind); got {receivers!r}"
        )
    if (
        backend.architecture(model.cfg) in POST_NORM_ARCHITECTURES
        or model.cfg.use_split_qkv_input
        or model.cfg.use_attn_in
        or model.cfg.positional_embedding_type == "shortformer"
    ):
        raise InputError(
            "path_patch: q/k/v receivers need a pre-norm model without split q/k/v inputs or shortformer positions"
        )
    checked = []
    for receiver in receivers:
        if not (isinstance(receiver, Sequence) and len(receiver) == 3 and receiver[2] in RECEIVER_KINDS):
            raise InputError(f"path_patch: receiver {receiver!r} is not (layer, head, 'q'|'k'|'v')")
        layer, head, kind = receiver
        _check_index("receiver layer", layer, model.cfg.n_layers)
        _check_index(
            f"receiver {kind} head", head, sites.n_key_value_heads(model) if kind != "q" else model.cfg.n_heads
        )
        if layer == 0:
            raise InputError(f"path_patch: receiver {tuple(receiver)} is in layer 0: no sender comes before it")
        checked.append((layer, head, kind))
    return checked


def _check_index(what: str, index, size: int) -> None:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < size:
        raise InputError(f"path_patch: {what} {index!r} is out of range: 0..{size - 1}")


def _senders_per_batch(model, tokens: Tensor, reader: MetricReader, receivers) -> int:
    """Senders per chunk so that one chunk's activations stay near `MEMORY_BUDGET`."""
    batch, n_pos = tokens.shape
    per_sender = (
        batch
        * n_pos
        * (model.cfg.d_model * (2 if receivers is None else 6 * model.cfg.n_layers // 4 + 1) + reader.width())
        * 4
    )
    return max(1, MEMORY_BUDGET // per_sender)
