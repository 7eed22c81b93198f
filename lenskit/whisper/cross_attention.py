"""Where the decoder listens: one cross-attention head's pattern, tokens x audio time.

>>> pattern = cross_attention(model, "speech.wav", transcript.sequence, layer=2, head=3,
...                           tokenizer=tok, frames_per_bin=25)     # 0.5 s per column
>>> pattern.plot()                                                  # offline HTML heatmap
"""

from __future__ import annotations

import torch

from lenskit import hooks
from lenskit.errors import InputError
from lenskit.labelled import LabelledTensor
from lenskit.sites import act_name
from lenskit.whisper.audio import HOP_LENGTH, SAMPLE_RATE, AudioLike, model_input
from lenskit.whisper.model import HookedWhisper
from lenskit.whisper.tokenizer import TokensLike, str_tokens, token_batch


@torch.no_grad()
def cross_attention(
    model: HookedWhisper,
    audio: AudioLike,
    tokens: TokensLike,
    layer: int,
    head: int,
    tokenizer=None,
    frames_per_bin: int = 1,
) -> LabelledTensor:
    """The cross-attention pattern of decoder `layer`, `head`: dims ("token", "time").

    Each row is a decoder position's attention over the audio positions (20 ms each: conv2
    has stride 2), summed over bins of `frames_per_bin` positions; time labels give each bin's start in
    seconds. Rows sum to 1.
    """
    if not 0 <= layer < model.cfg.n_text_layer:
        raise InputError(f"layer {layer} out of range: the decoder has {model.cfg.n_text_layer} layers")
    if not 0 <= head < model.cfg.n_text_head:
        raise InputError(f"head {head} out of range: decoder layers have {model.cfg.n_text_head} heads")
    if frames_per_bin < 1:
        raise InputError(f"frames_per_bin must be at least 1, not {frames_per_bin}")
    mel, ids = (
        model_input(audio, model.cfg.n_mels, n_frames=model.cfg.n_frames).to(model.device),
        token_batch(tokens).to(model.device),
    )
    name = act_name("pattern", layer, "decoder", "cross_attn")
    cache = hooks.cache(name)
    cache.run(model, mel, ids)
    pattern = cache.store[name][0, head].cpu()  # [token, audio_pos]
    n_bins = -(-pattern.shape[1] // frames_per_bin)
    binned = torch.nn.functional.pad(pattern, (0, n_bins * frames_per_bin - pattern.shape[1]))
    binned = binned.view(pattern.shape[0], n_bins, frames_per_bin).sum(-1)
    seconds_per_position = 2 * HOP_LENGTH / SAMPLE_RATE  # conv2 has stride 2: 20 ms per audio position
    times = [f"{b * frames_per_bin * seconds_per_position:.2f}s" for b in range(n_bins)]
    return LabelledTensor(binned, ("token", "time"), {"token": str_tokens(ids, tokenizer), "time": times})
