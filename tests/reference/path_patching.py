"""Path patching the IOI paper's way: two full runs per sender, with every other component frozen.

Run 1: the corrupted run with the sender's output set to its clean value and every other head's
z and every MLP's output frozen to the corrupted run's, so the sender's change reaches the later
residual stream directly and nowhere else; the receivers' q/k/v (or the logits) are recorded.
Run 2 (receivers that are heads): the corrupted run with each receiver's q/k/v set to its run-1
value. The metric is read off the last run. Independent of lenskit.path_patching's arithmetic.
"""

from __future__ import annotations

import torch

from lenskit.backend import Model


def caches(model: Model, clean: torch.Tensor, corrupted: torch.Tensor):
    """The clean and corrupted runs' activation caches, made once for every sender."""
    with torch.no_grad():
        return model.run_with_cache(clean)[1], model.run_with_cache(corrupted)[1]


def path_patch_two_runs(
    model: Model,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric,
    sender: tuple[int, int | None],
    receivers="logits",
    runs=None,
) -> float:
    """The metric (a callable on logits -> scalar tensor) for one sender (layer, head or None for the MLP).

    runs: `caches(model, clean, corrupted)`, to share between senders (made here when None).
    """
    clean_cache, corrupted_cache = runs or caches(model, clean, corrupted)
    with torch.no_grad():
        sender_layer, sender_head = sender

        def freeze_z(z, hook):
            frozen = corrupted_cache[hook.name].clone()
            if hook.layer() == sender_layer and sender_head is not None:
                frozen[:, :, sender_head] = clean_cache[hook.name][:, :, sender_head]
            return frozen

        def freeze_mlp(out, hook):
            mine = hook.layer() == sender_layer and sender_head is None
            return (clean_cache if mine else corrupted_cache)[hook.name]

        frozen = [(lambda name: name.endswith("attn.hook_z"), freeze_z)]
        if not model.cfg.attn_only:
            frozen.append((lambda name: name.endswith("hook_mlp_out"), freeze_mlp))
        if receivers == "logits":
            return metric(model.run_with_hooks(corrupted, fwd_hooks=frozen)).item()
        names = {f"blocks.{layer}.attn.hook_{kind}" for layer, _, kind in receivers}
        run_one = _recorded(model, corrupted, frozen, names)

        def set_receivers(activation, hook):
            activation = activation.clone()
            for layer, head, kind in receivers:
                if hook.name == f"blocks.{layer}.attn.hook_{kind}":
                    activation[:, :, head] = run_one[hook.name][:, :, head]
            return activation

        return metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, set_receivers) for name in names])).item()


def _recorded(model, tokens, fwd_hooks, names) -> dict[str, torch.Tensor]:
    """The activations at `names` of a run with `fwd_hooks` attached (recorded after them)."""
    store = {}

    def keep(activation, hook):
        store[hook.name] = activation.clone()

    model.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, *((name, keep) for name in names)])
    return store
