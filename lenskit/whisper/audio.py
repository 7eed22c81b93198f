"""Whisper's audio front end: WAV files, resampling to 16 kHz, 30-second windows, log-mel spectrograms.

The log-mel spectrogram equals openai-whisper's ``log_mel_spectrogram`` (same STFT, the same
Slaney mel filters, computed here rather than read from its ``mel_filters.npz``), so this
module does not need openai-whisper.

    >>> samples = load_audio("speech.wav")          # mono float32 at 16 kHz (any WAV rate, mono or stereo)
    >>> mel = log_mel(samples)                      # [80, 3000]: padded to 30 s
    >>> mel = model_input("speech.wav", n_mels=128) # [1, 128, 3000]: what HookedWhisper takes

Bad audio raises ValueError: an empty signal, NaN or infinite samples, a sample rate other
than 16 kHz when ``resample=False``, and more than 30 s unless ``trim=True`` (which keeps the
first 30 s; split longer recordings yourself).
"""

from __future__ import annotations

import math
import struct
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in a 30-second window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames

AudioLike = Union[str, Path, np.ndarray, Tensor]

_WAVE_PCM, _WAVE_FLOAT, _WAVE_EXTENSIBLE = 1, 3, 0xFFFE


def read_wav(path: str | Path) -> tuple[Float[Tensor, "channel sample"], int]:
    """The samples of a WAV file in [-1, 1] (integer PCM of 8-32 bits, or float) and its sample rate."""
    data = Path(path).read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path} is not a WAV file (no RIFF/WAVE header); convert it first, "
                         "e.g. ffmpeg -i input.mp3 output.wav")
    chunks, offset = {}, 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset:offset + 4], struct.unpack("<I", data[offset + 4:offset + 8])[0]
        chunks.setdefault(chunk_id, data[offset + 8:offset + 8 + size])
        offset += 8 + size + size % 2
    if b"fmt " not in chunks or b"data" not in chunks:
        raise ValueError(f"{path}: WAV file without a 'fmt ' or 'data' chunk")
    fmt = chunks[b"fmt "]
    encoding, channels, sample_rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if encoding == _WAVE_EXTENSIBLE:
        encoding = struct.unpack("<H", fmt[24:26])[0]
    raw = chunks[b"data"]
    raw = raw[:len(raw) - len(raw) % (channels * bits // 8)]
    if encoding == _WAVE_FLOAT and bits in (32, 64):
        samples = np.frombuffer(raw, dtype=f"<f{bits // 8}").astype(np.float32)
    elif encoding == _WAVE_PCM and bits == 8:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128) / 128
    elif encoding == _WAVE_PCM and bits in (16, 32):
        samples = np.frombuffer(raw, dtype=f"<i{bits // 8}").astype(np.float32) / 2 ** (bits - 1)
    elif encoding == _WAVE_PCM and bits == 24:
        triples = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        samples = (np.where(ints >= 2 ** 23, ints - 2 ** 24, ints)).astype(np.float32) / 2 ** 23
    else:
        raise ValueError(f"{path}: unsupported WAV encoding (format {encoding}, {bits} bits); "
                         "use integer PCM or float samples")
    return torch.from_numpy(samples.reshape(-1, channels).T.copy()), sample_rate


def load_audio(path: str | Path, resample: bool = True) -> Float[Tensor, "sample"]:
    """A WAV file as mono samples at 16 kHz: channels are averaged, other rates resampled.

    With ``resample=False`` a file whose rate is not 16 kHz raises ValueError.
    """
    samples, rate = read_wav(path)
    if rate != SAMPLE_RATE and not resample:
        raise ValueError(f"{path} is sampled at {rate} Hz; Whisper needs {SAMPLE_RATE} Hz "
                         "(pass resample=True to convert it)")
    return resample_audio(samples.mean(0), rate, SAMPLE_RATE)


def resample_audio(samples: Float[Tensor, "sample"], orig_rate: int, new_rate: int = SAMPLE_RATE,
                   zero_crossings: int = 6, rolloff: float = 0.99) -> Float[Tensor, "new_sample"]:
    """Band-limited resampling by a Hann-windowed sinc filter (torchaudio's default method).

    The filter keeps frequencies below ``rolloff`` times the lower Nyquist frequency; the
    output has ``ceil(len * new_rate / orig_rate)`` samples.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} and {new_rate}")
    if orig_rate == new_rate:
        return samples
    gcd = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // gcd, int(new_rate) // gcd
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zero_crossings * orig / cutoff)
    # kernel[phase, tap]: the filter for output phase `phase` over input taps -width .. width + orig
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, :] / orig
    t = (taps - torch.arange(new, dtype=torch.float64)[:, None] / new) * cutoff
    t = t.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    kernel = torch.special.sinc(t) * window * cutoff / orig
    padded = F.pad(samples.double()[None, None], (width, width + orig))
    out = F.conv1d(padded, kernel[:, None, :], stride=orig)[0].T.reshape(-1)
    return out[: math.ceil(new * len(samples) / orig)].to(samples.dtype)


def check_samples(samples: Tensor, sample_rate: int = SAMPLE_RATE, trim: bool = False,
                  max_seconds: float = CHUNK_SECONDS) -> None:
    """Raise ValueError for audio Whisper cannot read: not 1-D, empty, NaN or infinite, or longer than
    the model's window of `max_seconds` (30 s for OpenAI's models) unless `trim`."""
    if samples.ndim != 1:
        raise ValueError(f"expected mono samples [n], got shape {tuple(samples.shape)}; "
                         "average the channels first (e.g. samples.mean(0))")
    if samples.numel() == 0:
        raise ValueError("audio is empty (0 samples)")
    bad = (~torch.isfinite(samples)).nonzero()
    if len(bad):
        raise ValueError(f"audio has {len(bad)} NaN or infinite samples (the first at sample {int(bad[0])})")
    seconds = len(samples) / sample_rate
    if seconds > max_seconds and not trim:
        raise ValueError(f"audio is {seconds:.1f} s long; this model reads {max_seconds:g} s windows: pass "
                         f"trim=True to keep the first {max_seconds:g} s, or split the recording")


def pad_or_trim(samples: Float[Tensor, "sample"], length: int = N_SAMPLES) -> Float[Tensor, "length"]:
    """Zero-pad or cut `samples` to exactly `length` (30 s at 16 kHz by default)."""
    return F.pad(samples[:length], (0, max(0, length - len(samples))))


@lru_cache(maxsize=None)
def mel_filters(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> Float[Tensor, "n_mels freq"]:
    """Slaney-style mel filterbank (librosa's ``filters.mel`` defaults), [n_mels, n_fft // 2 + 1]."""
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2)
    hz_points = _mel_to_hz(mel_points)
    ramps = hz_points[:, None] - fft_freqs[None, :]
    widths = np.diff(hz_points)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(rising, falling))
    weights *= (2.0 / (hz_points[2:] - hz_points[:-2]))[:, None]  # equal area per filter
    return torch.from_numpy(weights.astype(np.float32))


def log_mel_spectrogram(samples: Float[Tensor, "sample"], n_mels: int = 80) -> Float[Tensor, "n_mels frame"]:
    """Whisper's log-mel spectrogram of 16 kHz samples: [n_mels, len // 160].

    log10 of the mel power, floored at 8 below its maximum (i.e. 80 dB), then scaled by
    (x + 4) / 4, exactly as openai-whisper computes it.
    """
    samples = torch.as_tensor(samples, dtype=torch.float32)
    window = torch.hann_window(N_FFT, device=samples.device)
    stft = torch.stft(samples, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    log_spec = (mel_filters(n_mels).to(samples.device) @ power).clamp(min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def log_mel(audio: AudioLike, n_mels: int = 80, sample_rate: int = SAMPLE_RATE, resample: bool = True,
            trim: bool = False, n_frames: int = N_FRAMES) -> Float[Tensor, "n_mels n_frames"]:
    """The log-mel spectrogram of one window, from a WAV path or mono samples.

    Samples at another `sample_rate` are resampled (or rejected when ``resample=False``);
    the signal is checked (see `check_samples`), then zero-padded to the window of `n_frames`
    mel frames (3000 = 30 s, OpenAI's models; the zoo's speech model reads shorter windows).
    """
    if isinstance(audio, (str, Path)):
        samples = load_audio(audio, resample=resample)
    else:
        samples = torch.as_tensor(audio, dtype=torch.float32)
        if sample_rate != SAMPLE_RATE:
            if not resample:
                raise ValueError(f"audio is sampled at {sample_rate} Hz; Whisper needs {SAMPLE_RATE} Hz "
                                 "(pass resample=True to convert it)")
            check_samples(samples, sample_rate, trim=True)
            samples = resample_audio(samples, sample_rate, SAMPLE_RATE)
    check_samples(samples, trim=trim, max_seconds=n_frames * HOP_LENGTH / SAMPLE_RATE)
    return log_mel_spectrogram(pad_or_trim(samples, n_frames * HOP_LENGTH), n_mels)


def model_input(audio: AudioLike, n_mels: int = 80, trim: bool = False,
                n_frames: int = N_FRAMES) -> Float[Tensor, "batch n_mels n_frames"]:
    """What HookedWhisper reads: a log-mel spectrogram with a batch dimension.

    `audio` is a WAV path, 16 kHz mono samples [n], or a log-mel spectrogram already computed
    ([n_mels, frame] or [batch, n_mels, frame]), which is passed through. `n_frames` is the
    model's window (``model.cfg.n_frames``).
    """
    if isinstance(audio, (np.ndarray, Tensor)) and audio.ndim in (2, 3) and audio.shape[-2] == n_mels:
        mel = torch.as_tensor(audio, dtype=torch.float32)
        return mel if mel.ndim == 3 else mel[None]
    return log_mel(audio, n_mels, trim=trim, n_frames=n_frames)[None]


def _hz_to_mel(hz):
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, linear)


def _mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * (200.0 / 3)
    log_part = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log_part, linear)
