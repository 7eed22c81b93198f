"""Reproductions: each table equals the measurement done by hand on the same model."""

import pytest
import torch
from conftest import STORIES_DIR

import lenskit
from lenskit import experiments
from lenskit.experiments.emotion import aligned_positions
from lenskit.zoo import DEFAULT_MODEL


@pytest.fixture(scope="module")
def zoo():
    return lenskit.load(DEFAULT_MODEL)


def logit_diff_by_hand(model, prompt, answer, wrong, prepend_bos):
    logits = model(model.to_tokens(prompt, prepend_bos=prepend_bos))[0, -1]
    return (logits[model.to_single_token(answer)] - logits[model.to_single_token(wrong)]).item()


def test_bos_on_the_zoo_model(zoo):
    result = experiments.run("bos", zoo)
    first = result.table.iloc[0]
    assert first["prompt"] == "When Claire and Mary went to the shop, Mary gave a drink to"
    for column, bos in (("with BOS", True), ("without BOS", False)):
        assert first[column] == pytest.approx(
            logit_diff_by_hand(zoo, first["prompt"], " Claire", " Mary", bos), abs=1e-4
        )
    assert result.table["BOS effect"].tolist() == pytest.approx(
        (result.table["with BOS"] - result.table["without BOS"]).tolist()
    )
    assert len(result.table) == 2 and "held-out" in result.table.iloc[1]["prompt"]
    assert "6.754" in str(result)


def test_tokenization_with_the_real_gpt2_ranks():
    pytest.importorskip("whisper", reason="the offline GPT-2 tokenizer reads openai-whisper's gpt2.tiktoken")
    table = experiments.run("tokenization").table.set_index("text")
    assert table.loc["' Claire'", "tokens"] == "[' Claire']"
    assert table.loc["'Claire'", "tokens"] == "['Cl', 'aire']"


def test_aligned_positions_compare_the_differing_span_at_its_last_token():
    first, second = ["<s>", "You", " happy", " day"], ["<s>", "You", " a", "ngry", " day"]
    assert aligned_positions(first, second) == ([0, 1, 2, 3], [0, 1, 3, 4], ["<s>", "You", " happy/ angry", " day"])
    with pytest.raises(ValueError, match="tokenize identically"):
        aligned_positions(first, first)


def test_emotion_differences_are_residual_norms(zoo):
    result = experiments.run("emotion", zoo)
    first, second = "Then Mary was happy.", "Then Mary was sad."
    _, a = zoo.run_with_cache(first)
    _, b = zoo.run_with_cache(second)
    layer_2 = (a["blocks.2.hook_resid_pre"] - b["blocks.2.hook_resid_pre"])[0].norm(dim=-1)
    row = result.table.set_index("layer").loc["blocks.2.hook_resid_pre"].to_numpy(dtype=float)
    torch.testing.assert_close(torch.tensor(row), layer_2.double(), atol=1e-4, rtol=0)
    assert (row[:4] == 0).all() and row[4] > 0  # nothing changes before the differing word
    assert "<table" in result.figures[0].html


def test_emotion_on_stories260k_aligns_words_of_different_lengths():
    if not STORIES_DIR.exists():
        pytest.skip("../shared/models/stories260K is not present")
    result = experiments.run("emotion", lenskit.load(STORIES_DIR))
    assert " happy/ angry" in result.table.columns
    assert (result.table[" happy/ angry"] > 0).all()


def test_unknown_experiment_is_named():
    with pytest.raises(ValueError, match="unknown experiment 'ioj'; choose one of bos, tokenization"):
        experiments.run("ioj")
