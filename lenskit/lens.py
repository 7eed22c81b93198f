"""The logit lens: every residual stream read through the model's final norm and unembedding.

    lens = logit_lens(model, "The Eiffel Tower is in the city of", targets=[" Paris", " Rome"])
    lens.top_strings[-1, 0, -1]      # the model's own top-5 next tokens after the last position
    lens.target_probs[:, 0, -1]      # [layer, target]: P(" Paris"), P(" Rome") read at each layer
    lens.plot()                      # layers x positions, each cell the top token coloured by its probability
    lens.plot_topk()                 # per layer, the input tokens coloured by the probability of each; hover: top-k
    lens.to_frame(), lens.target_frame(), lens.save_html("lens.html")

Layer l in 0..L-1 reads ``blocks.{l}.hook_resid_pre`` (the stream entering block l); layer L
reads the final ``blocks.{L-1}.hook_resid_post``, so its row is the model's own output. The
streams come from a `lenskit.Run` (one forward pass, stopping after the last block read, for
those it lacks); each is normalised and its rows are projected a chunk at a time (positions of one
or several layers together), keeping only the top-k, target and next-token statistics: the
[layer, pos, vocab] logits are never held unless ``return_logits=True``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lenskit import checks, sites
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.labelled import LabelledTensor
from lenskit.readout import Readout
from lenskit.run import Run, as_run
from lenskit.tokens import Prompts, TokenLike, str_tokens, token_ids
from lenskit.viz import Figure, Pictured, heatmap, top_k_tokens

LOGITS_PER_CHUNK = 2**24  # default chunk: about 64 MB of float32 logits at a time


@dataclass
class LensResult(Pictured):
    """What the logit lens read at each layer, batch row and position (ranks count from 0 = top token).

    Attributes:
        layers: the layer of each row, in 0..L (L = the final residual stream).
        layer_names: the hook each row reads (blocks.{l}.hook_resid_pre; the final blocks.{L-1}.hook_resid_post).
        tokens: the input token ids [batch, pos]; input_strings their strings [batch, pos].
        top_ids, top_probs, top_strings: the top_k tokens and their probabilities [layer, batch, pos, k],
            most probable first (top_strings is a numpy array of str).
        next_probs, next_ranks: the probability and rank of the token that really follows each
            position, [layer, batch, pos - 1] (positions 0..pos-2).
        target_ids, target_strings: the targets [target], or None without targets.
        target_probs, target_ranks, target_logits: [layer, batch, pos, target], or None without targets.
        logits: the full logits [layer, batch, pos, vocab] when asked for (return_logits=True), else None.
    """

    layers: list[int]
    layer_names: list[str]
    tokens: Int[Tensor, "batch pos"]
    input_strings: np.ndarray
    top_ids: Int[Tensor, "layer batch pos k"]
    top_probs: Float[Tensor, "layer batch pos k"]
    top_strings: np.ndarray
    next_probs: Float[Tensor, "layer batch pos-1"]
    next_ranks: Int[Tensor, "layer batch pos-1"]
    target_ids: Int[Tensor, " target"] | None = None
    target_strings: list[str] | None = None
    target_probs: Float[Tensor, "layer batch pos target"] | None = None
    target_ranks: Int[Tensor, "layer batch pos target"] | None = None
    target_logits: Float[Tensor, "layer batch pos target"] | None = None
    logits: Float[Tensor, "layer batch pos vocab"] | None = None

    def to_frame(self) -> pd.DataFrame:
        """Top-k predictions, one row per (layer, batch, pos, rank).

        Columns: layer, layer_label (hook name), batch, pos, token (the input token at pos),
        rank, predicted, predicted_id, prob.
        """
        frame = self._frame(self.top_probs, "rank", {}, "prob")
        frame["predicted"] = self.top_strings.reshape(-1)
        frame["predicted_id"] = self.top_ids.reshape(-1).numpy()
        return frame[["layer", "layer_label", "batch", "pos", "token", "rank", "predicted", "predicted_id", "prob"]]

    def target_frame(self) -> pd.DataFrame:
        """Target statistics, one row per (layer, batch, pos, target).

        Columns: layer, layer_label, batch, pos, token, target (index), target_label, target_id,
        prob, rank, logit.
        """
        if self.target_ids is None:
            raise InputError("this lens was run without targets; pass targets= to logit_lens")
        frame = self._frame(self.target_probs, "target", {"target": self.target_strings}, "prob")
        target_id = self.target_ids.numpy()[frame["target"].to_numpy()]
        frame.insert(frame.columns.get_loc("target_label") + 1, "target_id", target_id)
        frame["rank"] = self.target_ranks.reshape(-1).numpy()
        frame["logit"] = self.target_logits.reshape(-1).numpy()
        return frame

    def _frame(self, values: Tensor, last_dim: str, labels: dict, value_name: str) -> pd.DataFrame:
        """A [layer, batch, pos, last_dim] tensor as a tidy frame with layer numbers and input tokens."""
        dims = ("layer", "batch", "pos", last_dim)
        frame = LabelledTensor(values, dims, {"layer": self.layer_names, **labels}).to_frame(value_name)
        frame["layer"] = np.asarray(self.layers)[frame["layer"]]
        token = self.input_strings[frame["batch"].to_numpy(), frame["pos"].to_numpy()]
        frame.insert(frame.columns.get_loc("pos") + 1, "token", token)
        return frame

    def plot(self, batch: int = 0, positions: Sequence[int] | None = None, title: str = "logit lens") -> Figure:
        """The lens heatmap of one batch row: layers x input tokens, each cell the top token coloured by its prob.

        positions: which positions to show (default all), e.g. ``range(-20, 0)`` for the last 20.
        """
        batch = self._batch_row(batch)
        n_pos = self.tokens.shape[1]
        positions = list(range(n_pos) if positions is None else positions)
        outside = [p for p in positions if not -n_pos <= p < n_pos]
        if outside:
            raise InputError(
                f"positions {outside} out of range: this lens has {n_pos} positions (valid 0..{n_pos - 1})"
            )
        top = self.top_strings[:, batch, positions, 0]
        return heatmap(
            self.top_probs[:, batch, positions, 0],
            self.layer_names,
            list(self.input_strings[batch, positions]),
            text=top.tolist(),
            title=title,
            row_title="layer",
            col_title="input token",
            limit=1.0,
        )

    def plot_topk(self, batch: int = 0, title: str = "logit lens: top tokens per position") -> Figure:
        """The lens' top-k next tokens at every position of one batch row, one row per layer (circuitsvis).

        Each row shows the input tokens from the second on, coloured by the probability the lens
        gives them at that layer; hovering a token shows the lens' top-k guesses for it
        (probability, log probability) and its rank.
        """
        batch = self._batch_row(batch)
        if self.tokens.shape[1] < 2:
            raise InputError(
                "plot_topk needs at least two tokens: each position is scored on the token that follows it"
            )
        return top_k_tokens(
            list(self.input_strings[batch]),
            self.top_strings[:, batch, :-1],
            self.top_probs[:, batch, :-1],
            self.next_probs[:, batch],
            self.next_ranks[:, batch],
            rows=[f"layer {layer}" for layer in self.layers],
            row_notes=self.layer_names,
            title=title,
        )

    def _batch_row(self, batch: int) -> int:
        """`batch` as a row index, checked against the batch rows."""
        n_batch = self.tokens.shape[0]
        if not -n_batch <= checks.integer(batch, "batch") < n_batch:
            raise InputError(f"batch {batch} out of range: this lens has {n_batch} batch rows (valid 0..{n_batch - 1})")
        return batch % n_batch

    def summary(self, batch: int = 0, pos: int = -1) -> pd.DataFrame:
        """A small table for one position: per layer, the top-k tokens with their probabilities and the targets'."""
        rows = {}
        for i, name in enumerate(self.layer_names):
            cells = {
                f"top {k + 1}": f"{s!r} {p:.3f}"
                for k, (s, p) in enumerate(zip(self.top_strings[i, batch, pos], self.top_probs[i, batch, pos].tolist()))
            }
            for t, target in enumerate(self.target_strings or []):
                cells[f"{target!r} p / rank"] = (
                    f"{self.target_probs[i, batch, pos, t]:.3f} / {self.target_ranks[i, batch, pos, t]}"
                )
            rows[name] = cells
        return pd.DataFrame.from_dict(rows, orient="index")

    def __repr__(self) -> str:
        n_layers, n_batch, n_pos, k = self.top_ids.shape
        targets = f", targets={self.target_strings}" if self.target_strings else ""
        return f"LensResult(layers={n_layers}, batch={n_batch}, pos={n_pos}, top_k={k}{targets})"

    def _repr_html_(self) -> str:
        """The heatmap of batch row 0 (its last 32 positions at most) and the summary of its last position."""
        shown = range(max(-32, -self.tokens.shape[1]), 0)
        return (
            f"<p><code>{html.escape(repr(self))}</code></p>"
            + self.plot(positions=shown).html
            + "<p>last position</p>"
            + self.summary().to_html()
        )


def logit_lens(
    model: Model,
    tokens: Prompts | Run,
    targets: TokenLike | Sequence[TokenLike] | Tensor | None = None,
    top_k: int = 5,
    layers: int | Sequence[int] | None = None,
    normalize: bool = True,
    *,
    chunk_size: int | None = None,
    return_logits: bool = False,
    progress: bool = True,
) -> LensResult:
    """Read each residual stream through the final norm and the unembedding (the logit lens).

    Args:
        tokens: a text or list of texts (``model.to_tokens``, so texts of unequal length are
            padded and their padded positions read as well), token ids [batch, pos] or [pos], or
            a `lenskit.Run`, whose cached streams are read (one forward pass, stopping after the
            last block needed, computes those it lacks).
        targets: tokens whose probability, rank and logit to report at every layer and position:
            strings that are single tokens, or ids.
        top_k: how many of the most probable tokens to keep per (layer, batch, pos).
        layers: which streams to read, in 0..L (L = n_layers, the final stream); default all.
            Rows come out in increasing layer order.
        normalize: apply the model's final normalisation (``model.ln_final``, which computes
            its scale from the stream it is given; LayerNorm, RMSNorm or their folded Pre
            forms) before the unembedding. False projects the raw stream.
        chunk_size: how many rows (a row is one layer, batch row and position) to project onto
            the vocabulary at once (default: as many as make 2**24 logits, 64 MB in float32).
        return_logits: also keep the full logits [layer, batch, pos, vocab] (memory!).
        progress: show a progress bar over layers.
    """
    run = as_run(model, tokens)
    tokens = run.tokens
    readout = Readout(model)
    if not 1 <= checks.integer(top_k, "top_k") <= readout.d_vocab:
        raise InputError(f"top_k must lie in 1..{readout.d_vocab} (the vocabulary), not {top_k}")
    n_layers = model.cfg.n_layers
    layers = sorted(set(range(n_layers + 1) if layers is None else checks.integers(layers, "layers")))
    outside = [layer for layer in layers if not 0 <= layer <= n_layers]
    if outside or not layers:
        what = f"layers {outside} out of range" if outside else "no layers given"
        raise InputError(
            f"{what}: logit_lens reads layers 0..{n_layers}, where {n_layers} is the final residual stream"
        )
    names = sites.residual_names(model, "pre", layers)
    target_ids = None if targets is None else token_ids(model, targets).to(tokens.device)
    following = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).reshape(-1)  # the last position's is a stand-in
    chunk_size = (
        max(1, LOGITS_PER_CHUNK // readout.d_vocab)
        if chunk_size is None
        else checks.integer(chunk_size, "chunk_size", low=1)
    )
    chunks = _ChunkedReadout(readout, top_k, target_ids, return_logits, chunk_size)
    streams = run.require(names)
    with torch.no_grad():
        for name in tqdm(names, desc="logit_lens", disable=not progress):
            resid = streams[name]
            resid = readout.normalize(resid) if normalize else resid
            chunks.add(resid.reshape(-1, resid.shape[-1]), following)
        read = chunks.finish()
    read = {key: value.reshape(len(names), *tokens.shape, -1) for key, value in read.items()}
    ids = tokens.cpu()
    return LensResult(
        layers=layers,
        layer_names=names,
        tokens=ids,
        input_strings=str_tokens(model, ids),
        top_ids=read["top_ids"],
        top_probs=read["top_probs"],
        top_strings=str_tokens(model, read["top_ids"]),
        next_probs=read["next_probs"][:, :, :-1, 0],
        next_ranks=read["next_ranks"][:, :, :-1, 0],
        target_ids=None if target_ids is None else target_ids.cpu(),
        target_strings=None if target_ids is None else list(str_tokens(model, target_ids)),
        target_probs=read.get("target_probs"),
        target_ranks=read.get("target_ranks"),
        target_logits=read.get("target_logits"),
        logits=read.get("logits"),
    )


class _ChunkedReadout:
    """Reads (normalised) residual rows through the unembedding `chunk_size` rows at a time, across layers.

    Rows are buffered until a chunk is full, so short inputs still make few large matrix
    products; of each chunk's logits [chunk, vocab] only the top-k, target and next-token
    statistics are kept (and the logits themselves when `keep_logits`), on the CPU.
    """

    def __init__(
        self,
        readout: Readout,
        top_k: int,
        target_ids: Int[Tensor, " target"] | None,
        keep_logits: bool,
        chunk_size: int,
    ):
        self.readout, self.top_k, self.target_ids, self.keep_logits = readout, top_k, target_ids, keep_logits
        self.chunk_size = chunk_size
        self.pending: list[tuple[Tensor, Tensor]] = []
        self.reads: list[dict[str, Tensor]] = []

    def add(self, rows: Float[Tensor, "rows d_model"], following: Int[Tensor, " rows"]) -> None:
        """Queue `rows` with the id of the token that follows each (its next-token statistics)."""
        self.pending.append((rows, following))
        if sum(len(rows) for rows, _ in self.pending) >= self.chunk_size:
            self._read(everything=False)

    def finish(self) -> dict[str, Tensor]:
        """Read the rows still pending; every statistic over all rows added, in order: {name: [rows, ...]}."""
        self._read(everything=True)
        return {key: torch.cat([read[key] for read in self.reads]) for key in self.reads[0]}

    def _read(self, everything: bool) -> None:
        rows, following = (torch.cat(parts) for parts in zip(*self.pending))
        end = len(rows) if everything else len(rows) - len(rows) % self.chunk_size
        self.reads += [
            self._statistics(rows[start : start + self.chunk_size], following[start : start + self.chunk_size])
            for start in range(0, end, self.chunk_size)
        ]
        self.pending = [(rows[end:], following[end:])]

    def _statistics(self, rows: Float[Tensor, "chunk d_model"], following: Int[Tensor, " chunk"]) -> dict[str, Tensor]:
        """Top-k ids and probabilities [chunk, k]; target logits, probabilities and ranks [chunk, target];
        the following token's probability and rank [chunk, 1]."""
        logits = self.readout.logits(rows).float()
        probs = logits.softmax(dim=-1)
        top_ids = logits.topk(self.top_k, dim=-1).indices
        read = {"top_ids": top_ids, "top_probs": probs.gather(-1, top_ids)}
        if self.target_ids is not None:
            target_logits = logits[:, self.target_ids]
            read["target_logits"] = target_logits
            read["target_probs"] = probs[:, self.target_ids]
            read["target_ranks"] = _ranks(logits, target_logits)
        following = following[:, None].to(logits.device)
        read["next_probs"] = probs.gather(-1, following)
        read["next_ranks"] = _ranks(logits, logits.gather(-1, following))
        if self.keep_logits:
            read["logits"] = logits
        return {key: value.cpu() for key, value in read.items()}


def _ranks(logits: Float[Tensor, "rows vocab"], chosen: Float[Tensor, "rows n"]) -> Int[Tensor, "rows n"]:
    """The rank (0 = top) of each chosen logit among its row: how many logits exceed it."""
    return torch.stack([(logits > chosen[:, [i]]).sum(dim=-1) for i in range(chosen.shape[1])], dim=-1)
