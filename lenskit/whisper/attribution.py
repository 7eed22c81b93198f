"""Direct logit attribution for Whisper's decoder: one logit split into per-head and per-layer parts.

With the final layer norm's scale frozen at its value on this run, the logit of `target` at
`pos` is a sum over what each component wrote into the residual stream::

    logit = sum_c  (c - mean(c)) / scale . (ln_final.w * W_U[:, target])  +  ln_final.b . W_U[:, target]

over c in: the token and positional embeddings, each self-attention and cross-attention head
(``z[pos, h] @ W_O[h]``), each attention output bias, and each MLP output.

    >>> att = decoder_logit_attribution(model, "speech.wav", transcript.sequence, target=" the")
    >>> att.heads            # LabelledTensor [attn (self / cross), layer, head]
    >>> att.to_frame()       # every component, summing to att.logit
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from lenskit import checks, hooks
from lenskit.errors import InputError
from lenskit.labelled import LabelledTensor
from lenskit.readout import Readout
from lenskit.sites import act_name
from lenskit.viz import Figure, Pictured, heatmap
from lenskit.whisper.audio import AudioLike, model_input
from lenskit.whisper.model import HookedWhisper
from lenskit.whisper.tokenizer import TokensLike, get_tokenizer, single_token, token_batch

ATTENTION_KINDS = ("attn", "cross_attn")


@dataclass
class LogitAttribution(Pictured):
    """A decoder logit split into components.

    Attributes:
        components: every component's share, dims ("component",), labelled by name; they sum to `logit`.
        heads: the attention heads' shares, dims ("attn", "layer", "head"), attn = self / cross.
        logit: the model's logit for the target token at the position.
    """

    components: LabelledTensor
    heads: LabelledTensor
    logit: float

    def to_frame(self) -> pd.DataFrame:
        """One row per component: component index, its name, and its share of the logit."""
        return self.components.to_frame()

    def _repr_html_(self) -> str:
        return self.plot().html + self.to_frame().to_html()

    def plot(self, title: str = "per-head direct logit attribution") -> Figure:
        """Heatmap of the heads' shares: a row per (layer, self / cross attention), a column per head."""
        n_kinds, n_layers, n_heads = self.heads.shape
        values = self.heads.tensor.permute(1, 0, 2).reshape(n_layers * n_kinds, n_heads)
        rows = [f"L{layer} {kind}" for layer in range(n_layers) for kind in ATTENTION_KINDS]
        return heatmap(
            values, rows, [f"H{h}" for h in range(n_heads)], title=title, row_title="layer", col_title="head"
        )


@torch.no_grad()
def decoder_logit_attribution(
    model: HookedWhisper, audio: AudioLike, tokens: TokensLike, target: int | str, pos: int = -1
) -> LogitAttribution:
    """Split the decoder's logit for `target` (an id, or text that is one token) at `pos` into components."""
    mel, ids = (
        model_input(audio, model.cfg.n_mels, n_frames=model.cfg.n_frames).to(model.device),
        token_batch(tokens).to(model.device),
    )
    target = single_token(get_tokenizer(model), target) if isinstance(target, str) else checks.integer(target, "target")
    if not 0 <= target < model.cfg.n_vocab:
        raise InputError(f"target token {target} is outside the vocabulary (0..{model.cfg.n_vocab - 1})")
    if not -ids.shape[1] <= checks.integer(pos, "pos") < ids.shape[1]:
        raise InputError(f"pos {pos} out of range for {ids.shape[1]} tokens")
    n_layers = model.cfg.n_text_layer
    cache = hooks.cache(
        [
            "decoder.hook_embed",
            "decoder.hook_pos_embed",
            "decoder.ln_final.hook_scale",
            "decoder.blocks.*.attn.hook_z",
            "decoder.blocks.*.cross_attn.hook_z",
            "decoder.blocks.*.hook_mlp_out",
        ]
    )
    logits = cache.run(model, mel, ids)
    store = cache.store
    direction, constant = Readout(model).direction(torch.tensor([target], device=model.device))  # [1, d_model], [1]
    scale = store["decoder.ln_final.hook_scale"][0, pos]

    def share(writes: Tensor) -> Tensor:
        """Shares of residual writes [..., d_model] through the frozen final layer norm (direction is centred)."""
        return (writes / scale) @ direction[0]

    labels, parts = (
        ["embed", "pos_embed"],
        [share(store["decoder.hook_embed"][0, pos]), share(store["decoder.hook_pos_embed"][0, pos])],
    )
    heads = torch.zeros(len(ATTENTION_KINDS), n_layers, model.cfg.n_text_head, device=model.device)
    for layer, block in enumerate(model.decoder.blocks):
        for kind_index, kind in enumerate(ATTENTION_KINDS):
            attn = getattr(block, kind)
            z = store[act_name("z", layer, "decoder", kind)][0, pos]  # [head, d_head]
            heads[kind_index, layer] = share(torch.einsum("hd,hdm->hm", z, attn.W_O))
            labels += [f"L{layer} {kind} H{h}" for h in range(attn.n_heads)] + [f"L{layer} {kind} bias"]
            parts += [*heads[kind_index, layer], share(attn.b_O)]
        labels.append(f"L{layer} mlp")
        parts.append(share(store[act_name("mlp_out", layer, "decoder")][0, pos]))
    labels.append("ln_final bias")
    parts.append(constant[0])
    components = LabelledTensor(
        torch.stack([torch.as_tensor(p) for p in parts]).cpu(), ("component",), {"component": labels}
    )
    heads_labelled = LabelledTensor(heads.cpu(), ("attn", "layer", "head"), {"attn": list(ATTENTION_KINDS)})
    return LogitAttribution(components, heads_labelled, logits[0, pos, target].item())
