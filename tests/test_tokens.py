"""Answers given as strings or ids become token ids; multi-token strings are refused with their split."""

import pytest
import torch
from conftest import STORIES_DIR

import lenskit
from lenskit.tokens import token_id, token_ids


@pytest.fixture(scope="module")
def model(word_model):
    return word_model


def test_strings_and_ids_become_ids(model):
    assert token_id(model, "cat") == 5 and token_id(model, 7) == 7 and token_id(model, torch.tensor(3)) == 3
    assert token_ids(model, ["the", 9, "mat"]).tolist() == [4, 9, 9]
    assert token_ids(model, "dog").tolist() == [11]


def test_bad_tokens_are_named(model):
    with pytest.raises(ValueError, match=r"'cat sat' is not a single token: it splits into 2 tokens \['cat', 'sat'\]"):
        token_id(model, "cat sat")
    with pytest.raises(ValueError, match=r"token id 13 is outside the vocabulary \(0..12\)"):
        token_id(model, 13)
    with pytest.raises(ValueError, match="expected a token string or id"):
        token_id(model, 1.5)


def test_a_vocabulary_entry_is_accepted_as_written():
    """llama2.c's tokenizer adds a leading space when encoding, so " time" encodes as two tokens although
    it is one vocabulary entry; the entry is what the user means."""
    if not STORIES_DIR.exists():
        pytest.skip("../shared/models/stories260K is not present")
    model = lenskit.load(STORIES_DIR)
    assert token_id(model, " time") == token_id(model, "time") == model.to_single_token("time")
    assert model.to_single_str_token(token_id(model, " time")) == " time"
