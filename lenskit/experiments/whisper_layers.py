"""The Whisper layer-removal experiment: word error rate as the encoder or the decoder loses its final layers.

The whisper_logit_lens study removed final layers of whisper-medium one at a time: the decoder
tolerated about 3 removed layers of 24, the encoder about 8, before transcripts turned into
repetition and unrelated text.

- On the zoo's speech model (the default, offline): the table from `lenskit.whisper.layer_removal`,
  averaged over a few held-out sentences in the held-out voice (`zoo_study`).
- On a Whisper with OpenAI's vocabulary (e.g. ``--model faster-whisper-tiny.en``, offline; ``tiny``
  with internet): `real_study` speaks `N_REAL_UTTERANCES` Harvard sentences (IEEE 1969, public
  domain) in several espeak-ng voices (`VOICES`), removes 0..n final layers of the encoder and of
  the decoder, and measures the word error rate with jiwer; then the decoder logit lens on the first
  utterance (the transcript emerging layer by layer, the emitted tokens' logits per layer), and one
  cross-attention head's pattern in the normal regime beside the degraded, repeating one.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lenskit.errors import InputError
from lenskit.experiments.reproduction import Reproduction
from lenskit.viz import heatmap
from lenskit.whisper.audio import SAMPLE_RATE
from lenskit.whisper.convert import load
from lenskit.whisper.cross_attention import cross_attention
from lenskit.whisper.decoding import Transcript, transcribe
from lenskit.whisper.layers import layer_removal, layer_removal_batch, remove_final_layers
from lenskit.whisper.lens import WhisperLensResult, decoder_logit_lens
from lenskit.whisper.model import HookedWhisper
from lenskit.whisper.tokenizer import get_tokenizer
from lenskit.whisper.wer import corpus_word_error_rate
from lenskit.zoo.speech_data import Utterance, Voice, synthesise, utterances

DEFAULT_SPEECH_MODEL = "lenskit/speech-3l"
N_UTTERANCES = 4


def run(
    model: HookedWhisper | str | None = None, progress: bool = True, n_utterances: int | None = None, **options
) -> Reproduction:
    """`zoo_study` on a model with its own small vocabulary (the zoo's), `real_study` on one with OpenAI's."""
    model = model if isinstance(model, HookedWhisper) else load(model or DEFAULT_SPEECH_MODEL)
    if model.vocabulary is None:
        return real_study(model, progress, n_utterances or N_REAL_UTTERANCES, **options)
    if options:
        raise InputError(f"options {sorted(options)} apply to Whisper models with OpenAI's vocabulary only")
    return zoo_study(model, progress, n_utterances or N_UTTERANCES)


def zoo_study(model: HookedWhisper, progress: bool = True, n_utterances: int = N_UTTERANCES) -> Reproduction:
    speech = utterances(n_utterances, seed=4000, held_out_sentences=True, held_out_voice=True, progress=False)
    runs = pd.concat(
        [
            layer_removal(model, utterance.samples, utterance.text, part=part, progress=progress).assign(utterance=i)
            for i, utterance in enumerate(speech)
            for part in ("encoder", "decoder")
        ]
    )
    table = (
        runs.groupby(["part", "removed", "layers_left"], sort=False)
        .agg(mean_wer=("wer", "mean"), example_transcript=("transcript", "first"))
        .reset_index()
    )
    grid = table.pivot(index="part", columns="removed", values="mean_wer").loc[["encoder", "decoder"]]
    figure = heatmap(
        torch.tensor(grid.to_numpy()),
        list(grid.index),
        [str(c) for c in grid.columns],
        title="word error rate with the final layers removed",
        row_title="part",
        col_title="layers removed",
    )
    notes = (
        f"Mean word error rate over {n_utterances} utterances; the example transcript is the first utterance's "
        f"(reference: {speech[0].text!r}). Removing a layer zeroes its attention, cross-attention and MLP outputs "
        "(`hooks.skip`); the final layer norm stays."
    )
    return Reproduction("Whisper layer removal: word error rate against removed final layers", table, [figure], notes)


# --- a Whisper with OpenAI's vocabulary -----------------------------------------------------

HARVARD_SENTENCES = (  # IEEE Recommended Practice for Speech Quality Measurements (1969), lists 1-3: public domain
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
    "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.",
    "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.",
    "Read verse out loud for pleasure.",
)
VOICES = ("en-us", "en-us-nyc", "en-us+m3", "en-gb", "en-gb-x-rp", "en-us+f3")
"""espeak-ng voices (accent + variant), used in turn: the English voices tiny.en transcribed best in a scan
(word error rate 0.40-0.48 over six sentences; 0.5-0.67 for en-gb-scotland, en-029, en-gb-x-gbclan). espeak-ng
is robotic, so even the intact model misses words. Debian's MBROLA voices (mb-us1..3) would be more natural,
but Debian ships them (and mbrola) outside its main archive."""
N_REAL_UTTERANCES = 24
SPEED = 160
MAX_TOKENS = 96
"""The most tokens decoded per transcript: Harvard sentences need about 15, so hitting it means a loop."""


def harvard_speech(n: int, progress: bool = True) -> list[Utterance]:
    """The first `n` Harvard sentences, each spoken by the next voice of `VOICES` at `SPEED` words per minute."""
    if not 1 <= n <= len(HARVARD_SENTENCES):
        raise InputError(f"n_utterances={n} out of range: 1..{len(HARVARD_SENTENCES)} Harvard sentences")
    made = []
    for i in tqdm(range(n), desc="synthesising speech", disable=not progress, leave=False):
        voice = Voice(VOICES[i % len(VOICES)], speed=SPEED, pitch=50)
        made.append(Utterance(HARVARD_SENTENCES[i], voice, synthesise(HARVARD_SENTENCES[i], voice)))
    return made


@torch.no_grad()
def real_study(
    model: HookedWhisper, progress: bool = True, n_utterances: int = N_REAL_UTTERANCES, max_tokens: int = MAX_TOKENS
) -> Reproduction:
    """Layer removal over `n_utterances` Harvard sentences, the decoder logit lens and cross-attention (module doc).

    Table: one row per (part, removed): layers_left, wer (jiwer over all utterances: word errors / reference
    words), mean_wer (mean of the utterances' rates), repeating (share of transcripts in a loop, `repeats`),
    example_transcript (the first utterance's). `tables`: every transcript; the logit lens per layer.
    """
    speech = harvard_speech(n_utterances, progress)
    runs = layer_removal_batch(
        model, [u.samples for u in speech], [u.text for u in speech], max_tokens=max_tokens, progress=progress
    )
    table = pd.DataFrame(
        [
            dict(
                part=part,
                removed=removed,
                layers_left=group.layers_left.iloc[0],
                wer=corpus_word_error_rate(list(group.reference), list(group.transcript)),
                mean_wer=group.wer.mean(),
                repeating=group.repeats.mean(),
                example_transcript=group.transcript.iloc[0],
            )
            for (part, removed), group in runs.groupby(["part", "removed"], sort=False)
        ]
    )
    grid = table.pivot(index="part", columns="removed", values="wer").loc[["encoder", "decoder"]]
    figures = [
        heatmap(
            torch.tensor(grid.to_numpy(dtype=float)),
            list(grid.index),
            [str(c) for c in grid.columns],
            title="word error rate (jiwer) with the final layers removed",
            row_title="part",
            col_title="layers removed",
        )
    ]

    first = speech[0]
    tokenizer = get_tokenizer(model)
    normal = transcribe(model, first.samples, max_tokens=max_tokens, progress=False)
    lens = decoder_logit_lens(model, first.samples, normal.sequence, tokenizer)
    figures.append(lens.plot(title=f"decoder logit lens on {first.text!r} ({first.voice.name}): top token per layer"))
    lens_table = lens_by_layer(lens, len(normal.prompt))

    decoder_rows = runs[(runs.part == "decoder") & (runs.utterance == 0)].set_index("removed")
    looping = [count for count in decoder_rows.index if count > 0 and decoder_rows.repeats[count]]
    degraded_count = looping[0] if looping else model.cfg.n_text_layer - 1
    layer, head = cross_attention_head(model, model.cfg.n_text_layer - degraded_count)
    removal = remove_final_layers(model, "decoder", degraded_count)
    degraded = transcribe(model, first.samples, hooks=removal, max_tokens=max_tokens, progress=False)
    seconds = len(first.samples) / SAMPLE_RATE + 0.5
    figures.append(
        cross_attention_figure(
            model,
            first.samples,
            normal,
            layer,
            head,
            tokenizer,
            seconds,
            f"normal regime: cross-attention of decoder layer {layer} head {head}",
        )
    )
    with removal.on(model):
        figures.append(
            cross_attention_figure(
                model,
                first.samples,
                degraded,
                layer,
                head,
                tokenizer,
                seconds,
                f"degraded regime, last {degraded_count} decoder layer(s) removed: layer {layer} head {head}",
            )
        )

    voices = ", ".join(sorted({u.voice.name for u in speech}))
    notes = (
        f"{n_utterances} Harvard sentences spoken by espeak-ng ({voices}; {SPEED} words per minute), at most "
        f"{max_tokens} tokens decoded. Removing a layer zeroes its attention, cross-attention and MLP outputs "
        f"(`hooks.skip`); the final layer norm stays. wer is jiwer's over all utterances (lower case, punctuation "
        f"dropped). The whisper_logit_lens study found whisper-medium's decoder tolerates about 3 of 24 removed "
        f"layers and its encoder about 8, with repetition when too many go. Logit lens and cross-attention: "
        f"utterance 0, {first.text!r} -> {normal.text!r}; with the last {degraded_count} decoder layer(s) "
        f"removed -> {degraded.text[:120]!r}."
    )
    return Reproduction(
        f"Whisper layer removal ({model.cfg.n_audio_layer} encoder + {model.cfg.n_text_layer} decoder "
        "layers): word error rate against removed final layers",
        table,
        figures,
        notes,
        tables={
            "decoder logit lens per layer (utterance 0)": lens_table,
            "transcripts": runs[["part", "removed", "utterance", "reference", "transcript", "wer", "repeats"]],
        },
    )


def lens_by_layer(lens: WhisperLensResult, prompt_length: int) -> pd.DataFrame:
    """Per lens layer, over the positions that predict the transcript's tokens (from the prompt's last one):
    the mean logit of the token the model emitted there, the mean largest logit, the emitted token's mean
    probability, and the share of positions where it is already the top token."""
    logits = lens.logits.tensor[:, prompt_length - 1 : -1]  # [layer, pos, vocab]
    emitted = lens.tokens[prompt_length:]
    chosen = logits.gather(-1, emitted[None, :, None].expand(logits.shape[0], -1, 1))[..., 0]
    probs = logits.softmax(-1).gather(-1, emitted[None, :, None].expand(logits.shape[0], -1, 1))[..., 0]
    return pd.DataFrame(
        {
            "layer": lens.logits.labels["layer"],
            "emitted token logit": chosen.mean(-1).numpy(),
            "largest logit": logits.max(-1).values.mean(-1).numpy(),
            "emitted token probability": probs.mean(-1).numpy(),
            "emitted token on top": (logits.argmax(-1) == emitted).float().mean(-1).numpy(),
        }
    )


def cross_attention_head(model: HookedWhisper, layers_running: int) -> tuple[int, int]:
    """The first of the model's alignment heads (cross-attention that follows the audio in time) in a decoder
    layer that still runs, else head 0 of the last running layer."""
    for layer, head in model.alignment_heads or []:
        if layer < layers_running:
            return layer, head
    return max(layers_running - 1, 0), 0


def cross_attention_figure(
    model: HookedWhisper,
    samples: Tensor,
    transcript: Transcript,
    layer: int,
    head: int,
    tokenizer,
    seconds: float,
    title: str,
):
    """The head's pattern over the transcript's tokens and the first `seconds` of audio, 0.1 s per column."""
    pattern = cross_attention(model, samples, transcript.sequence, layer, head, tokenizer=tokenizer, frames_per_bin=5)
    n_bins = min(pattern.tensor.shape[1], int(seconds / 0.1) + 1)
    return heatmap(
        pattern.tensor[:, :n_bins],
        pattern.labels["token"],
        pattern.labels["time"][:n_bins],
        title=title,
        row_title="token",
        col_title="time",
        limit=1.0,
        text=[[""] * n_bins] * pattern.tensor.shape[0],
    )
