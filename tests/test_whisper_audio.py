"""The audio front end: WAV reading, resampling, 30 s windows, log-mel spectrograms, bad audio."""

import math
import struct
import wave

import numpy as np
import pytest
import torch
from test_whisper_support import one_torch_thread, speech_wav  # noqa: F401  (fixtures)

from lenskit.whisper import (
    load_audio,
    log_mel,
    log_mel_spectrogram,
    mel_filters,
    model_input,
    pad_or_trim,
    read_wav,
    resample_audio,
)
from lenskit.whisper.audio import N_SAMPLES


def write_wav(path, samples: np.ndarray, rate: int, encoding: int = 1, bits: int = 16):
    """A WAV file written byte by byte: samples [sample, channel] already in the target integer/float type."""
    data = samples.tobytes()
    channels = samples.shape[1]
    fmt = struct.pack("<HHIIHH", encoding, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"LIST"
        + struct.pack("<I", 4)
        + b"INFO"
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def test_mel_filters_equal_openai_whisper_asset():
    pytest.importorskip("whisper")
    from importlib.resources import files

    with np.load(files("whisper") / "assets" / "mel_filters.npz") as shipped:
        for n_mels in (80, 128):
            np.testing.assert_allclose(mel_filters(n_mels).numpy(), shipped[f"mel_{n_mels}"], atol=1e-8, rtol=0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_equals_openai_whisper_on_speech(speech_wav, n_mels):
    whisper = pytest.importorskip("whisper")
    samples = load_audio(speech_wav)
    expected = whisper.log_mel_spectrogram(whisper.pad_or_trim(samples), n_mels)
    mel = log_mel(speech_wav, n_mels)
    assert mel.shape == (n_mels, 3000)
    torch.testing.assert_close(mel, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_equals_openai_whisper_on_noise(n_mels):
    whisper = pytest.importorskip("whisper")
    noise = 0.1 * torch.randn(7 * 16000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        log_mel_spectrogram(noise, n_mels), whisper.log_mel_spectrogram(noise, n_mels), atol=1e-5, rtol=0
    )


def test_read_wav_matches_the_standard_library(speech_wav):
    samples, rate = read_wav(speech_wav)
    with wave.open(str(speech_wav)) as reference:
        assert (rate, samples.shape[0]) == (reference.getframerate(), reference.getnchannels())
        ints = np.frombuffer(reference.readframes(reference.getnframes()), dtype="<i2")
    assert samples.shape[1] == len(ints) > 16000
    torch.testing.assert_close(samples[0], torch.from_numpy(ints / 32768).float(), atol=0, rtol=0)
    resampled = load_audio(speech_wav)
    assert len(resampled) == math.ceil(len(ints) * 16000 / rate)


def test_stereo_and_other_encodings_are_mixed_to_mono(tmp_path):
    t = np.arange(16000) / 16000
    left, right = 0.5 * np.sin(2 * np.pi * 300 * t), 0.25 * np.cos(2 * np.pi * 500 * t)
    stereo = np.stack([left, right], axis=1)
    expected = torch.from_numpy((left + right) / 2).float()
    pcm16 = write_wav(tmp_path / "s16.wav", np.round(stereo * 32767).astype("<i2"), 16000)
    torch.testing.assert_close(load_audio(pcm16, resample=False), expected, atol=1 / 32767, rtol=0)
    pcm8 = write_wav(tmp_path / "u8.wav", np.round(stereo * 127 + 128).astype(np.uint8), 16000, bits=8)
    torch.testing.assert_close(load_audio(pcm8), expected, atol=1 / 127, rtol=0)
    ints24 = np.round(stereo * (2**23 - 1)).astype("<i4").reshape(-1, 2)
    pcm24 = np.stack([(ints24 >> shift) & 0xFF for shift in (0, 8, 16)], axis=-1).astype(np.uint8)
    torch.testing.assert_close(
        load_audio(write_wav(tmp_path / "s24.wav", pcm24, 16000, bits=24)), expected, atol=1e-6, rtol=0
    )
    float32 = write_wav(tmp_path / "f32.wav", stereo.astype("<f4"), 16000, encoding=3, bits=32)
    torch.testing.assert_close(load_audio(float32), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("rate, freq", [(22050, 440), (22050, 3000), (44100, 5000), (8000, 1000)])
def test_resampling_preserves_tones_below_nyquist(rate, freq):
    t = torch.arange(2 * rate, dtype=torch.float64) / rate
    out = resample_audio(torch.sin(2 * math.pi * freq * t).float(), rate, 16000)
    assert len(out) == 32000
    expected = torch.sin(2 * math.pi * freq * torch.arange(32000, dtype=torch.float64) / 16000).float()
    torch.testing.assert_close(out[400:-400], expected[400:-400], atol=1e-2, rtol=0)


def test_resampling_removes_tones_above_the_new_nyquist():
    t = torch.arange(44100, dtype=torch.float64) / 44100
    out = resample_audio(torch.sin(2 * math.pi * 10000 * t).float(), 44100, 16000)
    assert out[400:-400].pow(2).mean().sqrt() < 0.01  # a 10 kHz tone has no place at 16 kHz (it would alias)
    same = torch.randn(100)
    assert resample_audio(same, 16000, 16000) is same


@pytest.fixture
def tone_wav(tmp_path):
    """Two seconds of a 440 Hz tone at 22.05 kHz, 16-bit mono."""
    t = np.arange(2 * 22050) / 22050
    return write_wav(
        tmp_path / "tone.wav", np.round(0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")[:, None], 22050
    )


def test_pad_or_trim():
    assert pad_or_trim(torch.ones(10), 4).tolist() == [1, 1, 1, 1]
    assert pad_or_trim(torch.ones(2), 4).tolist() == [1, 1, 0, 0]
    assert pad_or_trim(torch.ones(3)).shape == (N_SAMPLES,)


def test_model_input_from_files_samples_and_spectrograms(tone_wav):
    mel = model_input(tone_wav)
    assert mel.shape == (1, 80, 3000)
    assert model_input(mel[0]).shape == (1, 80, 3000) and model_input(mel) is mel
    samples = load_audio(tone_wav)
    torch.testing.assert_close(model_input(samples)[0], log_mel(tone_wav), atol=0, rtol=0)
    # samples at another rate given with their rate are resampled exactly as a file would be
    native, rate = read_wav(tone_wav)
    torch.testing.assert_close(log_mel(native[0], sample_rate=rate), mel[0], atol=0, rtol=0)


def test_bad_audio_raises_clear_errors(tmp_path, tone_wav):
    with pytest.raises(ValueError, match="audio is empty"):
        log_mel(torch.zeros(0))
    with pytest.raises(ValueError, match=r"2 NaN or infinite samples \(the first at sample 5\)"):
        log_mel(torch.tensor([0.0] * 5 + [float("nan"), 0.0, float("inf")]))
    with pytest.raises(ValueError, match="sampled at 22050 Hz; Whisper needs 16000 Hz"):
        load_audio(tone_wav, resample=False)
    with pytest.raises(ValueError, match="sampled at 8000 Hz"):
        log_mel(torch.zeros(8000), sample_rate=8000, resample=False)
    with pytest.raises(ValueError, match="expected mono samples"):
        log_mel(torch.zeros(2, 16000))
    long = torch.randn(N_SAMPLES + 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    with pytest.raises(ValueError, match="31.0 s long.*trim=True"):
        log_mel(long)
    torch.testing.assert_close(log_mel(long, trim=True), log_mel(long[:N_SAMPLES]), atol=0, rtol=0)
    (tmp_path / "notes.txt").write_text("not audio")
    with pytest.raises(ValueError, match="not a WAV file"):
        load_audio(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="unsupported WAV encoding"):
        load_audio(write_wav(tmp_path / "alaw.wav", np.zeros((10, 1), np.uint8), 8000, encoding=6, bits=8))


def test_stereo_speech_from_espeak(tmp_path, speech_wav):
    """A stereo file made from the speech (right channel quieter) reads as the mean of its channels."""
    mono, rate = read_wav(speech_wav)
    ints = np.round(mono[0].numpy() * 32768).astype("<i2")
    stereo = np.stack([ints, ints // 2], axis=1)
    path = write_wav(tmp_path / "stereo.wav", stereo, rate)
    expected = resample_audio(torch.from_numpy((ints.astype(np.float64) + ints // 2) / 2 / 32768).float(), rate)
    torch.testing.assert_close(load_audio(path), expected, atol=1e-6, rtol=0)
