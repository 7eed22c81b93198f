"""Metric specs, each checked against a hand computation on random logits."""

import pytest
import torch
from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

from lenskit import metrics


@pytest.fixture(scope="module")
def logits():
    """[batch=3, pos=5, d_vocab=13]"""
    return torch.randn(3, 5, 13, generator=torch.Generator().manual_seed(0)) * 3


@pytest.fixture(scope="module")
def model(word_model):
    return word_model


def test_logit_diff(logits, model):
    assert metrics.logit_diff(4, 7)(logits).item() == pytest.approx((logits[:, -1, 4] - logits[:, -1, 7]).mean().item())
    per_prompt = metrics.logit_diff([1, 2, 3], [4, 5, 6], pos=[0, -1])(logits)
    expected = torch.stack([(logits[b, [0, 4], 1 + b] - logits[b, [0, 4], 4 + b]).mean() for b in range(3)]).mean()
    assert per_prompt.item() == pytest.approx(expected.item())
    bound = metrics.logit_diff(["cat", "dog", "mat"], "the", pos=2).bind(model)  # ids 5, 11, 9 and 4
    assert bound.answer.tolist() == [5, 11, 9] and bound.wrong.tolist() == [4]
    assert bound.columns().tolist() == [4, 5, 9, 11]  # all it reads
    assert bound(logits).item() == pytest.approx((logits[[0, 1, 2], 2, [5, 11, 9]] - logits[:, 2, 4]).mean().item())


def test_prob_rank_loss_kl(logits, model):
    probs = logits.softmax(-1)
    assert metrics.prob(3)(logits).item() == pytest.approx(probs[:, -1, 3].mean().item())
    assert metrics.prob("cat", pos=1).bind(model)(logits).item() == pytest.approx(probs[:, 1, 5].mean().item())
    ranks = [(logits[b, -1] > logits[b, -1, 3]).sum().item() for b in range(3)]
    assert metrics.rank(3)(logits).item() == pytest.approx(sum(ranks) / 3)
    assert not metrics.rank(3).differentiable and metrics.prob(3).differentiable

    targets = torch.randint(0, 13, (3, 5), generator=torch.Generator().manual_seed(1))
    assert metrics.loss(targets)(logits).item() == pytest.approx(lm_cross_entropy_loss(logits, targets).item())
    log_probs = logits.log_softmax(-1)
    expected = (
        -(log_probs[:, 1].gather(-1, targets[:, 2:3]).mean() + log_probs[:, 3].gather(-1, targets[:, 4:5]).mean()) / 2
    )
    assert metrics.loss(pos=[1, 3]).bind(model, tokens=targets)(logits).item() == pytest.approx(expected.item())

    reference = torch.randn(3, 5, 13, generator=torch.Generator().manual_seed(2))
    expected = torch.nn.functional.kl_div(
        logits[:, -1].log_softmax(-1), reference[:, -1].log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert metrics.kl_to(reference)(logits).item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics.kl_to().bind(model, logits=logits)(logits).item() == pytest.approx(0.0, abs=1e-6)


def test_reads_only_its_positions_and_columns(logits):
    """select() keeps what the metric reads, and per_prompt on it gives the metric's value."""
    for metric in (
        metrics.logit_diff([1, 2, 3], 5, pos=[1, 3]),
        metrics.prob(2),
        metrics.loss(torch.zeros(3, 5, dtype=torch.long)),
    ):
        selected = metric.select(logits)
        columns = metric.columns()
        assert selected.shape == (3, len(metric.positions(5)), 13 if columns is None else len(columns))
        assert metric.per_prompt(selected).mean().item() == pytest.approx(metric(logits).item())


def test_errors_name_the_problem(logits, model):
    with pytest.raises(ValueError, match=r"'cat sat' is not a single token: it splits into 2 tokens"):
        metrics.logit_diff("cat sat", "dog").bind(model)
    with pytest.raises(ValueError, match=r"must be bound to a model first: metric.bind\(model\)"):
        metrics.logit_diff("cat", "dog")(logits)
    with pytest.raises(ValueError, match="2 tokens given for a batch of 3 prompts"):
        metrics.logit_diff([1, 2], 3)(logits)
    with pytest.raises(ValueError, match=r"loss: no targets .*lenskit.patch does this"):
        metrics.loss()(logits)
    with pytest.raises(ValueError, match="kl_to: no reference logits"):
        metrics.kl_to()(logits)
    with pytest.raises(ValueError, match="position 4 is the last one and has no next token"):
        metrics.loss(torch.zeros(3, 5, dtype=torch.long), pos=-1)(logits)
    with pytest.raises(ValueError, match=r"metric position 5 out of range for 5 positions"):
        metrics.prob(1, pos=5)(logits)
    with pytest.raises(ValueError, match="kl_to reference cover 2 prompts, the logits 3"):
        metrics.kl_to(logits[:2])(logits)
