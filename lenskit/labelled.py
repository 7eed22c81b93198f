"""`LabelledTensor`: a tensor whose dimensions have names and whose entries have labels.

Many lenskit results are a grid of numbers indexed by model components: residual streams
stacked by component, patching grids by (layer, position), attributions by (layer, head).
A `LabelledTensor` keeps the raw tensor (so the user keeps computing with it) together with
the name of each dimension and, where useful, a label for each index along it, and turns
itself into a tidy pandas DataFrame with `.to_frame()`.

    >>> lt = LabelledTensor(torch.zeros(2, 3), dims=("layer", "pos"),
    ...                     labels={"pos": ["<bos>", " Mary", " John"]})
    >>> lt.to_frame().columns.tolist()
    ['layer', 'pos', 'pos_label', 'value']
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import pandas as pd
import torch

from lenskit.errors import InputError
from lenskit.viz import Figure, Pictured, heatmap


@dataclass
class LabelledTensor(Pictured):
    """A tensor with named dimensions and optional per-index labels.

    Attributes:
        tensor: the values, any shape.
        dims: one name per dimension of `tensor` (e.g. ``("component", "batch", "pos", "d_model")``).
        labels: for some dimensions, one label per index (e.g. hook names, string tokens).
    """

    tensor: torch.Tensor
    dims: tuple[str, ...]
    labels: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dims = tuple(self.dims)
        if len(self.dims) != self.tensor.ndim:
            raise InputError(
                f"LabelledTensor: {len(self.dims)} dim names {self.dims} for a tensor of shape "
                f"{tuple(self.tensor.shape)}"
            )
        for dim, labels in self.labels.items():
            if dim not in self.dims:
                raise InputError(f"LabelledTensor: labels given for unknown dim {dim!r}; dims are {self.dims}")
            size = self.tensor.shape[self.dims.index(dim)]
            if len(labels) != size:
                raise InputError(f"LabelledTensor: {len(labels)} labels for dim {dim!r} of size {size}")

    # --- tensor-like conveniences -------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    def __len__(self) -> int:
        return len(self.tensor)

    def __getitem__(self, index):
        """Index the underlying tensor (returns a plain tensor)."""
        return self.tensor[index]

    def __iter__(self):
        return iter(self.tensor)

    def sum(self, dim: str | None = None) -> torch.Tensor:
        """Sum over a named dimension (or everything)."""
        if dim is None:
            return self.tensor.sum()
        return self.tensor.sum(self.dims.index(dim))

    # --- tidy views ---------------------------------------------------------------------
    def to_frame(self, value_name: str = "value") -> pd.DataFrame:
        """One row per entry: an integer column per dim, a `<dim>_label` column per labelled dim."""
        values = self.tensor.detach().float().cpu()
        index = pd.MultiIndex.from_product([range(n) for n in values.shape], names=list(self.dims))
        frame = index.to_frame(index=False)
        for dim, labels in self.labels.items():
            frame.insert(frame.columns.get_loc(dim) + 1, f"{dim}_label", [labels[i] for i in frame[dim]])
        frame[value_name] = values.reshape(-1).numpy()
        return frame

    def plot(self, title: str = "") -> Figure:
        """A heatmap of a 2-D result (first dim as rows, second as columns), labelled where labels exist.

        Select a 2-D slice first for more dimensions: ``LabelledTensor(lt[0], lt.dims[1:], ...)``.
        """
        if self.tensor.ndim != 2:
            raise InputError(f"plot needs a 2-D LabelledTensor, this one has dims {self.dims}; select a slice first")
        rows, cols = (self.labels.get(d, [f"{d} {i}" for i in range(n)]) for d, n in zip(self.dims, self.tensor.shape))
        return heatmap(self.tensor, rows, cols, title=title, row_title=self.dims[0], col_title=self.dims[1])

    def __repr__(self) -> str:
        shape = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.tensor.shape))
        return f"LabelledTensor({shape})"

    def _repr_html_(self) -> str:
        frame = self.to_frame()
        note = f"<p><code>{html.escape(repr(self))}</code></p>"
        if len(frame) > 200:
            note += f"<p>first 200 of {len(frame)} rows</p>"
        return note + frame.head(200).to_html(index=False)
