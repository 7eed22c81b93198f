"""LabelledTensor: named dims, labels, and the tidy frame."""

import pytest
import torch

from lenskit.labelled import LabelledTensor


def test_to_frame_is_tidy_and_row_major():
    values = torch.arange(6.0).reshape(2, 3)
    lt = LabelledTensor(values, dims=("layer", "pos"), labels={"pos": ["<bos>", " Mary", " John"]})
    frame = lt.to_frame()
    assert frame.columns.tolist() == ["layer", "pos", "pos_label", "value"]
    assert frame["value"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert frame.iloc[4].to_dict() == {"layer": 1, "pos": 1, "pos_label": " Mary", "value": 4.0}
    assert lt.sum("layer").tolist() == [3.0, 5.0, 7.0]
    assert "layer=2, pos=3" in repr(lt) and "<table" in lt._repr_html_()


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="2 dim names"):
        LabelledTensor(torch.zeros(2, 3, 4), dims=("a", "b"))
    with pytest.raises(ValueError, match="2 labels for dim 'b' of size 3"):
        LabelledTensor(torch.zeros(2, 3), dims=("a", "b"), labels={"b": ["x", "y"]})
    with pytest.raises(ValueError, match="unknown dim 'c'"):
        LabelledTensor(torch.zeros(2, 3), dims=("a", "b"), labels={"c": ["x", "y"]})
