"""`HookedWhisper`: OpenAI's Whisper as a TransformerLens `HookedRootModule`.

Hook names follow TransformerLens, under an ``encoder.`` or ``decoder.`` prefix::

    encoder.hook_conv1, encoder.hook_conv2          GELU outputs of the stem  [batch, frame, d_model]
    encoder.hook_pos_embed                          sinusoidal positions      [batch, audio_pos, d_model]
    encoder.blocks.{l}.hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out
    encoder.blocks.{l}.attn.hook_q/k/v/attn_scores/pattern/z, mlp.hook_pre/post, ln1/ln2.hook_scale/normalized
    encoder.ln_post.hook_scale/hook_normalized
    decoder.hook_embed, decoder.hook_pos_embed                                [batch, pos, d_model]
    decoder.blocks.{l}.hook_resid_pre/mid/mid_cross/post, hook_attn_out, hook_cross_attn_out, hook_mlp_out
    decoder.blocks.{l}.attn.*  (causal self-attention)   decoder.blocks.{l}.cross_attn.*  (to the audio)
    decoder.blocks.{l}.ln1/ln2/ln3.*, decoder.ln_final.*

The unembedding is tied to the token embedding: logits = ln_final(resid) @ W_E.T.

    >>> model = HookedWhisper(WhisperConfig.tiny())                # random weights
    >>> logits, cache = model.run_with_cache(mel, tokens)          # mel [batch, n_mels, 3000]
    >>> cache["decoder.blocks.0.cross_attn.hook_pattern"].shape    # [batch, head, pos, 1500]
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from lenskit.errors import InputError
from lenskit.whisper.components import DecoderBlock, EncoderBlock, KeyValueCache, LayerNorm


@dataclass(frozen=True)
class WhisperConfig:
    """Whisper's dimensions, with the field names of openai-whisper's `ModelDimensions`."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    def __post_init__(self) -> None:
        """Raise InputError naming the first field no Whisper can have: its value and the valid range."""
        for name, value in asdict(self).items():
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise InputError(f"WhisperConfig: {name}={value!r} is not valid; valid: a whole number of at least 1")
        if self.n_audio_state != self.n_text_state:
            raise InputError(
                f"the decoder cross-attends to the encoder's states: n_audio_state ({self.n_audio_state}) "
                f"must equal n_text_state ({self.n_text_state})"
            )
        if self.n_audio_state % 2 or self.n_audio_state < 4:
            raise InputError(
                f"WhisperConfig: n_audio_state={self.n_audio_state} is not valid; valid: an even number of "
                "at least 4 (the encoder's sinusoidal positions pair its channels)"
            )
        for stack, width in (("audio", self.n_audio_state), ("text", self.n_text_state)):
            heads = getattr(self, f"n_{stack}_head")
            if width % heads:
                raise InputError(
                    f"WhisperConfig: n_{stack}_head={heads} is not valid; valid: a divisor of n_{stack}_state={width}"
                )

    @classmethod
    def tiny(cls, **overrides) -> "WhisperConfig":
        """The dimensions of whisper-tiny (multilingual), optionally changed."""
        dims = dict(
            n_mels=80,
            n_audio_ctx=1500,
            n_audio_state=384,
            n_audio_head=6,
            n_audio_layer=4,
            n_vocab=51865,
            n_text_ctx=448,
            n_text_state=384,
            n_text_head=6,
            n_text_layer=4,
        )
        return cls(**(dims | overrides))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def n_frames(self) -> int:
        """Mel frames the encoder reads (two per audio position: conv2 has stride 2)."""
        return 2 * self.n_audio_ctx


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> Float[Tensor, "length channels"]:
    """Whisper's sinusoidal positional embedding for the encoder."""
    if channels % 2:
        raise InputError(f"sinusoids need an even number of channels, not {channels}")
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class AudioEncoder(nn.Module):
    """Convolutional stem, sinusoidal positions, blocks, and the final ``ln_post``."""

    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        d_model = cfg.n_audio_state
        self.conv1 = nn.Conv1d(cfg.n_mels, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        self.register_buffer("W_pos", sinusoids(cfg.n_audio_ctx, d_model))
        self.hook_conv1 = HookPoint()  # [batch, frame, d_model]
        self.hook_conv2 = HookPoint()  # [batch, audio_pos, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, audio_pos, d_model]
        self.blocks = nn.ModuleList([EncoderBlock(d_model, cfg.n_audio_head) for _ in range(cfg.n_audio_layer)])
        self.ln_post = LayerNorm(d_model)

    def forward(self, mel: Float[Tensor, "batch n_mels frame"]) -> Float[Tensor, "batch audio_pos d_model"]:
        x = self.hook_conv1(F.gelu(self.conv1(mel)).transpose(1, 2))
        x = self.hook_conv2(F.gelu(self.conv2(x.transpose(1, 2))).transpose(1, 2))
        resid = x + self.hook_pos_embed(self.W_pos.expand(x.shape[0], -1, -1))
        for block in self.blocks:
            resid = block(resid)
        return self.ln_post(resid)


class TextDecoder(nn.Module):
    """Token and learned positional embeddings, blocks with cross-attention, ``ln_final``, tied unembedding."""

    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        d_model = cfg.n_text_state
        self.W_E = nn.Parameter(torch.empty(cfg.n_vocab, d_model))
        self.W_pos = nn.Parameter(torch.empty(cfg.n_text_ctx, d_model))
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList([DecoderBlock(d_model, cfg.n_text_head) for _ in range(cfg.n_text_layer)])
        self.ln_final = LayerNorm(d_model)
        self._unembed_source: Tensor | None = None  # W_E (detached) when the copy below was made
        self._unembed_version = -1
        self._unembed_weight: Tensor | None = None  # W_E.T, contiguous

    def unembed(self, normalized: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        """``normalized @ W_E.T``, the tied unembedding.

        Without autograd it multiplies by a contiguous copy of ``W_E.T``, made once and remade
        whenever W_E changes (new data, or an in-place edit): at a decoding step that
        matrix-vector product takes half the time of one against the transposed W_E (greedy
        decoding 1.3x faster on tiny.en), for an extra copy of the embedding in memory. Weights
        made under ``torch.inference_mode`` keep no version counter to notice edits by: they take
        the plain product.
        """
        if torch.is_grad_enabled() or self.W_E.is_inference():
            return F.linear(normalized, self.W_E)
        source = self._unembed_source
        if (
            source is None
            or source.data_ptr() != self.W_E.data_ptr()
            or source.shape != self.W_E.shape
            or source.dtype != self.W_E.dtype
            or source.device != self.W_E.device
            or self._unembed_version != self.W_E._version
        ):
            self._unembed_source = self.W_E.detach()  # keeps that storage alive: its address cannot be reused
            self._unembed_version = self.W_E._version
            self._unembed_weight = self.W_E.detach().T.contiguous()
        return normalized @ self._unembed_weight

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        audio: Float[Tensor, "batch audio_pos d_model"],
        cache: KeyValueCache | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        start = 0 if cache is None else cache.length
        if start + tokens.shape[1] > self.W_pos.shape[0]:
            raise InputError(
                f"{start + tokens.shape[1]} token positions exceed the decoder's context of {self.W_pos.shape[0]}"
            )
        embed = self.hook_embed(self.W_E[tokens])
        positions = self.W_pos[start : start + tokens.shape[1]].expand(tokens.shape[0], -1, -1)
        resid = embed + self.hook_pos_embed(positions)
        for layer, block in enumerate(self.blocks):
            resid = block(resid, audio, None if cache is None else cache.layers[layer])
        return self.unembed(self.ln_final(resid))


class HookedWhisper(HookedRootModule):
    """Whisper (encoder-decoder speech recogniser) with TransformerLens hook points everywhere.

    ``model(mel, tokens)`` returns decoder logits [batch, pos, d_vocab]; ``encode`` and
    ``decode`` run the two halves (decode with an optional `KeyValueCache`). Build with random
    weights from a `WhisperConfig`, or load trained ones with `lenskit.whisper.load`.

    `vocabulary`, when given, is the Whisper token id of each embedding row: the model speaks a
    subset of the multilingual vocabulary (see `SubsetTokenizer`); None means Whisper's own.

    What a checkpoint says about decoding, None when it says nothing (loaders set them; `save` keeps them):
    `suppress_tokens` (never sampled; -1 stands for openai-whisper's non-speech set) and
    `begin_suppress_tokens` (not sampled first) replace openai-whisper's default sets in `transcribe`;
    `alignment_heads` lists the (decoder layer, head) pairs whose cross-attention follows the audio
    in time (a CTranslate2 folder's ``config.json`` gives all three).
    """

    def __init__(self, cfg: WhisperConfig, vocabulary: list[int] | None = None):
        super().__init__()
        if vocabulary is not None and len(vocabulary) != cfg.n_vocab:
            raise InputError(f"the vocabulary lists {len(vocabulary)} Whisper tokens; the model has {cfg.n_vocab} rows")
        self.cfg = cfg
        self.vocabulary = vocabulary
        self.suppress_tokens: list[int] | None = None
        self.begin_suppress_tokens: list[int] | None = None
        self.alignment_heads: list[tuple[int, int]] | None = None
        self.encoder = AudioEncoder(cfg)
        self.decoder = TextDecoder(cfg)
        self.init_weights()
        self.setup()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random weights: normal(0, std) matrices and embeddings, zero biases, unit norm gains."""
        for name, param in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "w":
                param.fill_(1.0)
            elif leaf in ("b", "bias") or leaf.startswith("b_"):
                param.zero_()
            else:
                param.normal_(0.0, std)

    # --- forward passes ------------------------------------------------------------------------
    def forward(
        self, mel: Float[Tensor, "batch n_mels frame"], tokens: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Decoder logits for `tokens` given the log-mel spectrogram `mel` (encoder then decoder)."""
        return self.decode(tokens, self.encode(mel))

    def encode(self, mel: Float[Tensor, "batch n_mels frame"]) -> Float[Tensor, "batch audio_pos d_model"]:
        """Audio features: the encoder output after ``ln_post``."""
        expected = (self.cfg.n_mels, self.cfg.n_frames)
        if mel.ndim != 3 or tuple(mel.shape[1:]) != expected:
            raise InputError(
                f"expected a log-mel spectrogram of shape [batch, {expected[0]}, {expected[1]}], got {tuple(mel.shape)}"
            )
        return self.encoder(mel.to(self.encoder.conv1.weight.dtype))

    def decode(
        self,
        tokens: Int[Tensor, "batch pos"],
        audio: Float[Tensor, "batch audio_pos d_model"],
        cache: KeyValueCache | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Decoder logits for `tokens` attending to encoded `audio`.

        With a `cache`, `tokens` are the new positions only: earlier keys and values come from
        the cache, which this call extends.
        """
        if not isinstance(tokens, Tensor) or tokens.ndim != 2:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise InputError(f"tokens must be integer token ids [batch, pos], got {shape}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise InputError(f"tokens must be integer token ids, got {tokens.dtype}")
        if ((tokens < 0) | (tokens >= self.cfg.n_vocab)).any():
            raise InputError(
                f"token ids must lie in 0..{self.cfg.n_vocab - 1}, got ids from "
                f"{int(tokens.min())} to {int(tokens.max())}"
            )
        return self.decoder(tokens, audio, cache)

    def new_cache(self) -> KeyValueCache:
        """An empty key/value cache for incremental decoding."""
        return KeyValueCache.empty(self.cfg.n_text_layer, self.cfg.n_text_ctx)

    def run_with_cache(self, *args, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs):
        """`HookedRootModule.run_with_cache`, returning a TransformerLens `ActivationCache`."""
        out, cache = super().run_with_cache(*args, remove_batch_dim=remove_batch_dim, **kwargs)
        return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim) if return_cache_object else cache

    # --- weights and facts ---------------------------------------------------------------------
    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding (the transposed token embedding: Whisper ties them)."""
        return self.decoder.W_E.T

    @property
    def is_multilingual(self) -> bool:
        return self.vocabulary is not None or self.cfg.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        """Number of language tokens in the vocabulary (as openai-whisper counts them)."""
        return self.cfg.n_vocab - 51765 - int(self.is_multilingual)

    @property
    def device(self) -> torch.device:
        return self.decoder.W_E.device
