"""`lenskit.llama2c` against references written here from llama2.c's documented format.

The references (a numpy forward pass, run.c's encode) read the raw files with numpy/struct,
independently of lenskit's reader. Tests on the real `stories260K` model skip when
``../shared/models/stories260K`` is absent; the synthetic-checkpoint tests always run.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lenskit.llama2c import Llama2cTokenizer, load_llama2c

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"
STORIES_BIN = STORIES / "stories260K.bin"
STORIES_TOK = STORIES / "tok512.bin"
requires_stories = pytest.mark.skipif(not STORIES_BIN.is_file(), reason=f"{STORIES} not present")


# --- references -------------------------------------------------------------------------


def read_raw_checkpoint(path: Path) -> dict:
    """Header fields and float64 weight arrays of a legacy llama2.c checkpoint, read with numpy."""
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = np.fromfile(path, dtype="<i4", count=7).tolist()
    shared = vocab > 0
    vocab = abs(vocab)
    head_dim, kv_dim = dim // n_heads, n_kv_heads * dim // n_heads
    floats = np.fromfile(path, dtype="<f4", offset=28).astype(np.float64)
    arrays, offset = {}, 0
    for name, shape in [
        ("emb", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("rope_tables", (2, seq_len, head_dim // 2)),
        ("wcls", (0 if shared else vocab, dim)),
    ]:
        size = int(np.prod(shape))
        arrays[name] = floats[offset : offset + size].reshape(shape)
        offset += size
    assert offset == len(floats)
    if shared:
        arrays["wcls"] = arrays["emb"]
    return dict(arrays, n_heads=n_heads, n_kv_heads=n_kv_heads)


def reference_logits(w: dict, tokens: list[int]) -> np.ndarray:
    """[pos, vocab] logits: pre-norm RMSNorm, GQA, adjacent-pair RoPE, SwiGLU, final norm, wcls."""
    n, dim = len(tokens), w["emb"].shape[1]
    n_heads, n_kv_heads = w["n_heads"], w["n_kv_heads"]
    head_dim = dim // n_heads

    def rms(x, weight):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * weight

    angles = np.arange(n)[:, None] * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)  # [pos, head_dim/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

    def rope(x):  # [pos, head, head_dim], rotating (x[2i], x[2i+1])
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    causal = np.triu(np.full((n, n), -np.inf), k=1)
    x = w["emb"][tokens]
    for layer in range(len(w["wq"])):
        h = rms(x, w["rms_att"][layer])
        q = rope((h @ w["wq"][layer].T).reshape(n, n_heads, head_dim))
        k = rope((h @ w["wk"][layer].T).reshape(n, n_kv_heads, head_dim))
        v = (h @ w["wv"][layer].T).reshape(n, n_kv_heads, head_dim)
        k, v = (np.repeat(a, n_heads // n_kv_heads, axis=1) for a in (k, v))  # query head h uses kv head h // group
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim) + causal
        pattern = np.exp(scores - scores.max(-1, keepdims=True))
        pattern /= pattern.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", pattern, v).reshape(n, dim) @ w["wo"][layer].T
        h = rms(x, w["rms_ffn"][layer])
        gate = h @ w["w1"][layer].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rms(x, w["rms_final"]) @ w["wcls"].T


def read_raw_tokenizer(path: Path) -> tuple[list[bytes], list[float]]:
    raw = path.read_bytes()
    pieces, scores, offset = [], [], 4
    while offset < len(raw):
        score, length = struct.unpack_from("<fi", raw, offset)
        pieces.append(raw[offset + 8 : offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    return pieces, scores


def run_c_encode(pieces: list[bytes], scores: list[float], text: str) -> list[int]:
    """llama2.c run.c's encode(text, bos=0, eos=0)."""
    lookup: dict[bytes, int] = {}
    for index, piece in enumerate(pieces):
        lookup.setdefault(piece, index)
    ids = []
    for char in " " + text if text else "":
        code = char.encode("utf-8")
        ids += [lookup[code]] if code in lookup else [byte + 3 for byte in code]
    while True:
        merges = [
            (scores[lookup[pieces[a] + pieces[b]]], -i, lookup[pieces[a] + pieces[b]])
            for i, (a, b) in enumerate(zip(ids, ids[1:]))
            if pieces[a] + pieces[b] in lookup
        ]
        if not merges:
            return ids
        _, minus_i, merged = max(merges)  # best score, leftmost on ties
        ids[-minus_i : -minus_i + 2] = [merged]


def lenskit_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].double().numpy()


# --- synthetic checkpoints (always run) -------------------------------------------------


def write_checkpoint(path: Path, dim=16, hidden=24, n_layers=2, n_heads=4, n_kv_heads=2, vocab=-265, seq_len=32):
    """A random llama2.c v0 checkpoint; negative vocab means a separate wcls at the end."""
    head_dim, kv_dim, v, L = dim // n_heads, n_kv_heads * dim // n_heads, abs(vocab), n_layers
    shapes = [
        (v, dim),
        (L, dim),
        (L, dim, dim),
        (L, kv_dim, dim),
        (L, kv_dim, dim),
        (L, dim, dim),
        (L, dim),
        (L, hidden, dim),
        (L, dim, hidden),
        (L, hidden, dim),
        (dim,),
        (2, seq_len, head_dim // 2),
    ]
    shapes += [(v, dim)] if vocab < 0 else []
    rng = np.random.default_rng(0)
    arrays = [rng.normal(0, 0.5, shape) for shape in shapes]
    for norm in (1, 6, 10):  # rms_att, rms_ffn, rms_final
        arrays[norm] = 1 + 0.2 * arrays[norm]
    with open(path, "wb") as f:
        f.write(np.array([dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len], dtype="<i4").tobytes())
        for a in arrays:
            f.write(a.astype("<f4").tobytes())


def write_tokenizer(path: Path, merges: list[tuple[str, float]]):
    """llama2.c tok*.bin: <unk>, BOS, EOS, the 256 byte tokens, then `merges` (piece, score)."""
    pieces = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
    pieces += [(f"<0x{b:02X}>".encode(), 0.0) for b in range(256)]
    pieces += [(piece.encode(), score) for piece, score in merges]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p, _ in pieces)))
        for piece, score in pieces:
            f.write(struct.pack("<fi", score, len(piece)) + piece)


SYNTHETIC_MERGES = [(" ", -1.0), ("a", -1.0), ("b", -1.0), (" a", -3.0), ("ab", -2.0), (" ab", -4.0)]


@pytest.mark.parametrize("n_kv_heads", [2, 4])
@pytest.mark.parametrize("fold_ln", [True, False])
def test_synthetic_checkpoint_with_separate_wcls_matches_reference(tmp_path, n_kv_heads, fold_ln):
    write_checkpoint(tmp_path / "tiny.bin", n_kv_heads=n_kv_heads)
    model = load_llama2c(tmp_path / "tiny.bin", fold_ln=fold_ln)
    assert model.tokenizer is None
    assert model.cfg.d_vocab == 265 and model.cfg.n_layers == 2
    tokens = np.random.default_rng(1).integers(0, 265, 20).tolist()
    expected = reference_logits(read_raw_checkpoint(tmp_path / "tiny.bin"), tokens)
    np.testing.assert_allclose(lenskit_logits(model, tokens), expected, atol=1e-4, rtol=0)


def test_finds_the_tokenizer_with_the_checkpoints_vocab_size(tmp_path):
    write_checkpoint(tmp_path / "tiny.bin")
    write_tokenizer(tmp_path / "tok265.bin", SYNTHETIC_MERGES)
    write_tokenizer(tmp_path / "tok259.bin", [])
    model = load_llama2c(tmp_path)  # a folder: its one non-tokenizer .bin
    assert model.tokenizer.name_or_path.endswith("tok265.bin")
    pieces, scores = read_raw_tokenizer(tmp_path / "tok265.bin")
    for text in ["ab a", "aab b", "b\xe9a"]:
        assert model.to_tokens(text, prepend_bos=False)[0].tolist() == run_c_encode(pieces, scores, text)
    assert model.to_string(model.to_tokens("b\xe9a")[0]) == "<s> b\xe9a"


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_llama2c(tmp_path / "nope.bin")
    write_checkpoint(tmp_path / "tiny.bin")
    with pytest.raises(FileNotFoundError, match="tok.bin"):
        load_llama2c(tmp_path / "tiny.bin", tokenizer_path=tmp_path / "tok.bin")


@pytest.mark.parametrize(
    "header, field",
    [
        (dict(n_heads=3), "n_heads"),
        (dict(hidden=0), "hidden_dim"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(vocab=0), "vocab_size"),
    ],
)
def test_bad_header_raises_value_error_naming_the_field(tmp_path, header, field):
    write_checkpoint(tmp_path / "bad.bin", **header)
    with pytest.raises(ValueError, match=field):
        load_llama2c(tmp_path / "bad.bin")


# --- stories260K (skipped without ../shared) --------------------------------------------


@pytest.fixture(scope="module")
def stories():
    return load_llama2c(STORIES_BIN)


@requires_stories
@pytest.mark.parametrize("fold_ln", [True, False])
def test_stories260K_logits_match_numpy_reference(stories, fold_ln):
    model = stories if fold_ln else load_llama2c(STORIES_BIN, fold_ln=False)
    assert model.cfg.normalization_type == ("RMSPre" if fold_ln else "RMS")
    tokens = model.to_tokens("Once upon a time, there was a big dog named Max. He liked to run and jump.")[0].tolist()
    assert 18 <= len(tokens) <= 30
    expected = reference_logits(read_raw_checkpoint(STORIES_BIN), tokens)
    np.testing.assert_allclose(lenskit_logits(model, tokens), expected, atol=1e-4, rtol=0)


@requires_stories
def test_stories260K_greedy_decoding_from_bos(stories):
    bos = torch.tensor([[1]])
    generated = stories.generate(bos, max_new_tokens=36, do_sample=False, verbose=False)
    assert stories.to_string(generated[0, 1:]).startswith(
        " Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    )


TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Hello, world! It's 3:45pm... (really?) [yes] {no} #1 @home 50% a+b=c",
    "line one\nline two\n\n  indented\tand tabbed",
    "caf\xe9 na\xefve r\xe9sum\xe9",
    "I love \U0001f642 and \U0001f436!",
    "<s> literal specials </s>",
    "",
]


@requires_stories
@pytest.mark.parametrize("text", TEXTS)
def test_stories260K_tokenizer_is_run_c_encode(stories, text):
    pieces, scores = read_raw_tokenizer(STORIES_TOK)
    expected = run_c_encode(pieces, scores, text)
    assert stories.to_tokens(text, prepend_bos=False)[0].tolist() == expected
    assert stories.to_tokens(text)[0].tolist() == [1] + expected
    assert stories.to_string(expected) == (" " + text if text else "")


@requires_stories
def test_stories260K_str_tokens(stories):
    assert stories.to_str_tokens("Once upon a time") == ["<s>", " Once", " upon", " a", " time"]
    assert stories.to_str_tokens("\U0001f642", prepend_bos=False) == [" "] + ["\ufffd"] * 4  # 4 byte tokens
    text = TEXTS[1]
    assert "".join(stories.to_str_tokens(text, prepend_bos=False)) == " " + text


@requires_stories
def test_stories260K_tokenizer_save_and_reload(stories, tmp_path):
    stories.tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.bin").read_bytes() == STORIES_TOK.read_bytes()
    reloaded = Llama2cTokenizer.from_pretrained(tmp_path)
    assert reloaded(TEXTS[1]).input_ids == stories.tokenizer(TEXTS[1]).input_ids


@requires_stories
def test_stories260K_truncated_checkpoint_raises_value_error(tmp_path):
    truncated = tmp_path / "stories260K.bin"
    truncated.write_bytes(STORIES_BIN.read_bytes()[:-100])
    shutil.copy(STORIES_TOK, tmp_path)
    size = STORIES_BIN.stat().st_size
    with pytest.raises(ValueError, match=rf"stories260K\.bin.*expected {size} bytes.*got {size - 100} bytes"):
        load_llama2c(truncated)
