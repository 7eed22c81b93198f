"""Shared builders for the Whisper tests: random-weight reference models and synthesised speech.

Reference models (openai-whisper's `Whisper`, Hugging Face's `WhisperForConditionalGeneration`)
get every parameter random, biases and layer norms included, at a scale where attention
patterns are far from uniform; openai-whisper's decoder positional embedding, which it
creates empty, is filled too. Speech is synthesised by espeak-ng at test time (never committed).
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from lenskit.whisper import WhisperConfig

# A smaller config: 128 mel bins (large-v3 style), short audio context, small vocabulary.
SMALL = WhisperConfig(
    n_mels=128,
    n_audio_ctx=24,
    n_audio_state=64,
    n_audio_head=4,
    n_audio_layer=2,
    n_vocab=300,
    n_text_ctx=20,
    n_text_state=64,
    n_text_head=4,
    n_text_layer=3,
)
# Real 30 s audio context and real (multilingual) vocabulary, small widths: for decoding real speech.
SPEECH = WhisperConfig(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=32,
    n_audio_head=4,
    n_audio_layer=2,
    n_vocab=51865,
    n_text_ctx=64,
    n_text_state=32,
    n_text_head=4,
    n_text_layer=3,
)
SPEECH_TEXT = "the quick brown fox jumps over the lazy dog"


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random: layer norms near (1, 0), matrices ~ N(0, 1 / fan_in), vectors ~ N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(param):
        return torch.randn(param.shape, generator=generator)

    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm):
                param.copy_((1.0 if name == "weight" else 0.0) + 0.1 * normal(param))
            elif param.ndim >= 2:
                param.copy_(normal(param) / param[0].numel() ** 0.5)
            else:
                param.copy_(0.1 * normal(param))
    return model.eval()


def openai_whisper(cfg: WhisperConfig, seed: int = 0):
    """openai-whisper's model with these dimensions and random weights (skips without openai-whisper)."""
    whisper_model = pytest.importorskip("whisper.model")
    return randomize_(whisper_model.Whisper(whisper_model.ModelDimensions(**cfg.to_dict())), seed)


def hf_whisper(cfg: WhisperConfig, seed: int = 0):
    """Hugging Face's WhisperForConditionalGeneration (eager attention) with these dimensions, random weights."""
    from transformers import WhisperConfig as HFWhisperConfig
    from transformers import WhisperForConditionalGeneration

    hf_cfg = HFWhisperConfig(
        num_mel_bins=cfg.n_mels,
        max_source_positions=cfg.n_audio_ctx,
        d_model=cfg.n_audio_state,
        encoder_attention_heads=cfg.n_audio_head,
        encoder_layers=cfg.n_audio_layer,
        encoder_ffn_dim=4 * cfg.n_audio_state,
        vocab_size=cfg.n_vocab,
        max_target_positions=cfg.n_text_ctx,
        decoder_attention_heads=cfg.n_text_head,
        decoder_layers=cfg.n_text_layer,
        decoder_ffn_dim=4 * cfg.n_text_state,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        attn_implementation="eager",
    )
    return randomize_(WhisperForConditionalGeneration(hf_cfg), seed)


def synthesise(path: Path, text: str = SPEECH_TEXT, *options: str) -> Path:
    """Speak `text` into a WAV file with espeak-ng (skips the test when espeak-ng is absent)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", *options, "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> Path:
    """A few seconds of synthesised English speech (22.05 kHz mono 16-bit WAV)."""
    return synthesise(tmp_path_factory.mktemp("speech") / "speech.wav")


def test_randomize_touches_every_parameter():
    model = randomize_(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)), seed=1)
    linear, norm = model
    assert not torch.equal(norm.weight, torch.ones(3)) and not torch.equal(norm.bias, torch.zeros(3))
    assert (norm.weight - 1).abs().max() < 0.5 and linear.bias.abs().max() < 0.5
    assert 0.2 < linear.weight.std() * 4**0.5 < 3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while a Whisper test module runs: its models are small enough not to gain
    from more, and on a busy machine idle threads spin and slow everything down; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
