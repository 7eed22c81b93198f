"""Logit lenses for Whisper: what the decoder would say after each decoder layer, or after each encoder layer.

- `decoder_logit_lens`: the decoder's residual stream after each block (and the embedding),
  through ``ln_final`` and the unembedding.
- `encoder_lens`: the encoder's residual stream after each block, through ``ln_post``, fed to
  the full decoder. Cutting the encoder after block l is what `hooks.skip` of the later encoder
  blocks does; computing it from one cached encoder pass gives the same logits.

    >>> lens = decoder_logit_lens(model, "speech.wav", transcript.sequence, tokenizer)
    >>> lens.to_frame()          # layer, pos, token, top token, its probability
    >>> lens.plot()              # top token per (layer, position), shaded by its probability
    >>> lens.save_html("lens.html")
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from lenskit import hooks
from lenskit.labelled import LabelledTensor
from lenskit.readout import Readout
from lenskit.sites import act_name
from lenskit.viz import Figure, Pictured, heatmap
from lenskit.whisper.audio import AudioLike, model_input
from lenskit.whisper.model import HookedWhisper
from lenskit.whisper.tokenizer import TokensLike, str_tokens, token_batch


@dataclass
class WhisperLensResult(Pictured):
    """Logits [layer, pos, d_vocab] read at each layer, for one token sequence.

    Attributes:
        logits: the lens logits, dims ("layer", "pos", "vocab"), labelled by layer and input token.
        tokens: the input token ids [pos].
        tokenizer: openai-whisper's tokenizer, to show tokens as text (ids are shown without one).
    """

    logits: LabelledTensor
    tokens: Tensor
    tokenizer: object | None = None

    def top(self) -> tuple[Tensor, Tensor]:
        """Top token ids and their probabilities, both [layer, pos]."""
        probs, ids = self.logits.tensor.softmax(-1).max(-1)
        return ids, probs

    def _text(self, token_id: int) -> str:
        return str_tokens([token_id], self.tokenizer)[0]

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, position): the input token, the lens' top token and its probability,
        and the probability given to the next input token (NaN at the last position)."""
        ids, probs = self.top()
        log_probs = self.logits.tensor.log_softmax(-1)
        rows = []
        layers, positions = self.logits.labels["layer"], self.logits.labels["pos"]
        for layer, layer_name in enumerate(layers):
            for pos, token in enumerate(positions):
                has_next = pos + 1 < len(self.tokens)
                next_prob = log_probs[layer, pos, self.tokens[pos + 1]].exp().item() if has_next else float("nan")
                rows.append(
                    dict(
                        layer=layer,
                        layer_label=layer_name,
                        pos=pos,
                        token=token,
                        top_token=self._text(int(ids[layer, pos])),
                        top_prob=probs[layer, pos].item(),
                        next_token_prob=next_prob,
                    )
                )
        return pd.DataFrame(rows)

    def plot(self, title: str = "logit lens") -> Figure:
        """Heatmap [layer, pos] of the top token's probability, each cell showing that token."""
        ids, probs = self.top()
        text = [[self._text(int(i)) for i in row] for row in ids]
        return heatmap(
            probs,
            self.logits.labels["layer"],
            self.logits.labels["pos"],
            text=text,
            title=title,
            row_title="layer",
            col_title="input token",
            limit=1.0,
        )

    def __repr__(self) -> str:
        n_layers, n_pos, _ = self.logits.shape
        return f"WhisperLensResult(layers={n_layers}, pos={n_pos})"

    def _repr_html_(self) -> str:
        return f"<p><code>{html.escape(repr(self))}</code></p>" + self.plot().html


@torch.no_grad()
def decoder_logit_lens(model: HookedWhisper, audio: AudioLike, tokens: TokensLike, tokenizer=None) -> WhisperLensResult:
    """The decoder's residual stream before block 0 and after each block, as logits.

    The last row equals the model's logits. `tokens` is one decoder input sequence (e.g.
    ``transcript.sequence``); `tokenizer` (optional) labels tokens with their text.
    """
    mel, ids = (
        model_input(audio, model.cfg.n_mels, n_frames=model.cfg.n_frames).to(model.device),
        token_batch(tokens).to(model.device),
    )
    names = [
        act_name("resid_pre", 0, "decoder"),
        *(act_name("resid_post", layer, "decoder") for layer in range(model.cfg.n_text_layer)),
    ]
    cache = hooks.cache(names)
    cache.run(model, mel, ids)
    resid = torch.stack([cache.store[name][0] for name in names])  # [layer, pos, d_model]
    logits = Readout(model)(resid)
    layers = ["embed"] + [f"block {l}" for l in range(model.cfg.n_text_layer)]
    return _result(logits, layers, ids[0], tokenizer)


@torch.no_grad()
def encoder_lens(
    model: HookedWhisper, audio: AudioLike, tokens: TokensLike, tokenizer=None, progress: bool = True
) -> WhisperLensResult:
    """Decoder logits when the encoder stops after each block (``ln_post`` applied to that block's output).

    Row l equals running the model with encoder blocks l+1.. skipped (``hooks.skip(model, ...,
    stack="encoder.blocks")``); the last row equals the model's logits.
    """
    mel, ids = (
        model_input(audio, model.cfg.n_mels, n_frames=model.cfg.n_frames).to(model.device),
        token_batch(tokens).to(model.device),
    )
    names = [act_name("resid_post", layer, "encoder") for layer in range(model.cfg.n_audio_layer)]
    cache = hooks.cache(names)
    cache.run(model, mel, ids)
    rows = [
        model.decode(ids, model.encoder.ln_post(cache.store[name]))[0]
        for name in tqdm(names, desc="encoder lens", disable=not progress, leave=False)
    ]
    layers = [f"encoder block {l}" for l in range(model.cfg.n_audio_layer)]
    return _result(torch.stack(rows), layers, ids[0], tokenizer)


def _result(logits: Float[Tensor, "layer pos vocab"], layers: list[str], ids: Tensor, tokenizer) -> WhisperLensResult:
    labelled = LabelledTensor(
        logits.cpu(), ("layer", "pos", "vocab"), {"layer": layers, "pos": str_tokens(ids, tokenizer)}
    )
    return WhisperLensResult(labelled, ids.cpu(), tokenizer)
