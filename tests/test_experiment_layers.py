"""The layers reproduction: each row's loss, top tokens and generation equal the same schedule run by hand,
calling TransformerLens' blocks one after another; the full row equals the plain model."""

import pytest
import torch
import transformers
from conftest import STORIES_DIR, blocks_by_hand, make_model, word_tokenizer
from tokenizers import pre_tokenizers

import lenskit
from lenskit import experiments
from lenskit.experiments.layers import STORY, material
from lenskit.zoo import DEFAULT_MODEL

COLUMNS = ["schedule", "layers run", "loss", "Δ loss", "top 5 next", "generation"]
ZOO_SCHEDULES = {  # 4 blocks
    "full": (0, 1, 2, 3), "skip last 1": (0, 1, 2), "skip last 2": (0, 1), "skip last 3": (0,),
    "skip first 1": (1, 2, 3), "skip first 2": (2, 3), "skip first 3": (3,), "skip 1..2": (0, 3),
    "repeat 0 x2": (0, 0, 1, 2, 3), "repeat 1 x2": (0, 1, 1, 2, 3), "repeat 2 x2": (0, 1, 2, 2, 3),
    "repeat 3 x2": (0, 1, 2, 3, 3), "order 0 2 1 3": (0, 2, 1, 3), "order 3 2 1 0": (3, 2, 1, 0),
}
STORIES_SCHEDULES = {  # 5 blocks
    "full": (0, 1, 2, 3, 4), "skip last 1": (0, 1, 2, 3), "skip last 2": (0, 1, 2), "skip last 3": (0, 1),
    "skip last 4": (0,), "skip first 1": (1, 2, 3, 4), "skip first 2": (2, 3, 4), "skip first 3": (3, 4),
    "skip first 4": (4,), "skip 1..3": (0, 4), "repeat 0 x2": (0, 0, 1, 2, 3, 4), "repeat 1 x2": (0, 1, 1, 2, 3, 4),
    "repeat 2 x2": (0, 1, 2, 2, 3, 4), "repeat 3 x2": (0, 1, 2, 3, 3, 4), "repeat 4 x2": (0, 1, 2, 3, 4, 4),
    "order 0 1 3 2 4": (0, 1, 3, 2, 4), "order 4 3 2 1 0": (4, 3, 2, 1, 0),
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
            generated = torch.cat([generated, blocks_by_hand(model, generated, blocks)[:, -1].argmax(-1, keepdim=True)], 1)
        assert row["generation"] == model.to_string(generated[0, rows[0].shape[1]:]), name
    full = model.generate(rows[0], max_new_tokens=12, do_sample=False, use_past_kv_cache=False, stop_at_eos=False,
                          verbose=False)
    assert table["generation"][0] == model.to_string(full[0, rows[0].shape[1]:])


def check_all_but_one_block_degrades(table):
    loss = table.set_index("schedule")["loss"]
    n_layers = len(table["layers run"][0])
    for name in [f"skip last {n_layers - 1}", f"skip first {n_layers - 1}", "order " + " ".join(map(str, range(n_layers)[::-1]))]:
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
