"""The tokenization experiment: a leading space changes how GPT-2 splits a name.

" Claire" -> [' Claire'] but "Claire" -> ['Cl', 'aire'] with the real GPT-2 tokenizer. Offline, the
byte-pair ranks shipped in openai-whisper's gpt2.tiktoken give the exact GPT-2 tokenizer; with a model
(e.g. --model gpt2, --model smollm2-135m) its own tokenizer is used, with GPT-2's split beside it when
openai-whisper is installed. Words are tokenized alone, without BOS.
"""

from __future__ import annotations

import pandas as pd

from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.experiments.reproduction import Reproduction, model_label
from lenskit.models import load

WORDS = [" Claire", "Claire", " Mary", "Mary", " Ioannis", "Ioannis"]


def gpt2_pieces(texts: list[str]) -> list[list[str]]:
    """GPT-2's byte-pair split of each text, from openai-whisper's copy of GPT-2's ranks (no network)."""
    try:
        from whisper.tokenizer import get_encoding
    except ImportError as error:
        raise InputError("the offline GPT-2 tokenizer needs openai-whisper: pip install 'lenskit[whisper]'") from error
    encoding = get_encoding("gpt2")
    return [[encoding.decode([t]) for t in encoding.encode(text)] for text in texts]


def run(model: Model | str | None = None, progress: bool = True) -> Reproduction:
    if model is None:
        source, pieces = "GPT-2 byte-pair ranks (openai-whisper's gpt2.tiktoken)", gpt2_pieces(WORDS)
    else:
        name = model if isinstance(model, str) else None
        model = model if isinstance(model, Model) else load(model)
        source = f"{model_label(model, name)}'s tokenizer"
        pieces = [model.to_str_tokens(word, prepend_bos=False) for word in WORDS]
    table = pd.DataFrame(
        {"text": [repr(w) for w in WORDS], "tokens": [str(p) for p in pieces], "n_tokens": [len(p) for p in pieces]}
    )
    notes = "GPT-2: ' Claire' is one token, 'Claire' two ('Cl', 'aire'): a name's first mention without a space splits."
    if model is not None:
        try:
            reference = gpt2_pieces(WORDS)
        except ValueError:
            notes += " (GPT-2's column needs openai-whisper.)"
        else:
            table["GPT-2 tokens"] = [str(p) for p in reference]
            table["GPT-2 n_tokens"] = [len(p) for p in reference]
        same = [w for w, p in zip(WORDS, pieces) if len(p) == 1]
        notes += f" With this tokenizer, single tokens: {', '.join(repr(w) for w in same) or 'none'}."
    return Reproduction(
        f"How a leading space changes tokenization ({source})",
        table,
        notes=notes,
        numbers={"tokens": {w: p for w, p in zip(WORDS, pieces)}},
    )
