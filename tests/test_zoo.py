"""The zoo: the shipped default model and its card, and the machinery (held-out data, the word-level
tokenizer, evaluation, and the training script, run for a few steps on the "tiny" recipe)."""

import csv
import math

import pytest
import torch

import lenskit
from lenskit.models import ZOO_ROOT
from lenskit.zoo import DEFAULT_MODEL, train
from lenskit.zoo.card import CARD_FILE
from lenskit.zoo.data import EVAL_NAMES, EVAL_TEMPLATES, TRAIN_NAMES, TRAIN_TEMPLATES, ioi_dataset
from lenskit.zoo.evaluate import evaluate, induction, ioi_logit_diffs, repeated_tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny recipe trained for 40 steps through the command line, and its folder."""
    out = tmp_path_factory.mktemp("tiny")
    threads = str(torch.get_num_threads())  # main sets the thread count: keep the session's
    train.main(["tiny", "--steps", "40", "--batch-size", "16", "--seed", "1", "--threads", threads, "--out", str(out)])
    return lenskit.load(out), out


def test_held_out_data_is_held_out():
    held_out = ioi_dataset(160, seed=1234, held_out=True)
    assert not set(EVAL_NAMES) & set(TRAIN_NAMES) and not set(EVAL_TEMPLATES) & set(TRAIN_TEMPLATES)
    assert all(e.io in EVAL_NAMES and e.subject in EVAL_NAMES and e.io != e.subject for e in held_out)
    abba = sum(e.prompt.index(e.io) < e.prompt.index(e.subject) for e in held_out)
    assert 50 < abba < 110  # both name orders, about equally often


def test_training_script_end_to_end(tiny):
    model, out = tiny
    assert model.cfg.n_layers == train.RECIPES["tiny"].n_layers
    with open(out / train.LOG_FILE) as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 8 and losses[-1] < losses[0]


def test_tokenizer_round_trips(tiny):
    model, _ = tiny
    text = "When Mary and John went to the store, John gave a drink to Mary."
    tokens = model.to_tokens(text)
    assert tokens[0, 0] == model.tokenizer.bos_token_id
    assert model.to_string(tokens[0, 1:]) == text
    assert torch.equal(model.to_tokens(text, prepend_bos=False), tokens[:, 1:])
    str_tokens = model.to_str_tokens(text, prepend_bos=False)
    assert str_tokens[:4] == ["When", " Mary", " and", " John"] and str_tokens[-2:] == [" Mary", "."]
    for name in [*TRAIN_NAMES, *EVAL_NAMES]:
        model.to_single_token(" " + name)  # raises unless a single token
    unk = model.tokenizer.unk_token_id
    assert all(unk not in model.to_tokens(e.prompt)[0] for e in ioi_dataset(50, held_out=True))


def test_ioi_logit_diffs_equal_one_prompt_at_a_time(tiny):
    """Batched (right-padded) logit differences equal those of each prompt run alone."""
    model, _ = tiny
    examples = ioi_dataset(6, seed=7)
    batched = ioi_logit_diffs(model, examples)
    for example, diff in zip(examples, batched):
        logits = model(model.to_tokens(example.prompt))[0, -1]
        io, subject = model.to_single_token(" " + example.io), model.to_single_token(" " + example.subject)
        torch.testing.assert_close(diff, logits[io] - logits[subject], atol=1e-4, rtol=1e-4)


def test_induction_scores_read_the_induction_diagonal(tiny):
    model, _ = tiny
    length = 7
    tokens = repeated_tokens(model, length, batch=3, seed=5)
    assert torch.equal(tokens[:, 1 : 1 + length], tokens[:, 1 + length :])
    result = induction(model, length=length, batch=3, seed=5)
    _, cache = model.run_with_cache(tokens)
    pattern = cache["blocks.0.attn.hook_pattern"]  # [batch, head, query, key]
    # the Main Demo's diagonal: every (query q, key q + 1 - length) entry of [BOS] R R
    entries = [pattern[:, :, q, q + 1 - length].mean(0) for q in range(length - 1, 2 * length + 1)]
    torch.testing.assert_close(result["scores"][0], torch.stack(entries).mean(0))
    shifted = [pattern[:, :, q, q + 2 - length].mean(0) for q in range(length - 2, 2 * length + 1)]
    torch.testing.assert_close(result["shifted_scores"][0], torch.stack(shifted).mean(0))
    assert result["loss_first_half"] > 0 and result["loss_second_half"] > 0


def test_training_is_reproducible(tmp_path):
    threads = str(torch.get_num_threads())
    for run in ("a", "b"):
        train.main(["tiny", "--steps", "10", "--batch-size", "8", "--threads", threads, "--out", str(tmp_path / run)])
    a, b = lenskit.load(tmp_path / "a"), lenskit.load(tmp_path / "b")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_sinusoidal_positions_start_w_pos_at_the_scaled_code():
    code = train.sinusoidal_code(16, 8)
    for pos, i in [(0, 0), (3, 1), (7, 2), (15, 3)]:  # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)
        angle = pos / 10000 ** (2 * i / 8)
        assert code[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert code[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    recipe = train.with_overrides(train.RECIPES["tiny"], sinusoidal_positions=0.1)
    model = train.build_model(recipe)
    assert torch.equal(model.W_pos, 0.1 * train.sinusoidal_code(model.cfg.n_ctx, model.cfg.d_model))
    assert not torch.equal(train.build_model(train.RECIPES["tiny"]).W_pos, model.W_pos)


@pytest.fixture(scope="module")
def shipped():
    """The default zoo model, and what `evaluate` measures on it (held-out data)."""
    model = lenskit.load(DEFAULT_MODEL)
    return model, evaluate(model)


def test_the_default_model_is_shipped_small_and_loads_offline(shipped):
    model, _ = shipped
    cfg = model.cfg
    assert DEFAULT_MODEL.removeprefix("lenskit/") in lenskit.zoo_names()
    assert cfg.n_layers >= 2 and cfg.d_mlp > 0 and cfg.normalization_type == "LN"
    assert cfg.positional_embedding_type == "standard" and cfg.default_prepend_bos
    folder = ZOO_ROOT / DEFAULT_MODEL.removeprefix("lenskit/")
    assert sum(f.stat().st_size for f in ZOO_ROOT.rglob("*") if f.is_file()) < 10 * 2**20
    assert {"model.safetensors", "tokenizer.json", "train_log.csv", CARD_FILE} <= {f.name for f in folder.iterdir()}
    text = "When Mary and John went to the store, John gave a drink to Mary."
    assert model.to_string(model.to_tokens(text, prepend_bos=False)[0]) == text
    assert model.to_str_tokens(text)[:3] == ["<bos>", "When", " Mary"]


def test_the_default_model_has_learned_ioi_and_copying(shipped):
    _, metrics = shipped
    assert metrics["ioi_logit_diff"] >= 3.0  # held-out names in held-out templates
    assert metrics["ioi_accuracy"] >= 0.95
    assert metrics["induction_score"] >= 0.6  # TransformerLens' induction diagonal, on repeated random tokens
    assert metrics["loss_second_half"] <= 0.5 * metrics["loss_first_half"]


def test_the_model_card_reports_what_evaluate_measures(shipped):
    _, metrics = shipped
    card = (ZOO_ROOT / DEFAULT_MODEL.removeprefix("lenskit/") / CARD_FILE).read_text()
    for key in ("ioi_logit_diff", "ioi_logit_diff_no_bos", "ioi_logit_diff_train_names_templates"):
        assert f"| {metrics[key]:.2f} |" in card, key
    assert f"{metrics['ioi_accuracy']:.1%}" in card and f"{metrics['induction_score']:.2f}" in card
    assert f"{metrics['shifted_induction_head']}: {metrics['shifted_induction_score']:.2f}" in card
    assert metrics["induction_score_length_20"] == metrics["induction_score"]  # the same measurement
    by_length = [metrics[f"induction_score_length_{length}"] for length in (10, 20, 30)]
    assert " / ".join(f"{score:.2f}" for score in by_length) in card
