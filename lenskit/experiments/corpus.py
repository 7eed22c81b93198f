"""Real human-written English, offline: Ambrose Bierce's *The Devil's Dictionary* (1911, public domain).

The text comes from Debian's ``dict-devil`` package (``apt-get install dict-devil``), which installs
it as a dictd database, ``/usr/share/dictd/devil.dict.dz`` (dictzip, readable as gzip): 380 KB of
definitions, anecdotes and verse. lenskit never ships it; `devils_dictionary` reads it from the
installed package and raises `CorpusMissing` (a FileNotFoundError) naming the package when absent.

    >>> text = devils_dictionary()                       # the reflowed text, preface first
    >>> tokens = passages(model, n=8, length=128)        # [8, 128]: windows spread over the text
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from lenskit.backend import Model
from lenskit.errors import InputError, MissingFileError

DEVIL_PATH = Path("/usr/share/dictd/devil.dict.dz")
DEBIAN_PACKAGE = "dict-devil"
NAME = "The Devil's Dictionary (Ambrose Bierce, 1911, public domain; Debian package dict-devil)"


class CorpusMissing(MissingFileError):
    """The corpus file is not installed; the message says which package installs it."""


def devils_dictionary(path: str | Path = DEVIL_PATH) -> str:
    """The Devil's Dictionary from its preface on, reflowed: hard-wrapped prose lines joined into
    paragraphs (runs of spaces made one), indented verse kept line by line, paragraphs separated by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise CorpusMissing(
            f"the text corpus {path} is not installed: it comes with Debian's {DEBIAN_PACKAGE} "
            f"package (apt-get install {DEBIAN_PACKAGE})"
        )
    try:
        raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    except (OSError, EOFError) as error:
        raise InputError(f"{path} is not a gzip/dictzip file ({error})") from None
    start = raw.find("PREFACE")
    if start < 0:
        raise InputError(f"{path} does not look like The Devil's Dictionary (no PREFACE)")
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw[start + len("PREFACE") :]):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        if all(line.startswith(" ") for line in lines):  # verse: every line indented
            paragraphs.append("\n".join(line.strip() for line in lines))
            continue
        current: list[str] = []
        for line in lines:  # prose: an indented line starts a new paragraph
            if line.startswith(" ") and current:
                paragraphs.append(re.sub(" {2,}", " ", " ".join(current)))
                current = []
            current.append(line.strip())
        paragraphs.append(re.sub(" {2,}", " ", " ".join(current)))
    return "\n\n".join(paragraphs)


def passages(model: Model, n: int, length: int, text: str | None = None) -> Int[Tensor, "n length"]:
    """`n` windows of `length` tokens of `text` (default: `devils_dictionary`), evenly spread over it.

    The whole text is tokenized once without a BOS; each window is a contiguous run of its tokens,
    starting with the model's BOS when the model prepends one by default (``cfg.default_prepend_bos``).
    """
    if model.tokenizer is None:
        raise InputError("passages: the model has no tokenizer to read the corpus with")
    if n < 1 or length < 2:
        raise InputError(f"passages: need n >= 1 passages of length >= 2 tokens, not n={n}, length={length}")
    if length > model.cfg.n_ctx:
        raise InputError(f"passages: length {length} exceeds the model's context of {model.cfg.n_ctx}")
    text = devils_dictionary() if text is None else text
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = (
        [model.tokenizer.bos_token_id]
        if model.cfg.default_prepend_bos and model.tokenizer.bos_token_id is not None
        else []
    )
    body = length - len(bos)
    if len(ids) < n * body:
        raise InputError(f"passages: the text has {len(ids)} tokens, fewer than {n} passages x {body}")
    stride = len(ids) // n
    rows = [bos + ids[i * stride : i * stride + body] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long, device=model.cfg.device)
