"""The IOI reproduction: every number of its table equals a plain TransformerLens computation on the
same prompts, run one prompt at a time (no grouping, no lenskit patching or attribution)."""

import pytest
import torch
import transformers
from conftest import STORIES_DIR, WORDS, make_model, word_tokenizer

import lenskit
from lenskit import experiments
from lenskit.experiments import ioi
from lenskit.zoo import DEFAULT_MODEL

DEMO_WORDS = [
    "<unk>",
    "<bos>",
    "<eos>",
    "<pad>",
    *sorted(
        {w for sentence, *names in ioi.DEMO_FRAMES for w in [*sentence.replace(",", " ,").split(), *names] if w != "{}"}
    ),
]
TOLERANCE = dict(rel=1e-3, abs=1e-5)
"""Logit differences and attributions: float32 sums in another order. (The random config models' values
are small, about 0.01, hence a relative bound too.) Normalised patching cells are held to abs 1e-3."""


def worded(kind, words, folder):
    """A config model of shape `kind` (random weights) with a word-level tokenizer over `words`."""
    model = make_model(kind, d_vocab=len(words))
    word_tokenizer(words).save_pretrained(folder)
    model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(folder))
    return model


@pytest.fixture(scope="module")
def zoo():
    return lenskit.load(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def zoo_result(zoo):
    return experiments.run("ioi", zoo, progress=False)


@pytest.fixture(scope="module", params=["zoo", "gpt2", "llama", "neox"])
def case(request, tmp_path_factory):
    """(model, its reproduction): the zoo model on held-out prompts, config models on the demo's prompts."""
    if request.param == "zoo":
        return request.getfixturevalue("zoo"), request.getfixturevalue("zoo_result")
    model = worded(request.param, DEMO_WORDS, tmp_path_factory.mktemp("tokenizer"))
    return model, experiments.run("ioi", model, progress=False)


def table_rows(result, measurement: str) -> list[tuple[str, float]]:
    rows = result.table[result.table["measurement"] == measurement]
    return list(zip(rows["component"], rows["value"]))


def value(result, measurement: str) -> float:
    ((_, number),) = table_rows(result, measurement)
    return number


def prompts(model):
    """[(clean tokens [1, pos], corrupted tokens [1, pos], IO id, S id)] of the prompts the reproduction uses."""
    _, clean, corrupted = ioi.choose_prompts(model)
    return [
        (
            model.to_tokens(e.prompt),
            model.to_tokens(c),
            model.to_single_token(" " + e.io),
            model.to_single_token(" " + e.subject),
        )
        for e, c in zip(clean, corrupted)
    ]


def logit_diff(logits, io, s):
    return (logits[0, -1, io] - logits[0, -1, s]).item()


def roles(tokens, io, s):
    """Positions of IO, S1, S1+1, S2, END, found by reading the tokens."""
    ids = tokens[0].tolist()
    s1 = ids.index(s)
    return {"IO": ids.index(io), "S1": s1, "S1+1": s1 + 1, "S2": ids.index(s, s1 + 1), "END": len(ids) - 1}


def patched_by_hand(model, name, cell):
    """The mean patched logit difference, normalised: each prompt's corrupted run with `name`'s activation
    at cell(tokens, io, s) (an index into it) taken from its clean run."""
    clean_sum = corrupted_sum = patched_sum = 0.0
    for clean, corrupted, io, s in prompts(model):
        clean_logits, cache = model.run_with_cache(clean, names_filter=name)
        index = cell(clean, io, s)

        def put_clean(activation, hook):
            activation[index] = cache[name][index]
            return activation

        clean_sum += logit_diff(clean_logits, io, s)
        corrupted_sum += logit_diff(model(corrupted), io, s)
        patched_sum += logit_diff(model.run_with_hooks(corrupted, fwd_hooks=[(name, put_clean)]), io, s)
    return (patched_sum - corrupted_sum) / (clean_sum - corrupted_sum)


@torch.no_grad()
def test_logit_differences_and_accuracy_equal_plain_forward_passes(case):
    model, result = case
    clean = torch.tensor([logit_diff(model(c), io, s) for c, _, io, s in prompts(model)])
    corrupted = torch.tensor([logit_diff(model(x), io, s) for _, x, io, s in prompts(model)])
    assert value(result, "logit difference, clean") == pytest.approx(clean.mean().item(), **TOLERANCE)
    assert value(result, "logit difference, corrupted") == pytest.approx(corrupted.mean().item(), **TOLERANCE)
    assert value(result, "accuracy, clean") == (clean > 0).float().mean().item()


@torch.no_grad()
def test_top_heads_equal_the_demos_attribution_from_the_cache(case):
    """As in the demo: stack_head_results at the last position, apply_ln_to_stack, dot the logit-difference
    direction (times the final norm's weight, which these models keep unfolded); mean over prompts."""
    model, result = case
    total = 0
    for clean, _, io, s in prompts(model):
        _, cache = model.run_with_cache(clean)
        per_head = cache.apply_ln_to_stack(cache.stack_head_results(layer=-1, pos_slice=-1), layer=-1, pos_slice=-1)
        direction = (model.W_U[:, io] - model.W_U[:, s]) * model.ln_final.w
        total = total + per_head[:, 0] @ direction  # [layer * head]
    expected = total / len(prompts(model))
    top = expected.abs().argsort(descending=True)[: ioi.TOP].tolist()
    rows = table_rows(result, "direct logit attribution")
    assert [name for name, _ in rows] == [f"{i // model.cfg.n_heads}.{i % model.cfg.n_heads}" for i in top]
    assert [number for _, number in rows] == pytest.approx(expected[top].tolist(), **TOLERANCE)
    assert "<table" in result.figures[0].html


@torch.no_grad()
def test_patched_cells_equal_hooked_runs_by_hand(case):
    model, result = case
    resid_rows = table_rows(result, "resid_pre patching (normalised)")
    assert len(resid_rows) == model.cfg.n_layers
    for component, number in resid_rows:
        name, role = component.split(" at ")
        expected = patched_by_hand(model, name, lambda tokens, io, s: (slice(None), roles(tokens, io, s)[role]))
        assert number == pytest.approx(expected, abs=1e-3), component
    for component, number in table_rows(result, "head output (z) patching (normalised)"):
        layer, head = map(int, component.split("."))
        expected = patched_by_hand(model, f"blocks.{layer}.attn.hook_z", lambda *_: (slice(None), slice(None), head))
        assert number == pytest.approx(expected, abs=1e-3), component


def test_the_zoo_model_does_ioi(zoo_result):
    result = zoo_result
    clean, corrupted = value(result, "logit difference, clean"), value(result, "logit difference, corrupted")
    assert clean > 2 and corrupted == pytest.approx(-clean, abs=1e-4)  # twins: the answer flips
    assert value(result, "accuracy, clean") >= 0.8
    assert "48 prompts (held-out names in held-out zoo templates)" in result.notes
    best_patched = max(number for _, number in table_rows(result, "head output (z) patching (normalised)"))
    assert best_patched > 0.5  # one head's output carries most of the answer
    assert len(result.figures) == 5  # and path patching into the name movers' queries
    assert result.numbers["name_movers"] == [[2, 1]]


def test_demo_prompts_and_their_flipped_twins():
    clean, corrupted = ioi.ioi_prompts(ioi.DEMO_FRAMES)
    assert [(e.prompt, e.io, e.subject) for e in clean[:2]] == [
        ("When John and Mary went to the shops, John gave the bag to", "Mary", "John"),
        ("When John and Mary went to the shops, Mary gave the bag to", "John", "Mary"),
    ]
    assert corrupted[:2] == [clean[1].prompt, clean[0].prompt]
    assert len(clean) == 8


def test_a_model_that_reads_neither_prompt_set_is_told_why(tmp_path):
    model = worded("gpt2", WORDS, tmp_path)
    with pytest.raises(
        ValueError, match="no IOI prompt set suits .*'When John and Mary .*' has a word the tokenizer does not know"
    ):
        experiments.run("ioi", model, progress=False)


def test_a_prompt_without_a_repeated_subject_is_refused(zoo):
    example = ioi.IOIExample("When Alice and Bob went to the store, Alice gave a drink to", "Alice", "Bob")
    with pytest.raises(ValueError, match="names the IO once and the subject twice"):
        ioi.role_positions(zoo, zoo.to_tokens(example.prompt)[0], example)


def test_stories260k_names_split_so_it_is_told_why():
    if not STORIES_DIR.exists():
        pytest.skip("../shared/models/stories260K is not present")
    with pytest.raises(ValueError, match="is not a single token"):
        experiments.run("ioi", lenskit.load(STORIES_DIR), progress=False)
