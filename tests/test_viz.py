"""The HTML heatmap: colours follow the values, labels and tooltips are escaped, nothing is fetched."""

import pytest
import torch

from lenskit import LabelledTensor
from lenskit.viz import heatmap
from lenskit.viz.heatmap import cell_colours


def test_colours_diverge_around_zero_and_saturate_at_the_limit():
    colours = cell_colours(torch.tensor([[2.0, -2.0, 0.0, 1.0]]))
    assert colours == [["rgb(178,24,43)", "rgb(33,102,172)", "rgb(255,255,255)", "rgb(216,140,149)"]]
    assert cell_colours(torch.tensor([[4.0, 1.0]]), limit=2.0) == [["rgb(33,102,172)", "rgb(144,178,214)"]]


def test_heatmap_shows_text_escapes_labels_and_needs_no_network(tmp_path):
    figure = heatmap(torch.tensor([[0.25, 0.5]]), ["<L0>"], ["a", "b"], text=[["x", " Mary"]], title="lens")
    assert "&lt;L0&gt;" in figure.html and ">x</td>" in figure.html and "> Mary</td>" in figure.html
    assert 'title="&lt;L0&gt;, b: 0.5"' in figure.html
    assert "http" not in figure.page() and "<script" not in figure.page()
    assert figure.save(tmp_path / "f.html").read_text().startswith("<!DOCTYPE html>")


def test_heatmap_rejects_labels_that_do_not_match_the_values():
    with pytest.raises(ValueError, match=r"shape \(2, 2\) for 1 row and 2 column labels"):
        heatmap(torch.zeros(2, 2), ["a"], ["x", "y"])


def test_labelled_tensor_plot_uses_dim_labels():
    figure = LabelledTensor(torch.ones(2, 2), ("layer", "pos"), {"pos": ["<bos>", " cat"]}).plot()
    assert "layer 1" in figure.html and "&lt;bos&gt;" in figure.html and "layer \\ pos" in figure.html
    with pytest.raises(ValueError, match="2-D"):
        LabelledTensor(torch.ones(2, 2, 2), ("a", "b", "c")).plot()
