"""HookedWhisper: OpenAI's Whisper with TransformerLens hook points, and analyses of it.

>>> from lenskit import hooks, whisper
>>> model = whisper.load("tiny")                                   # or "openai/whisper-tiny", a folder, a .pt
>>> model = whisper.load("lenskit/speech-3l")                      # the zoo's small Whisper, offline
>>> model = whisper.load("faster-whisper-tiny.en")                 # real tiny.en, from its wheel, offline
>>> model = whisper.load("path/to/faster-whisper-base")            # any CTranslate2 Whisper folder
>>> result = whisper.transcribe(model, "speech.wav")
>>> h = hooks.skip(model, [3], stack="encoder.blocks")             # hooks.* work unchanged
>>> whisper.transcribe(model, "speech.wav", hooks=h).text
>>> logits, cache = model.run_with_cache(whisper.model_input("speech.wav"), result.sequence)
"""

from lenskit.whisper.attribution import LogitAttribution, decoder_logit_attribution
from lenskit.whisper.audio import (
    load_audio,
    log_mel,
    log_mel_spectrogram,
    mel_filters,
    model_input,
    pad_or_trim,
    read_wav,
    resample_audio,
)
from lenskit.whisper.convert import from_ctranslate2, from_hf, from_openai, load, save
from lenskit.whisper.cross_attention import cross_attention
from lenskit.whisper.decoding import Transcript, transcribe
from lenskit.whisper.layers import layer_removal, layer_removal_batch, remove_final_layers
from lenskit.whisper.lens import WhisperLensResult, decoder_logit_lens, encoder_lens
from lenskit.whisper.model import HookedWhisper, WhisperConfig
from lenskit.whisper.tokenizer import SubsetTokenizer, get_tokenizer
from lenskit.whisper.wer import corpus_word_error_rate, word_error_rate

__all__ = [
    "HookedWhisper",
    "WhisperConfig",
    "load",
    "save",
    "from_hf",
    "from_openai",
    "from_ctranslate2",
    "read_wav",
    "load_audio",
    "resample_audio",
    "pad_or_trim",
    "mel_filters",
    "log_mel_spectrogram",
    "log_mel",
    "model_input",
    "get_tokenizer",
    "SubsetTokenizer",
    "transcribe",
    "Transcript",
    "decoder_logit_lens",
    "encoder_lens",
    "WhisperLensResult",
    "decoder_logit_attribution",
    "LogitAttribution",
    "layer_removal",
    "layer_removal_batch",
    "remove_final_layers",
    "word_error_rate",
    "corpus_word_error_rate",
    "cross_attention",
]
