"""The Whisper layer-removal experiment: word error rate as the encoder or the decoder loses its final layers.

The whisper_logit_lens study removed final layers of whisper-medium one at a time: the decoder
tolerated about 3 removed layers of 24, the encoder about 8, before transcripts turned into
repetition and unrelated text. Here the same table comes from `lenskit.whisper.layer_removal`,
averaged over a few utterances synthesised by espeak-ng: held-out sentences in the held-out voice
on the zoo's speech model (the default, offline), or a plain English voice for any other model
(e.g. ``--model tiny`` or ``--model openai/whisper-tiny`` with internet).
"""

from __future__ import annotations

import pandas as pd
import torch

from lenskit.experiments.reproduction import Reproduction
from lenskit.viz import heatmap
from lenskit.whisper.convert import load
from lenskit.whisper.layers import layer_removal
from lenskit.whisper.model import HookedWhisper
from lenskit.zoo.speech_data import utterances

DEFAULT_SPEECH_MODEL = "lenskit/speech-3l"
N_UTTERANCES = 4


def run(model: HookedWhisper | str | None = None, progress: bool = True, n_utterances: int = N_UTTERANCES) -> Reproduction:
    model = model if isinstance(model, HookedWhisper) else load(model or DEFAULT_SPEECH_MODEL)
    speech = utterances(n_utterances, seed=4000, held_out_sentences=True, held_out_voice=True, progress=False)
    runs = pd.concat([
        layer_removal(model, utterance.samples, utterance.text, part=part, progress=progress).assign(utterance=i)
        for i, utterance in enumerate(speech) for part in ("encoder", "decoder")
    ])
    table = (runs.groupby(["part", "removed", "layers_left"], sort=False)
             .agg(mean_wer=("wer", "mean"), example_transcript=("transcript", "first")).reset_index())
    grid = table.pivot(index="part", columns="removed", values="mean_wer").loc[["encoder", "decoder"]]
    figure = heatmap(torch.tensor(grid.to_numpy()), list(grid.index), [str(c) for c in grid.columns],
                     title="word error rate with the final layers removed", row_title="part", col_title="layers removed")
    notes = (f"Mean word error rate over {n_utterances} utterances; the example transcript is the first utterance's "
             f"(reference: {speech[0].text!r}). Removing a layer zeroes its attention, cross-attention and MLP outputs "
             "(`hooks.skip`); the final layer norm stays.")
    return Reproduction("Whisper layer removal: word error rate against removed final layers", table, [figure], notes)
