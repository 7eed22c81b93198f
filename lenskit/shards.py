"""Activations on disk: a dataset streamed through a model into safetensors shards, in bounded memory.

    stream_cache(model, dataset, names, out_dir)   the folder of safetensors shards + manifest.json
    load_cache(out_dir)                            ShardedCache, memory-mapped

Resumable after a crash (even kill -9): every file is written under a temp name and renamed into
place, and a rerun checks the shards already there, skips them and computes only the missing
ones. A manifest names only shard files inside its own folder, and a rerun removes only the temp
files an interrupted run left. Each batch is one `lenskit.Run` caching just the chosen hooks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Union

import torch
from jaxtyping import Int
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lenskit import checks, hooks
from lenskit.backend import Model
from lenskit.errors import InputError, MissingFileError
from lenskit.run import Run
from lenskit.tokens import document_ids

HookNames = Union[str, Iterable[str], Callable[[str], bool]]

MANIFEST = "manifest.json"


# --- to disk ------------------------------------------------------------------------------


def stream_cache(
    model: Model,
    dataset: Iterable[str] | Iterable[Int[torch.Tensor, "batch pos"]],
    names: HookNames,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
    shard_tokens: int = 2**14,
    batch_size: int = 8,
    max_len: int = 128,
    progress: bool = True,
) -> Path:
    """Run `model` over `dataset`; write the activations at `names` to safetensors shards in `out_dir`.

    dataset: a text (one document), texts, or token tensors [batch, pos] (or [pos]) whose rows all have one length.
        Texts are tokenized, joined into one stream with the end-of-text token between them and
        cut into rows of `max_len` tokens, each row starting with BOS when the model prepends one
        (like TransformerLens' `tokenize_and_concatenate`): no padding, every activation belongs
        to a real token. A last partial row is dropped. `max_len` is not used for token tensors.
    names: a hook name, a list of them, a glob ("blocks.*.hook_resid_post") or a filter, as
        for `hooks.cache`.
    dtype: storage dtype. float16 by default: half the disk and bandwidth of float32 at ~3
        significant digits, plenty for residual streams (but it overflows beyond 65504: use
        torch.bfloat16 for such activations); pass torch.float32 for exact copies.

    out_dir gets shard_00000.safetensors, shard_00001.safetensors, ..., each holding `tokens`
    [rows, pos] and one [rows, *activation dims] tensor per hook, shard_tokens // pos rows to
    a shard (the last may hold fewer), and manifest.json: model summary, names, dtype, shapes
    per row, rows and tokens per shard, and whether the run is complete. Memory holds one shard
    at a time. A shard is written to a temp file and renamed into place, so a shard file is
    always whole; rerunning after an interruption (even kill -9) checks the shards already
    there against the dataset, skips them, computes only the missing ones, and leaves the same
    bytes as an uninterrupted run. Returns `out_dir` as a Path.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(
            f"stream_cache: dtype must be a floating-point torch dtype (torch.float16, torch.bfloat16, "
            f"torch.float32), not {dtype!r}"
        )
    checks.integer(batch_size, "stream_cache: batch_size", low=1)
    checks.integer(shard_tokens, "stream_cache: shard_tokens", low=1)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"stream_cache: out_dir {out_dir} is a file; give a folder (it is created if missing)")
    names = _fired_hook_names(model, names)
    items = iter([dataset] if isinstance(dataset, str) else dataset)
    first_item = next(items, None)
    if first_item is None:
        raise InputError("stream_cache: the dataset is empty")
    source = "texts" if isinstance(first_item, str) else "tokens"
    items = chain([first_item], items)
    rows = _text_rows(model, items, max_len) if source == "texts" else _tensor_rows(items)
    first_row = next(rows, None)
    if first_row is None:
        raise InputError(f"stream_cache: the texts hold fewer tokens than one row of max_len={max_len}")
    rows = chain([first_row], rows)

    manifest = {
        "model": _model_summary(model),
        "names": names,
        "dtype": str(dtype).removeprefix("torch."),
        "source": source,
        "row_len": len(first_row),
        "rows_per_shard": max(1, shard_tokens // len(first_row)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_same_settings(out_dir, manifest)
    for half_written in [*out_dir.glob("shard_*.safetensors.tmp"), out_dir / f"{MANIFEST}.tmp"]:
        half_written.unlink(missing_ok=True)  # only what an interrupted stream_cache left: never the user's files
    manifest |= {"complete": False, "n_tokens": 0, "shapes": {}, "shards": []}
    _save_json_atomically(manifest, out_dir / MANIFEST)

    bar = tqdm(desc="stream_cache", unit="tok", unit_scale=True, disable=not progress)
    for index, shard_rows in enumerate(_batched(rows, manifest["rows_per_shard"])):
        tokens = torch.stack(shard_rows)
        path = out_dir / f"shard_{index:05d}.safetensors"
        if path.exists():
            _check_finished_shard(path, tokens, names)
            bar.update(tokens.numel())
        else:
            _write_shard(model, tokens, names, dtype, batch_size, path, bar)
        if index == 0:
            manifest["shapes"] = _row_shapes(path, names)
        manifest["shards"].append({"file": path.name, "rows": len(tokens), "tokens": tokens.numel()})
        manifest["n_tokens"] += tokens.numel()
        _save_json_atomically(manifest, out_dir / MANIFEST)
    bar.close()
    manifest["complete"] = True
    _save_json_atomically(manifest, out_dir / MANIFEST)
    return out_dir


def _fired_hook_names(model: Model, names: HookNames) -> list[str]:
    """The hook names that `names` selects, in forward order, found by caching them on a one-token pass.

    Unknown names raise ValueError (from `hooks`); a selection of which no hook fires, InputError.
    """
    if not (isinstance(names, str) or callable(names)):
        names = list(names)
    fired = list(Run(model, torch.zeros(1, 1, dtype=torch.long)).require(hooks.hook_names(model, names)))
    exact = [] if callable(names) else [names] if isinstance(names, str) else names
    silent = [name for name in exact if name in model.hook_dict and name not in fired]
    if silent or not fired:
        raise InputError(
            f"stream_cache: {silent or names!r} selects hooks that do not fire in a forward pass of this model"
        )
    return fired


def _text_rows(model: Model, texts: Iterable[str], max_len: int) -> Iterator[Int[torch.Tensor, " pos"]]:
    """Rows of `max_len` token ids cut from the texts joined by end-of-text tokens, each led by BOS."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise InputError("stream_cache: texts need a model with a tokenizer; pass token tensors instead")
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    prefix = [tokenizer.bos_token_id] if model.cfg.default_prepend_bos else []
    if not len(prefix) < max_len <= model.cfg.n_ctx:
        raise InputError(f"stream_cache: max_len={max_len} must lie in {len(prefix) + 1}..{model.cfg.n_ctx} (n_ctx)")
    body = max_len - len(prefix)
    stream: list[int] = []
    for text in texts:
        if not isinstance(text, str):
            raise InputError(f"stream_cache: the dataset mixes texts with {type(text).__name__}")
        stream += document_ids(model, text, "stream_cache dataset").tolist() + [separator]
        starts = range(0, len(stream) - body + 1, body)
        for start in starts:
            yield torch.tensor(prefix + stream[start : start + body])
        stream = stream[len(starts) * body :]


def _tensor_rows(batches: Iterable[torch.Tensor]) -> Iterator[Int[torch.Tensor, " pos"]]:
    """The rows of token tensors [batch, pos] or [pos], as int64 on the CPU; all must have one length."""
    row_len = None
    for batch in batches:
        if isinstance(batch, str):
            raise InputError("stream_cache: the dataset mixes token tensors with texts")
        batch = torch.as_tensor(batch)
        row_len = row_len or batch.shape[-1]
        if batch.shape[-1] != row_len:
            raise InputError(
                f"stream_cache: token rows must all have one length; got {row_len}, then {batch.shape[-1]}"
            )
        yield from batch.reshape(-1, row_len).long().cpu()


def _batched(items: Iterable, n: int) -> Iterator[list]:
    """Consecutive lists of `n` items (the last may be shorter)."""
    items = iter(items)
    while chunk := list(islice(items, n)):
        yield chunk


def _write_shard(
    model: Model,
    tokens: Int[torch.Tensor, "rows pos"],
    names: list[str],
    dtype: torch.dtype,
    batch_size: int,
    path: Path,
    bar: tqdm,
) -> None:
    """Save {"tokens": [rows, pos], name: [rows, ...] in `dtype`} to `path`, `batch_size` rows per forward pass
    (a `Run` each, its activations cast into the shard's CPU tensors)."""
    shard = {"tokens": tokens}
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        cached = Run(model, batch).require(names)
        for name in names:
            if name not in shard:
                shard[name] = torch.empty((len(tokens), *cached[name].shape[1:]), dtype=dtype)
            shard[name][start : start + len(batch)] = cached[name]
        bar.update(batch.numel())
    _save_atomically(shard, path)


def _check_finished_shard(path: Path, tokens: Int[torch.Tensor, "rows pos"], names: list[str]) -> None:
    """Raise InputError unless a shard left by an earlier run holds `tokens` and `names`."""
    with safe_open(path, framework="pt") as shard:
        if set(shard.keys()) != {"tokens", *names} or not torch.equal(shard.get_tensor("tokens"), tokens):
            raise InputError(
                f"stream_cache: {path} holds other tokens or hooks than this run gives it; "
                "was the out_dir made from another dataset?"
            )


def _row_shapes(path: Path, names: list[str]) -> dict[str, list[int]]:
    """{name: shape of one row's activation} read from a shard's header (the same in every shard)."""
    with safe_open(path, framework="pt") as shard:
        return {name: shard.get_slice(name).get_shape()[1:] for name in names}


def _model_summary(model: Model) -> dict:
    """The config fields that tell models apart, and a fingerprint of the weights."""
    cfg = model.cfg
    fields = (
        "model_name",
        "n_layers",
        "d_model",
        "n_heads",
        "d_head",
        "d_mlp",
        "d_vocab",
        "n_ctx",
        "act_fn",
        "normalization_type",
        "positional_embedding_type",
    )
    summary = {field: getattr(cfg, field) for field in fields}
    summary["dtype"] = str(cfg.dtype).removeprefix("torch.")
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(parameter.detach().flatten()[:1024].float().cpu().numpy().tobytes())
    summary["weights_sha256"] = digest.hexdigest()[:16]  # of each parameter's first 1024 values
    return summary


def _check_same_settings(out_dir: Path, settings: dict) -> None:
    """Raise InputError when `out_dir` holds a cache made with another model, names or layout."""
    if not (out_dir / MANIFEST).exists():
        return
    old = json.loads((out_dir / MANIFEST).read_text())
    differ = [key for key in settings if old.get(key) != settings[key]]
    if differ:
        details = "; ".join(f"{key}: {old.get(key)!r} there, {settings[key]!r} now" for key in differ)
        raise InputError(
            f"stream_cache: {out_dir} holds a cache made with a different {' and '.join(differ)} "
            f"({details}); use another out_dir, or empty this one"
        )


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file under a temp name, then rename it into place: `path` is never half-written."""
    temp = path.with_name(path.name + ".tmp")
    save_file(tensors, temp)
    os.replace(temp, path)


def _save_json_atomically(data: dict, path: Path) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(data, indent=1))
    os.replace(temp, path)


# --- from disk ----------------------------------------------------------------------------


def load_cache(out_dir: str | os.PathLike) -> ShardedCache:
    """Open a cache written by `stream_cache`; tensors are memory-mapped from the shards, not read."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).exists():
        raise MissingFileError(f"load_cache: no {MANIFEST} in {out_dir}")
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        complete, shards = manifest["complete"], manifest["shards"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise InputError(f"load_cache: {out_dir / MANIFEST} is not a stream_cache manifest ({error!r})") from None
    if not complete:
        raise InputError(f"load_cache: the cache in {out_dir} is incomplete; rerun stream_cache to finish it")
    for shard in shards:  # shard files are plain names inside out_dir: a manifest cannot point elsewhere
        name = shard.get("file") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"shard_\d+\.safetensors", name):
            raise InputError(
                f"load_cache: {out_dir / MANIFEST} names shard file {name!r}; shards are files "
                "shard_NNNNN.safetensors inside the cache folder"
            )
    return ShardedCache(out_dir, manifest)


@dataclass
class ShardedCache:
    """Activations written by `stream_cache`, memory-mapped from their safetensors shards.

    cache.names, cache.manifest     hook names, and the manifest dict
    len(cache)                      rows (sequences) over all shards
    cache.shard(i)                  {"tokens": [rows, pos], name: [rows, ...]}: shard i, memory-mapped
    cache.iter_shards()             those dicts, shard by shard, memory-mapped
    cache[name], cache.tokens       all shards concatenated: [rows, ...], a copy in RAM
    """

    path: Path
    manifest: dict

    @property
    def names(self) -> list[str]:
        return self.manifest["names"]

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    def __len__(self) -> int:
        return sum(shard["rows"] for shard in self.manifest["shards"])

    def shard(self, index: int) -> dict[str, torch.Tensor]:
        """Shard `index` as {"tokens": [rows, pos], name: [rows, ...]}, memory-mapped (pages load as touched)."""
        with safe_open(self.path / self.manifest["shards"][index]["file"], framework="pt") as shard:
            return {key: shard.get_tensor(key) for key in ["tokens", *self.names]}

    def iter_shards(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self.shard(index) for index in range(self.n_shards))

    def __getitem__(self, name: str) -> torch.Tensor:
        """All shards' activations at hook `name`, concatenated: [rows, ...]. This copies them into RAM."""
        if name not in self.names:
            raise KeyError(f"{name!r} is not in this cache; it holds {self.names}")
        return torch.cat([self.shard(index)[name] for index in range(self.n_shards)])

    @property
    def tokens(self) -> Int[torch.Tensor, "rows pos"]:
        """The token ids of every row, [rows, pos] (a copy)."""
        return torch.cat([self.shard(index)["tokens"] for index in range(self.n_shards)])

    def __repr__(self) -> str:
        return (
            f"ShardedCache({str(self.path)!r}, {len(self)} rows x {self.manifest['row_len']} tokens "
            f"in {self.n_shards} shards, {len(self.names)} hooks, {self.manifest['dtype']})"
        )
