"""Whisper's audio front end: WAV files, resampling to 16 kHz, 30-second windows, log-mel spectrograms.

The log-mel spectrogram equals openai-whisper's ``log_mel_spectrogram`` (same STFT, the same
Slaney mel filters, computed here rather than read from its ``mel_filters.npz``), so this
module does not need openai-whisper.

    >>> samples = load_audio("speech.wav")          # mono float32 at 16 kHz (any WAV rate, mono or stereo)
    >>> mel = log_mel(samples)                      # [80, 3000]: padded to 30 s
    >>> mel = model_input("speech.wav", n_mels=128) # [1, 128, 3000]: what HookedWhisper takes

Samples are floats in [-1, 1] (any float dtype), or integer PCM (uint8, int8, int16, int32), scaled
to [-1, 1] as in a WAV file. Bad audio raises lenskit's errors, naming the file or argument, the
value and what is valid: `MissingFileError` for a path that does not exist; `InputError` for a file
that is not a WAV file or whose header cannot be (0 channels, a short 'fmt ' chunk, 0 Hz ...), an
empty signal, NaN or infinite samples or spectrogram values, complex, boolean or 64-bit integer
samples, a sample rate other than 16 kHz when ``resample=False`` (or one lenskit cannot resample),
more than 30 s unless ``trim=True`` (which keeps the first 30 s; split longer recordings yourself),
and a spectrogram whose mel bins or frames are not the model's.
"""

from __future__ import annotations

import math
import numbers
import os
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lenskit.errors import InputError, MissingFileError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples in a 30-second window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames
RATES = (1000, 768000)  # the sample rates (Hz) lenskit reads and resamples
MAX_RESAMPLING_TAPS = 20_000_000  # the largest resampling filter (phases x taps) lenskit builds
MAX_CHANNELS = 8  # a 2-D array with more rows and columns than this is a spectrogram, not channels of samples

AudioLike = Union[str, Path, np.ndarray, Tensor]

_WAVE_PCM, _WAVE_FLOAT, _WAVE_EXTENSIBLE = 1, 3, 0xFFFE
_WAV_TYPES = {
    (_WAVE_PCM, 8): np.uint8,
    (_WAVE_PCM, 16): np.dtype("<i2"),
    (_WAVE_PCM, 24): np.uint8,
    (_WAVE_PCM, 32): np.dtype("<i4"),
    (_WAVE_FLOAT, 32): np.dtype("<f4"),
    (_WAVE_FLOAT, 64): np.dtype("<f8"),
}
_PCM_BITS = {torch.uint8: 8, torch.int8: 8, torch.int16: 16, torch.int32: 32}  # integer samples: PCM of these bits


def read_wav(path: str | Path) -> tuple[Float[Tensor, "channel sample"], int]:
    """The samples of a WAV file in [-1, 1] (integer PCM of 8-32 bits, or float) and its sample rate."""
    path = Path(path)
    if not path.is_file():
        raise (
            MissingFileError(f"no audio file {path}")
            if not path.exists()
            else InputError(f"{path} is a folder, not a WAV file")
        )
    data = path.read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InputError(
            f"{path} is not a WAV file (no RIFF/WAVE header); convert it first, e.g. ffmpeg -i input.mp3 output.wav"
        )
    chunks, offset = {}, 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        chunks.setdefault(chunk_id, data[offset + 8 : offset + 8 + size])
        offset += 8 + size + size % 2
    if b"fmt " not in chunks or b"data" not in chunks:
        raise InputError(f"{path}: WAV file without a 'fmt ' or 'data' chunk")
    fmt = chunks[b"fmt "]
    if len(fmt) < 16:
        raise InputError(f"{path}: its WAV 'fmt ' chunk has {len(fmt)} bytes; a format chunk has at least 16")
    encoding, channels, sample_rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if encoding == _WAVE_EXTENSIBLE:
        if len(fmt) < 26:
            raise InputError(
                f"{path}: its extensible WAV 'fmt ' chunk has {len(fmt)} bytes; it needs at least 26 (the sub-format)"
            )
        encoding = struct.unpack_from("<H", fmt, 24)[0]
    if channels == 0 or sample_rate == 0:
        raise InputError(
            f"{path}: the WAV header gives {channels} channels at {sample_rate} Hz; a WAV file has at "
            "least 1 channel and a sample rate above 0 Hz"
        )
    dtype = _WAV_TYPES.get((encoding, bits))
    if dtype is None:
        raise InputError(
            f"{path}: unsupported WAV encoding (format {encoding}, {bits} bits); "
            "use integer PCM of 8, 16, 24 or 32 bits or float samples of 32 or 64 bits"
        )
    raw = chunks[b"data"]
    raw = raw[: len(raw) - len(raw) % (channels * bits // 8)]
    if bits == 24:  # three little-endian bytes a sample, signed
        triples = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        samples = _pcm_to_float(np.where(ints >= 2**23, ints - 2**24, ints), 24)
    elif encoding == _WAVE_PCM:
        samples = _pcm_to_float(np.frombuffer(raw, dtype=dtype), bits)
    else:
        with np.errstate(over="ignore"):  # float64 samples beyond float32 become inf, which check_samples refuses
            samples = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    return torch.from_numpy(samples.reshape(-1, channels).T.copy()), sample_rate


def _pcm_to_float(ints: np.ndarray, bits: int) -> np.ndarray:
    """Integer PCM samples of `bits` bits as float32 in [-1, 1) (8-bit unsigned PCM is centred at 128)."""
    offset = 128 if ints.dtype == np.uint8 else 0
    return (ints.astype(np.float32) - offset) / 2 ** (bits - 1)


def as_samples(audio: Any) -> Float[Tensor, "..."]:
    """`audio` (a tensor, array or list of samples) as float32: floats as they are, integer PCM
    (uint8, int8, int16, int32) scaled to [-1, 1]. InputError for anything else."""
    tensor = _as_tensor(audio, "audio")
    if tensor.is_floating_point():
        return tensor.float()
    if tensor.dtype not in _PCM_BITS:
        raise InputError(
            f"audio: samples of dtype {tensor.dtype} are not audio; give floats in [-1, 1] or integer "
            f"PCM of dtype {', '.join(str(d).removeprefix('torch.') for d in _PCM_BITS)}"
        )
    return torch.from_numpy(_pcm_to_float(tensor.cpu().numpy(), _PCM_BITS[tensor.dtype])).to(tensor.device)


def _as_tensor(value: Any, what: str) -> Tensor:
    """`value` as a real-valued tensor (complex, boolean and non-numeric values refused with InputError)."""
    if not isinstance(value, Tensor):
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as error:  # ragged lists and the like
            raise InputError(
                f"{what}: expected samples or a spectrogram (a tensor or array of numbers), got "
                f"{type(value).__name__} ({error})"
            ) from None
        if array.dtype.kind not in "biufc":
            raise InputError(
                f"{what}: expected a WAV path, samples or a spectrogram (a tensor or array of numbers), "
                f"got {type(value).__name__}{f' of dtype {array.dtype}' if array.dtype.kind != 'O' else ''}"
            )
        value = torch.from_numpy(np.require(array, requirements=["C", "W"]))  # a copy only when needed
    if value.is_complex() or value.dtype == torch.bool:
        raise InputError(
            f"{what}: got values of dtype {value.dtype}; audio is real: give float samples in [-1, 1] "
            "(or a float log-mel spectrogram)"
        )
    return value


def load_audio(path: str | Path, resample: bool = True) -> Float[Tensor, " sample"]:
    """A WAV file as mono samples at 16 kHz: channels are averaged, other rates resampled.

    With ``resample=False`` a file whose rate is not 16 kHz raises InputError.
    """
    samples, rate = read_wav(path)
    check_rate(rate, f"{path}: sample rate")
    if rate != SAMPLE_RATE and not resample:
        raise InputError(
            f"{path} is sampled at {rate} Hz; Whisper needs {SAMPLE_RATE} Hz (pass resample=True to convert it)"
        )
    return resample_audio(samples.mean(0), rate, SAMPLE_RATE)


def check_rate(rate: Any, what: str = "sample_rate") -> int:
    """`rate` as an int, after checking it is a whole number of Hz in `RATES`; InputError otherwise."""
    if not (
        isinstance(rate, numbers.Real)
        and not isinstance(rate, bool)
        and math.isfinite(rate)
        and rate == int(rate)
        and RATES[0] <= rate <= RATES[1]
    ):
        raise InputError(f"{what} is {rate!r} Hz; valid: a whole number of Hz from {RATES[0]} to {RATES[1]}")
    return int(rate)


def resample_audio(
    samples: Float[Tensor, " sample"],
    orig_rate: int,
    new_rate: int = SAMPLE_RATE,
    zero_crossings: int = 6,
    rolloff: float = 0.99,
) -> Float[Tensor, " new_sample"]:
    """Band-limited resampling by a Hann-windowed sinc filter (torchaudio's default method).

    The filter keeps frequencies below ``rolloff`` times the lower Nyquist frequency; the
    output has ``ceil(len * new_rate / orig_rate)`` samples. Rates whose ratio needs a filter of
    more than `MAX_RESAMPLING_TAPS` (e.g. 11127 Hz to 16 kHz) raise InputError: convert those
    with a dedicated tool first (ffmpeg -ar 16000).
    """
    orig_rate, new_rate = check_rate(orig_rate, "orig_rate"), check_rate(new_rate, "new_rate")
    if samples.ndim != 1:
        raise InputError(f"resample_audio: expected mono samples [n], got shape {tuple(samples.shape)}")
    if orig_rate == new_rate:
        return samples
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zero_crossings * orig / cutoff)
    if new * (2 * width + orig) > MAX_RESAMPLING_TAPS:
        raise InputError(
            f"resampling {orig_rate} Hz to {new_rate} Hz needs a filter of {new} x {2 * width + orig} "
            f"taps (more than {MAX_RESAMPLING_TAPS}); convert the audio to {new_rate} Hz first, "
            f"e.g. ffmpeg -i input.wav -ar {new_rate} output.wav"
        )
    # kernel[phase, tap]: the filter for output phase `phase` over input taps -width .. width + orig
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, :] / orig
    t = (taps - torch.arange(new, dtype=torch.float64)[:, None] / new) * cutoff
    t = t.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    kernel = torch.special.sinc(t) * window * cutoff / orig
    padded = F.pad(samples.double()[None, None], (width, width + orig))
    out = F.conv1d(padded, kernel[:, None, :], stride=orig)[0].T.reshape(-1)
    return out[: math.ceil(new * len(samples) / orig)].to(samples.dtype)


def check_samples(
    samples: Tensor, sample_rate: int = SAMPLE_RATE, trim: bool = False, max_seconds: float = CHUNK_SECONDS
) -> None:
    """Raise InputError for audio Whisper cannot read: not 1-D, empty, NaN or infinite, or longer than
    the model's window of `max_seconds` (30 s for OpenAI's models) unless `trim`."""
    if samples.ndim != 1:
        raise InputError(
            f"expected mono samples [n], got shape {tuple(samples.shape)}; "
            "average the channels first (e.g. samples.mean(0))"
        )
    if samples.numel() == 0:
        raise InputError("audio is empty (0 samples)")
    bad = (~torch.isfinite(samples)).nonzero()
    if len(bad):
        raise InputError(f"audio has {len(bad)} NaN or infinite samples (the first at sample {int(bad[0])})")
    seconds = len(samples) / sample_rate
    if seconds > max_seconds and not trim:
        raise InputError(
            f"audio is {seconds:.1f} s long; this model reads {max_seconds:g} s windows: pass "
            f"trim=True to keep the first {max_seconds:g} s, or split the recording"
        )


def pad_or_trim(samples: Float[Tensor, " sample"], length: int = N_SAMPLES) -> Float[Tensor, " length"]:
    """Zero-pad or cut `samples` to exactly `length` (30 s at 16 kHz by default)."""
    _check_count(length, "length")
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


def log_mel_spectrogram(samples: Float[Tensor, " sample"], n_mels: int = 80) -> Float[Tensor, "n_mels frame"]:
    """Whisper's log-mel spectrogram of 16 kHz samples: [n_mels, len // 160].

    log10 of the mel power, floored at 8 below its maximum (i.e. 80 dB), then scaled by
    (x + 4) / 4, exactly as openai-whisper computes it. Needs more than N_FFT / 2 = 200 finite samples.
    """
    _check_count(n_mels, "n_mels")
    samples = as_samples(samples)
    check_samples(samples, trim=True)
    if len(samples) <= N_FFT // 2:
        raise InputError(
            f"log_mel_spectrogram: {len(samples)} samples are too few for its {N_FFT}-sample window; "
            f"give more than {N_FFT // 2} (pad_or_trim pads them)"
        )
    window = torch.hann_window(N_FFT, device=samples.device)
    stft = torch.stft(samples, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    log_spec = (mel_filters(n_mels).to(samples.device) @ power).clamp(min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    if not torch.isfinite(log_spec).all():  # a power beyond float32: samples far outside [-1, 1]
        raise InputError(
            f"audio samples reach {samples.abs().max().item():.3g}, too loud for a float32 spectrogram; "
            "audio samples lie in [-1, 1]"
        )
    return (log_spec + 4.0) / 4.0


def log_mel(
    audio: AudioLike,
    n_mels: int = 80,
    sample_rate: int = SAMPLE_RATE,
    resample: bool = True,
    trim: bool = False,
    n_frames: int = N_FRAMES,
) -> Float[Tensor, "n_mels n_frames"]:
    """The log-mel spectrogram of one window, from a WAV path or mono samples.

    Samples at another `sample_rate` are resampled (or rejected when ``resample=False``);
    the signal is checked (see `check_samples`), then zero-padded to the window of `n_frames`
    mel frames (3000 = 30 s, OpenAI's models; the zoo's speech model reads shorter windows).
    """
    _check_count(n_mels, "n_mels")
    _check_count(n_frames, "n_frames")
    if isinstance(audio, (str, os.PathLike)):
        samples = load_audio(audio, resample=resample)
    else:
        samples = as_samples(audio)
        if check_rate(sample_rate) != SAMPLE_RATE:
            if not resample:
                raise InputError(
                    f"audio is sampled at {sample_rate} Hz; Whisper needs {SAMPLE_RATE} Hz "
                    "(pass resample=True to convert it)"
                )
            check_samples(samples, sample_rate, trim=True)
            samples = resample_audio(samples, sample_rate, SAMPLE_RATE)
    check_samples(samples, trim=trim, max_seconds=n_frames * HOP_LENGTH / SAMPLE_RATE)
    return log_mel_spectrogram(pad_or_trim(samples, n_frames * HOP_LENGTH), n_mels)


def model_input(
    audio: AudioLike, n_mels: int = 80, trim: bool = False, n_frames: int = N_FRAMES
) -> Float[Tensor, "batch n_mels n_frames"]:
    """What HookedWhisper reads: a log-mel spectrogram with a batch dimension.

    `audio` is a WAV path, 16 kHz mono samples [n], or a log-mel spectrogram already computed
    ([n_mels, n_frames] or [batch, n_mels, n_frames]), which is checked (`check_spectrogram`) and
    passed through. `n_frames` is the model's window (``model.cfg.n_frames``).
    """
    _check_count(n_mels, "n_mels")
    _check_count(n_frames, "n_frames")
    if isinstance(audio, (np.ndarray, Tensor)) and (
        audio.ndim == 3
        or audio.ndim == 2
        and (audio.shape[0] == n_mels or audio.shape[1] == n_frames or min(audio.shape) > MAX_CHANNELS)
    ):
        return check_spectrogram(audio, n_mels, n_frames)
    return log_mel(audio, n_mels, trim=trim, n_frames=n_frames)[None]


def check_spectrogram(mel: np.ndarray | Tensor, n_mels: int, n_frames: int) -> Float[Tensor, "batch n_mels n_frames"]:
    """`mel` ([n_mels, n_frames] or [batch, n_mels, n_frames]) as float32 with a batch dimension, after
    checking its shape against the model's `n_mels` and `n_frames` and its values (InputError otherwise)."""
    mel = _as_tensor(mel, "spectrogram")
    if not mel.is_floating_point():
        raise InputError(f"spectrogram: a log-mel spectrogram holds floats, got dtype {mel.dtype}")
    if mel.ndim not in (2, 3):
        raise InputError(
            f"spectrogram: expected [n_mels, frames] or [batch, n_mels, frames], got shape {tuple(mel.shape)}"
        )
    mel = mel.float() if mel.ndim == 3 else mel.float()[None]
    batch, bins, frames = mel.shape
    if bins != n_mels:
        raise InputError(
            f"audio is a log-mel spectrogram with {bins} mel bins (shape {tuple(mel.shape)}); this model "
            f"reads n_mels={n_mels}: give [{n_mels}, {n_frames}] or [batch, {n_mels}, {n_frames}]"
        )
    if frames != n_frames:
        raise InputError(
            f"audio is a log-mel spectrogram of {frames} frames; this model reads windows of "
            f"n_frames={n_frames} ({n_frames * HOP_LENGTH / SAMPLE_RATE:g} s): compute it with "
            f"log_mel(samples, n_frames={n_frames})"
        )
    if batch == 0:
        raise InputError("spectrogram: a batch of 0 spectrograms")
    bad = int((~torch.isfinite(mel)).sum())
    if bad:
        raise InputError(f"spectrogram: {bad} of its values are NaN or infinite; a log-mel spectrogram is finite")
    return mel


def _check_count(value: Any, what: str) -> None:
    """InputError unless `value` is a whole number of at least 1."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise InputError(f"{what}={value!r} is not valid; valid: a whole number of at least 1")


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
