"""Greedy transcription with a key/value cache, with any TransformerLens hooks active.

    >>> result = transcribe(model, "speech.wav")                        # Transcript(text=..., tokens=[...])
    >>> h = hooks.ablate("decoder.blocks.2.cross_attn.hook_z", head=1)
    >>> transcribe(model, "speech.wav", hooks=h).text                    # the same, with one head ablated

Decoding follows openai-whisper's ``decode`` with ``without_timestamps=True`` and temperature
0: the start-of-transcript sequence then ``<|notimestamps|>``, blank outputs and non-speech
tokens suppressed, greedy choice until ``<|endoftext|>``. A model that carries its own
suppressed sets (`HookedWhisper.suppress_tokens` / ``begin_suppress_tokens``, e.g. from a
CTranslate2 folder's config.json) has those suppressed instead, as ctranslate2 does.

Hooks see every decoding step: under the key/value cache a step's activations cover its new
position only (attention patterns cover all keys), and cross-attention keys and values are
computed, and hooked, at the first step only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lenskit import checks
from lenskit.errors import InputError
from lenskit.hooks import Hooks
from lenskit.whisper.audio import AudioLike, model_input
from lenskit.whisper.model import HookedWhisper
from lenskit.whisper.tokenizer import get_tokenizer


@dataclass
class Transcript:
    """A greedy transcription: the text, the sampled tokens, and the prompt they followed."""

    text: str
    tokens: list[int]
    prompt: list[int]
    language: str | None

    @property
    def sequence(self) -> Int[Tensor, "1 pos"]:
        """Prompt and sampled tokens, [1, pos]: the decoder input of a full pass over the transcript."""
        return torch.tensor([self.prompt + self.tokens])


@torch.no_grad()
def transcribe(
    model: HookedWhisper,
    audio: AudioLike,
    hooks: Iterable | None = None,
    max_tokens: int = 224,
    language: str | None = "en",
    suppress_tokens: Iterable[int] = (),
    use_cache: bool = True,
    trim: bool = False,
    progress: bool = True,
) -> Transcript:
    """Transcribe up to 30 s of audio by greedy decoding, with `hooks` attached throughout.

    Args:
        audio: a WAV path, 16 kHz mono samples, or a log-mel spectrogram (see `model_input`).
        hooks: TransformerLens ``(name, fn)`` pairs (e.g. a `lenskit.hooks` value); their names are
            checked, and they are removed afterwards even if decoding fails.
        max_tokens: the most tokens sampled after the prompt.
        language: language code for multilingual models; None detects it from the audio.
        suppress_tokens: token ids never sampled, besides Whisper's usual suppressed set.
        use_cache: decode with the key/value cache (False recomputes every position each step).
        trim: keep the first 30 s of longer audio instead of raising InputError. Non-finite samples or
            spectrogram values, a spectrogram of another n_mels or window, or a batch also raise InputError.
    """
    checks.integer(max_tokens, "max_tokens", low=1)
    mel = model_input(audio, model.cfg.n_mels, trim=trim, n_frames=model.cfg.n_frames).to(model.device)
    if mel.shape[0] != 1:
        raise InputError(f"transcribe takes one recording; got a batch of {mel.shape[0]} spectrograms")
    with Hooks(hooks or []).on(model):
        audio_features = model.encode(mel)
        if language is None and model.is_multilingual:
            language = detect_language(model, audio_features)
        tokenizer = get_tokenizer(model, language=language)
        prompt = list(tokenizer.sot_sequence_including_notimestamps)
        suppressed = sorted(set(model_suppressed_tokens(model, tokenizer)) | set(suppress_tokens))
        blank = blank_tokens(tokenizer) if model.begin_suppress_tokens is None else list(model.begin_suppress_tokens)
        tokens = greedy_decode(
            model, audio_features, prompt, tokenizer.eot, max_tokens, suppressed, blank, use_cache, progress
        )
    return Transcript(tokenizer.decode(tokens).strip(), tokens, prompt, language if model.is_multilingual else None)


def greedy_decode(
    model: HookedWhisper,
    audio_features: Float[Tensor, "1 audio_pos d_model"],
    prompt: list[int],
    eot: int,
    max_tokens: int,
    suppressed: list[int],
    blank: list[int],
    use_cache: bool = True,
    progress: bool = True,
) -> list[int]:
    """Greedily sample up to `max_tokens` tokens after `prompt` until `eot` (not returned).

    `suppressed` ids are never sampled; `blank` ids are not sampled first.
    """
    cache = model.new_cache() if use_cache else None
    suppressed, blank = (
        torch.tensor(ids, dtype=torch.long, device=audio_features.device) for ids in (suppressed, blank)
    )
    tokens = list(prompt)
    step_input = torch.tensor([prompt], device=audio_features.device)
    for step in tqdm(range(max_tokens), desc="decoding", disable=not progress, leave=False):
        if len(tokens) > model.cfg.n_text_ctx:
            break
        logits = model.decode(
            step_input if use_cache else torch.tensor([tokens], device=audio_features.device), audio_features, cache
        )[0, -1]
        logits[suppressed] = float("-inf")
        if step == 0:
            logits[blank] = float("-inf")
        next_token = int(logits.argmax())
        if next_token == eot:
            break
        tokens.append(next_token)
        step_input = torch.tensor([[next_token]], device=audio_features.device)
    return tokens[len(prompt) :]


def detect_language(model: HookedWhisper, audio_features: Float[Tensor, "1 audio_pos d_model"]) -> str:
    """The language code whose token the decoder ranks highest right after ``<|startoftranscript|>``."""
    tokenizer = get_tokenizer(model)
    logits = model.decode(torch.tensor([[tokenizer.sot]], device=audio_features.device), audio_features)[0, -1]
    language_tokens = torch.tensor(tokenizer.all_language_tokens)
    best = language_tokens[logits[language_tokens].argmax()]
    return tokenizer.all_language_codes[tokenizer.all_language_tokens.index(int(best))]


def blank_tokens(tokenizer) -> list[int]:
    """Tokens openai-whisper never samples first: a lone space (where the vocabulary has one) and end of text."""
    try:
        space = tokenizer.encode(" ")
    except ValueError:  # a SubsetTokenizer without the space token
        space = []
    return [*space, tokenizer.eot]


def model_suppressed_tokens(model: HookedWhisper, tokenizer) -> list[int]:
    """The tokens `transcribe` never samples: the model's own `suppress_tokens` when it has them (-1
    expanding to the non-speech symbols, as in openai-whisper), else openai-whisper's default set."""
    if model.suppress_tokens is None:
        return suppressed_tokens(tokenizer)
    own = [token for token in model.suppress_tokens if token >= 0]
    return sorted(set(own) | (set(tokenizer.non_speech_tokens) if -1 in model.suppress_tokens else set()))


def suppressed_tokens(tokenizer) -> list[int]:
    """openai-whisper's default suppressed set: non-speech symbols and the task / start tokens."""
    special = (
        tokenizer.transcribe,
        tokenizer.translate,
        tokenizer.sot,
        tokenizer.sot_prev,
        tokenizer.sot_lm,
        tokenizer.no_speech,
    )
    return [*tokenizer.non_speech_tokens, *(token for token in special if token is not None)]
