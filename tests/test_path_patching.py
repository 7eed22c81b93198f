"""lenskit.path_patch against the IOI paper's two-runs-per-sender recipe (tests/reference/path_patching.py),
on config models with biases (LayerNorm), grouped-query attention (RMSNorm, rotary) and parallel attention."""

import math

import pytest
import torch
from conftest import make_model
from reference.path_patching import caches, path_patch_two_runs

import lenskit
from lenskit import metrics

pytestmark = pytest.mark.both_backends

TOLERANCE = 1e-4


def token_pair(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, model.cfg.d_vocab, (2,), generator=generator)
    corrupted[:, 4] = torch.randint(0, model.cfg.d_vocab, (2,), generator=generator)
    return clean, corrupted


@pytest.fixture(scope="module", params=["gpt2", "llama", "neox"])
def model(request):
    return make_model(request.param)


def test_heads_to_logits_equal_the_two_run_reference(model):
    clean, corrupted = token_pair(model)
    metric = metrics.logit_diff(5, 7)
    result = lenskit.path_patch(model, clean, corrupted, metric, progress=False)
    assert result.dims == ("layer", "head") and result.shape == (model.cfg.n_layers, model.cfg.n_heads)
    bound = metric.bind(model)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            expected = path_patch_two_runs(model, clean, corrupted, bound, (layer, head))
            assert result.tensor[layer, head].item() == pytest.approx(expected, abs=TOLERANCE), (layer, head)
    assert result.corrupted_value == pytest.approx(bound(model(corrupted)).item(), abs=TOLERANCE)
    assert result.clean_value == pytest.approx(bound(model(clean)).item(), abs=TOLERANCE)


def test_mlps_to_logits_equal_the_reference(model):
    clean, corrupted = token_pair(model, seed=4)
    metric = metrics.logit_diff(1, 2)
    result = lenskit.path_patch(model, clean, corrupted, metric, senders="mlps", progress=False)
    assert result.dims == ("layer",)
    for layer in range(model.cfg.n_layers):
        expected = path_patch_two_runs(model, clean, corrupted, metric.bind(model), (layer, None))
        assert result.tensor[layer].item() == pytest.approx(expected, abs=TOLERANCE)


def test_heads_to_receiver_queries_keys_values_equal_the_reference(model):
    clean, corrupted = token_pair(model, seed=5)
    n_kv = lenskit.hooks.n_key_value_heads(model)
    receivers = [(1, 1, "q"), (2, n_kv - 1, "k")] if model.cfg.n_layers > 2 else [(1, 1, "q"), (1, 0, "v")]
    metric = metrics.logit_diff(3, 9)
    result = lenskit.path_patch(model, clean, corrupted, metric, receivers=receivers, progress=False)
    last = max(layer for layer, _, _ in receivers)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            value = result.tensor[layer, head].item()
            if layer >= last:
                assert math.isnan(value)  # reaches no receiver
                continue
            expected = path_patch_two_runs(model, clean, corrupted, metric.bind(model), (layer, head), receivers)
            assert value == pytest.approx(expected, abs=TOLERANCE), (layer, head)


def test_value_receivers_and_mlp_senders_on_a_grouped_model():
    model = make_model("llama")
    clean, corrupted = token_pair(model, seed=6)
    receivers = [(2, 0, "v"), (2, 1, "q")]
    metric = metrics.logit_diff(2, 11)
    result = lenskit.path_patch(
        model, clean, corrupted, metric, senders=[0, (1, 3), (1, 0)], receivers=receivers, progress=False
    )
    assert result.dims == ("sender",) and result.labels["sender"] == ["MLP0", "L1H3", "L1H0"]
    for value, sender in zip(result.tensor.tolist(), [(0, None), (1, 3), (1, 0)]):
        expected = path_patch_two_runs(model, clean, corrupted, metric.bind(model), sender, receivers)
        assert value == pytest.approx(expected, abs=TOLERANCE)


def test_chunking_does_not_change_the_numbers():
    model = make_model("gpt2")
    clean, corrupted = token_pair(model)
    metric = metrics.logit_diff(5, 7)
    for receivers in ("logits", [(2, 0, "q")]):
        one = lenskit.path_patch(model, clean, corrupted, metric, receivers=receivers, max_senders=1, progress=False)
        many = lenskit.path_patch(model, clean, corrupted, metric, receivers=receivers, progress=False)
        torch.testing.assert_close(one.tensor, many.tensor, equal_nan=True, rtol=0, atol=1e-5)


def test_a_sender_with_no_effect_leaves_the_corrupted_value():
    model = make_model("gpt2")
    clean, _ = token_pair(model)
    result = lenskit.path_patch(model, clean, clean, metrics.logit_diff(5, 7), progress=False)
    torch.testing.assert_close(result.tensor, torch.full_like(result.tensor, result.corrupted_value), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(senders="attn"), "senders must be 'heads', 'mlps' or a non-empty list"),
        (dict(senders=[(0, 9)]), r"sender head 9 is out of range: 0..3"),
        (dict(senders=[(5, 0)]), r"sender layer 5 is out of range: 0..2"),
        (dict(senders=["L0H1"]), "is neither"),
        (dict(receivers="resid"), "receivers must be 'logits' or a list"),
        (dict(receivers=[(1, 0, "z")]), r"is not \(layer, head, 'q'\|'k'\|'v'\)"),
        (dict(receivers=[(0, 0, "q")]), "is in layer 0: no sender comes before it"),
        (dict(receivers=[(1, 2, "k")]), r"receiver k head 2 is out of range: 0..1"),  # 2 key/value heads
        (dict(max_senders=0), "max_senders must be at least 1"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    model = make_model("llama")
    clean, corrupted = token_pair(model)
    with pytest.raises(ValueError, match=message):
        lenskit.path_patch(model, clean, corrupted, metrics.logit_diff(5, 7), progress=False, **kwargs)
    assert not any(hook.fwd_hooks for hook in model.hook_dict.values())


def test_shapes_must_match():
    model = make_model("gpt2")
    clean, corrupted = token_pair(model)
    with pytest.raises(ValueError, match=r"same shape \[batch, pos\]; got \(2, 7\) and \(2, 6\)"):
        lenskit.path_patch(model, clean, corrupted[:, :6], metrics.logit_diff(5, 7), progress=False)


def test_smollm2_name_mover_paths_equal_the_reference(smollm2):
    prompt = "When Mary and John went to the store, John gave a drink to"
    corrupted = "When Mary and John went to the store, Mary gave a drink to"
    metric = metrics.logit_diff(" Mary", " John")
    senders = [(23, 3), (29, 1), (10, 4), (5, 0)]
    result = lenskit.path_patch(smollm2, prompt, corrupted, metric, senders=senders, progress=False)
    to_queries = lenskit.path_patch(
        smollm2, prompt, corrupted, metric, senders=senders[2:], receivers=[(23, 3, "q"), (24, 4, "q")], progress=False
    )
    clean_tokens, corrupted_tokens = smollm2.to_tokens(prompt), smollm2.to_tokens(corrupted)
    bound = metric.bind(smollm2)
    runs = caches(smollm2, clean_tokens, corrupted_tokens)
    for value, sender in zip(result.tensor.tolist(), senders):
        expected = path_patch_two_runs(smollm2, clean_tokens, corrupted_tokens, bound, sender, runs=runs)
        assert value == pytest.approx(expected, abs=1e-3)
    for value, sender in zip(to_queries.tensor.tolist(), senders[2:]):
        expected = path_patch_two_runs(
            smollm2, clean_tokens, corrupted_tokens, bound, sender, [(23, 3, "q"), (24, 4, "q")], runs
        )
        assert value == pytest.approx(expected, abs=1e-3)
