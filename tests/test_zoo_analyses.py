"""The lens, attribution and head detectors on the shipped zoo model, against plain TransformerLens."""

import pytest
import torch
from transformer_lens import head_detector

import lenskit
from lenskit import vocab
from lenskit.zoo import DEFAULT_MODEL

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def zoo():
    return lenskit.load(DEFAULT_MODEL)


def test_the_lens_last_row_is_the_zoo_models_output(zoo):
    lens = lenskit.logit_lens(zoo, PROMPT, targets=[" Mary", " John"], progress=False)
    log_probs = zoo(zoo.to_tokens(PROMPT)).log_softmax(-1)[0]  # [pos, d_vocab]
    torch.testing.assert_close(lens.top_probs[-1, 0].log(), log_probs.topk(5).values, atol=1e-5, rtol=0)
    assert lens.top_strings[-1, 0, -1, 0] == " Mary"  # the model answers the IOI prompt


def test_attribution_sums_to_the_zoo_models_logit_difference(zoo):
    logits = zoo(zoo.to_tokens(PROMPT))[0, -1]
    expected = (logits[zoo.to_single_token(" Mary")] - logits[zoo.to_single_token(" John")]).item()
    for by in ("layer", "head", "neuron", "head_pos"):
        frame = lenskit.attribute(zoo, PROMPT, " Mary", " John", by=by)
        assert frame.value.sum() == pytest.approx(expected, abs=1e-4) and frame.attrs["logit_diff"] == pytest.approx(
            expected, abs=1e-4
        )
    with pytest.raises(ValueError, match=r"'Mary John' is not a single token: it splits into 2 tokens"):
        lenskit.attribute(zoo, PROMPT, "Mary John")


def test_head_detectors_equal_transformer_lens_on_the_zoo_model(zoo):
    text = "When Mary and John went to the store, John gave a drink to Mary. When Mary and John went to the store"
    for kind in ("previous_token", "duplicate_token", "induction"):
        expected = head_detector.detect_head(zoo, text, f"{kind}_head")
        torch.testing.assert_close(
            vocab.head_scores(zoo, text, kind, progress=False).tensor, expected, atol=1e-5, rtol=0
        )
