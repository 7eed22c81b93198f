"""Reading model files: every problem a lenskit error naming the file, never a raw JSON, safetensors or torch one.

    >>> read_json(folder / "config.json")               # a JSON object (dict)
    >>> read_json(folder / "vocabulary.json", list)      # a JSON array
    >>> read_safetensors(folder / "model.safetensors")   # {name: tensor}
    >>> check_weights(weights, model.state_dict(), path, "hooked_whisper.json")

A missing file raises `MissingFileError`; a file that cannot be read as what it should be raises
`ModelFileError` (or the subclass a caller names, e.g. `CTranslate2FormatError`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from lenskit.errors import MissingFileError, ModelFileError


def read_json(path: str | Path, kind: type = dict, error: type[ModelFileError] = ModelFileError) -> Any:
    """The JSON value in `path`, which must be a `kind` (dict: an object, list: an array)."""
    path = Path(path)
    try:
        value = json.loads(check_file(path, "JSON file").read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path} is not valid JSON ({problem})") from None
    if not isinstance(value, kind):
        expected = {dict: "a JSON object {...}", list: "a JSON array [...]"}.get(kind, kind.__name__)
        raise error(f"{path} should hold {expected}, not a JSON {type(value).__name__}")
    return value


def check_file(path: Path, what: str) -> Path:
    """`path`, after checking that it is a file (`what` names the file expected there in errors)."""
    if not path.exists():
        raise MissingFileError(f"no {what} {path}")
    if not path.is_file():
        raise ModelFileError(f"{path} is a folder, not a {what}")
    return path


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file."""
    path = check_file(Path(path), "weights file")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as problem:
        raise ModelFileError(f"cannot read {path} (truncated or corrupt?): {problem}") from None


def read_torch(path: str | Path, what: str) -> Any:
    """What ``torch.load(path, weights_only=True)`` reads: tensors and plain containers, never code."""
    path = check_file(Path(path), what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as problem:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError ... for a bad file
        raise ModelFileError(
            f"{path} is not a readable {what} ({type(problem).__name__}: {str(problem)[:200]})"
        ) from None


def check_weights(
    weights: Mapping[str, Tensor], expected: Mapping[str, Tensor], path: str | Path, against: str
) -> None:
    """Raise ModelFileError unless `weights` (read from `path`) has exactly the names and shapes of
    `expected` (the model built from `against`, e.g. its config file)."""
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    not_tensors = sorted(name for name, value in weights.items() if not isinstance(value, Tensor))
    shapes = [
        f"{name} {tuple(weights[name].shape)} (expected {tuple(expected[name].shape)})"
        for name in expected.keys() & weights.keys()
        if isinstance(weights[name], Tensor) and weights[name].shape != expected[name].shape
    ]
    problems = [
        f"{label} {', '.join(map(str, names[:5]))}{' ...' if len(names) > 5 else ''}"
        for label, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("not tensors:", not_tensors),
            ("shapes differ:", sorted(shapes)),
        )
        if names
    ]
    if problems:
        raise ModelFileError(f"{path} does not match {against}: {'; '.join(problems)}")
