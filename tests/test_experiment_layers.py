"""The layers reproduction: each row's loss, top tokens and generation equal the same schedule run by hand,
calling TransformerLens' blocks one after another; the full row equals the plain model. On SmolLM2-135M
the seed study's losses, agreements, angular distances and generations equal hand computations too."""

import gzip

import pytest
import torch
import transformers
from conftest import STORIES_DIR, blocks_by_hand, make_model, word_tokenizer
from tokenizers import pre_tokenizers

import lenskit
from lenskit import experiments
from lenskit.experiments import corpus
from lenskit.experiments.layers import SEED_PROMPTS, STORY, material
from lenskit.zoo import DEFAULT_MODEL

COLUMNS = ["schedule", "layers run", "loss", "Δ loss", "top 5 next", "generation"]
ZOO_SCHEDULES = {  # 4 blocks
    "full": (0, 1, 2, 3),
    "skip last 1": (0, 1, 2),
    "skip last 2": (0, 1),
    "skip last 3": (0,),
    "skip first 1": (1, 2, 3),
    "skip first 2": (2, 3),
    "skip first 3": (3,),
    "skip 1..2": (0, 3),
    "repeat 0 x2": (0, 0, 1, 2, 3),
    "repeat 1 x2": (0, 1, 1, 2, 3),
    "repeat 2 x2": (0, 1, 2, 2, 3),
    "repeat 3 x2": (0, 1, 2, 3, 3),
    "order 0 2 1 3": (0, 2, 1, 3),
    "order 3 2 1 0": (3, 2, 1, 0),
}
STORIES_SCHEDULES = {  # 5 blocks
    "full": (0, 1, 2, 3, 4),
    "skip last 1": (0, 1, 2, 3),
    "skip last 2": (0, 1, 2),
    "skip last 3": (0, 1),
    "skip last 4": (0,),
    "skip first 1": (1, 2, 3, 4),
    "skip first 2": (2, 3, 4),
    "skip first 3": (3, 4),
    "skip first 4": (4,),
    "skip 1..3": (0, 4),
    "repeat 0 x2": (0, 0, 1, 2, 3, 4),
    "repeat 1 x2": (0, 1, 1, 2, 3, 4),
    "repeat 2 x2": (0, 1, 2, 2, 3, 4),
    "repeat 3 x2": (0, 1, 2, 3, 3, 4),
    "repeat 4 x2": (0, 1, 2, 3, 4, 4),
    "order 0 1 3 2 4": (0, 1, 3, 2, 4),
    "order 4 3 2 1 0": (4, 3, 2, 1, 0),
}


def cross_entropy_by_hand(logits, tokens):
    """-log p(next token) at every position but the last: [pos - 1]."""
    return -logits[0, :-1].log_softmax(-1).gather(-1, tokens[0, 1:, None])[:, 0]


@torch.no_grad()
def check_against_hand(model, table):
    prompt, texts = material(model)
    rows = [model.to_tokens(text) for text in [prompt, *texts]]
    plain = torch.cat([model(row, return_type="loss", loss_per_token=True)[0] for row in rows]).mean().item()
    assert list(table.columns) == COLUMNS
    assert table["schedule"][0] == "full" and table["loss"][0] == pytest.approx(plain, abs=1e-5)
    assert table["Δ loss"].tolist() == pytest.approx((table["loss"] - plain).tolist(), abs=1e-5)
    for row in table.to_dict("records"):
        blocks, name = row["layers run"], row["schedule"]
        logits = [blocks_by_hand(model, tokens, blocks) for tokens in rows]
        loss = torch.cat([cross_entropy_by_hand(lg, tokens) for lg, tokens in zip(logits, rows)]).mean().item()
        assert row["loss"] == pytest.approx(loss, abs=1e-5), name
        assert row["top 5 next"] == " ".join(map(repr, model.to_str_tokens(logits[0][0, -1].topk(5).indices))), name
        generated = rows[0]
        for _ in range(12):
            generated = torch.cat(
                [generated, blocks_by_hand(model, generated, blocks)[:, -1].argmax(-1, keepdim=True)], 1
            )
        assert row["generation"] == model.to_string(generated[0, rows[0].shape[1] :]), name
    full = model.generate(
        rows[0], max_new_tokens=12, do_sample=False, use_past_kv_cache=False, stop_at_eos=False, verbose=False
    )
    assert table["generation"][0] == model.to_string(full[0, rows[0].shape[1] :])


def check_all_but_one_block_degrades(table):
    loss = table.set_index("schedule")["loss"]
    n_layers = len(table["layers run"][0])
    for name in [
        f"skip last {n_layers - 1}",
        f"skip first {n_layers - 1}",
        "order " + " ".join(map(str, range(n_layers)[::-1])),
    ]:
        assert loss[name] > loss["full"] + 1.0, name


def test_zoo_model():
    model = lenskit.load(DEFAULT_MODEL)
    result = experiments.run("layers", model, progress=False)
    table = result.table
    assert dict(zip(table["schedule"], table["layers run"])) == ZOO_SCHEDULES
    assert material(model)[0] == "When Claire and Mary went to the shop, Mary gave a drink to"
    assert len(material(model)[1]) == 8
    check_against_hand(model, table)
    check_all_but_one_block_degrades(table)
    assert "<table" in result.figures[0].html and "order 3 2 1 0" in result.figures[0].html


def test_stories260k():
    if not (STORIES_DIR / "stories260K.bin").is_file():
        pytest.skip(f"{STORIES_DIR} is not present")
    model = lenskit.load(STORIES_DIR)
    table = experiments.run("layers", model, progress=False).table
    assert dict(zip(table["schedule"], table["layers run"])) == STORIES_SCHEDULES
    assert material(model) == STORY
    check_against_hand(model, table)
    check_all_but_one_block_degrades(table)
    assert table["generation"][0].startswith(", there was a little girl named Lily")


def worded_model(kind, words, folder):
    """A random config model of shape `kind` whose word-level vocabulary is `words` (four special tokens first)."""
    words = ["<unk>", "<bos>", "<eos>", "<pad>", *words]
    model = make_model(kind, d_vocab=len(words))
    word_tokenizer(words).save_pretrained(folder)
    model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(folder))
    return model


@pytest.mark.parametrize("kind", ["gpt2", "llama", "neox"])
def test_config_models_reading_the_story(kind, tmp_path):
    prompt, (text,) = STORY
    words = sorted({word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    model = worded_model(kind, words, tmp_path)
    table = experiments.run("layers", model, progress=False).table
    n_layers = model.cfg.n_layers
    assert len(table) == 1 + 2 * (n_layers - 1) + (n_layers >= 3) + n_layers + (n_layers >= 4) + 1
    check_against_hand(model, table)


def test_a_tokenizer_without_the_words_is_named(tmp_path):
    model = worded_model("gpt2", "the cat sat on a mat".split(), tmp_path)
    with pytest.raises(ValueError, match="neither the story 'Once upon a time, there was.*suit this model's tokenizer"):
        experiments.run("layers", model, progress=False)


# --- the seed study on SmolLM2-135M (conftest's `smollm2` fixture) ---------------------------

SEED_LAYERS = (0, 11, 28, 29)
SEED_OPTIONS = dict(
    n_passages=2, passage_tokens=12, counts=(1, 3), generation_counts=(0, 2), generate_tokens=3, layers=SEED_LAYERS
)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a busy machine idle threads spin and slow every small forward down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def seed(smollm2, one_thread):
    if not corpus.DEVIL_PATH.is_file():
        pytest.skip(f"{corpus.DEVIL_PATH} is not installed (apt-get install dict-devil)")
    return experiments.run("layers", smollm2, progress=False, **SEED_OPTIONS)


def angles_by_hand(residuals):
    """arccos(cos(x_l, x_{l+n})) / pi per position, averaged, with numpy: {(n, l): distance}."""
    import numpy as np

    x = residuals.double().numpy()
    out = {}
    for n in range(1, len(x)):
        for layer in range(len(x) - n):
            a, b = x[layer], x[layer + n]
            cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
            out[n, layer] = float(np.mean(np.arccos(np.clip(cosine, -1, 1)) / np.pi))
    return out


@torch.no_grad()
def test_seed_study_against_hand_computations(smollm2, seed):
    model, table = smollm2, seed.table
    n_layers = model.cfg.n_layers
    tokens = corpus.passages(model, 2, 12)
    text_ids = model.tokenizer(corpus.devils_dictionary(), add_special_tokens=False)["input_ids"]
    stride = len(text_ids) // 2
    assert tokens.tolist() == [text_ids[:12], text_ids[stride : stride + 12]]  # SmolLM2 prepends no BOS

    def by_hand(blocks):
        logits = blocks_by_hand(model, tokens, blocks)
        loss = torch.cat(
            [cross_entropy_by_hand(logits[i : i + 1], tokens[i : i + 1]) for i in range(len(tokens))]
        ).mean()
        return logits, loss.item()

    intact_logits, intact_loss = by_hand(range(n_layers))
    intact_top = intact_logits[:, :-1].argmax(-1)
    assert intact_loss == pytest.approx(model(tokens, return_type="loss").item(), abs=1e-4)
    _, cache = model.run_with_cache(tokens)
    residuals = torch.stack(
        [cache[f"blocks.{l}.hook_resid_pre"] for l in range(n_layers)]
        + [cache[f"blocks.{n_layers - 1}.hook_resid_post"]]
    )
    angles = angles_by_hand(residuals)

    expected_studies = (
        ["intact"] + ["delete"] * 4 + ["swap"] * 3 + ["skip last"] * 2 + ["skip first"] * 2 + ["remove block"] * 2
    )
    assert table["study"].tolist() == expected_studies
    assert table["layer"][1:8].tolist() == [0, 11, 28, 29, 0, 11, 28]
    for row in table.to_dict("records"):
        study, layer, n = row["study"], row["layer"], row["n"]
        if study == "intact":
            blocks = list(range(n_layers))
        elif study == "delete":
            blocks = [b for b in range(n_layers) if b != layer]
        elif study == "swap":
            blocks = list(range(n_layers))
            blocks[layer], blocks[layer + 1] = layer + 1, layer
        elif study == "skip last":
            blocks = list(range(n_layers - n))
        elif study == "skip first":
            blocks = list(range(n, n_layers))
        else:  # remove block: the n layers whose ends are closest in angle
            best = min(range(n_layers + 1 - n), key=lambda l: angles[n, l])
            assert layer == best, row["schedule"]
            blocks = [b for b in range(n_layers) if not layer <= b < layer + n]
        logits, loss = by_hand(blocks)
        top = logits[:, :-1].argmax(-1)
        assert row["layers run"] == len(blocks)
        assert row["loss"] == pytest.approx(loss, abs=2e-4), row["schedule"]
        assert row["Δ loss"] == pytest.approx(loss - intact_loss, abs=3e-4), row["schedule"]
        assert row["agreement"] == pytest.approx((top == intact_top).float().mean().item()), row["schedule"]
        assert row["accuracy"] == pytest.approx((top == tokens[:, 1:]).float().mean().item()), row["schedule"]
        if study in ("delete", "remove block"):
            assert row["angular distance"] == pytest.approx(angles[n, layer], abs=1e-5), row["schedule"]
        else:
            assert row["angular distance"] != row["angular distance"]  # NaN
    grid = seed.tables["angular distance d(x_l, x_l+n)"]
    assert grid.loc[3, "l=5"] == pytest.approx(angles[3, 5], abs=1e-5)
    assert seed.figures and "Angular distance" in seed.figures[2].html


@torch.no_grad()
def test_seed_generations_by_hand(smollm2, seed):
    generations = seed.tables["generations (last n layers skipped)"]
    assert generations["skip last"].tolist() == [0, 2]
    for row in generations.to_dict("records"):
        for prompt in SEED_PROMPTS:
            tokens = smollm2.to_tokens(prompt)
            for _ in range(3):
                logits = blocks_by_hand(smollm2, tokens, range(smollm2.cfg.n_layers - row["skip last"]))
                tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], 1)
            assert row[prompt] == smollm2.to_string(tokens[0, -3:]), (row["skip last"], prompt)
    full = smollm2.generate(
        SEED_PROMPTS[1],
        max_new_tokens=3,
        do_sample=False,
        use_past_kv_cache=False,
        stop_at_eos=False,
        verbose=False,
        return_type="tokens",
    )
    assert generations[SEED_PROMPTS[1]][0] == smollm2.to_string(full[0, -3:])


def test_seed_study_json(seed):
    import json

    numbers = json.loads(json.dumps(seed.to_dict(), allow_nan=False))
    assert numbers["rows"][0]["study"] == "intact" and numbers["rows"][0]["layer"] is None
    assert numbers["rows"][1]["agreement"] == pytest.approx(seed.table["agreement"][1])
    assert set(numbers["tables"]) == {"generations (last n layers skipped)", "angular distance d(x_l, x_l+n)"}


def test_corpus_from_the_installed_package_or_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dict-devil"):
        corpus.devils_dictionary(tmp_path / "devil.dict.dz")
    made = tmp_path / "tiny.dict.dz"
    made.write_bytes(
        gzip.compress(
            b"header\n\n   PREFACE\n\nA line\nwrapped  here.\n    Indented starts\nanother.\n\n"
            b"    Verse one\n    verse two\n"
        )
    )
    assert corpus.devils_dictionary(made) == "A line wrapped here.\n\nIndented starts another.\n\nVerse one\nverse two"


def test_seed_options_need_a_pretrained_model():
    with pytest.raises(ValueError, match="seed study only"):
        experiments.run("layers", lenskit.load(DEFAULT_MODEL), progress=False, counts=(1,))
