"""lenskit.cache and lenskit.shards against TransformerLens' own run_with_cache / ActivationCache, on random-weight models."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerFast

from lenskit.cache import decompose_residual, residual_stream
from lenskit.run import Run
from lenskit.shards import load_cache, stream_cache

TESTS = Path(__file__).parent


def random_model(seed: int = 0, **config) -> HookedTransformer:
    """conftest's GPT-2-shaped model with a byte-sized vocabulary (257: the bytes and <|endoftext|>)."""
    return make_model("gpt2", seed, d_vocab=257, **config)


def byte_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer, built offline: 256 byte tokens and <|endoftext|> (id 256) as BOS and EOS."""
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = 256
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", add_bos_token=True
    ).save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module")
def gpt2_like(tmp_path_factory):
    model = random_model()
    model.set_tokenizer(byte_tokenizer(tmp_path_factory.mktemp("tokenizer")))
    return model


@pytest.fixture(scope="module")
def rotary_model():
    return random_model(
        normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, n_key_value_heads=2, act_fn="silu"
    )


@pytest.fixture(scope="module")
def parallel_model():
    return random_model(parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=4)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(0))


# --- residual_stream -----------------------------------------------------------------------

EXPECTED_NAMES = {
    "pre": [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
        "blocks.2.hook_resid_pre",
        "blocks.2.hook_resid_post",
    ],
    "mid": ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid", "blocks.2.hook_resid_mid"],
    "post": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"],
    "all": [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_mid",
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_resid_mid",
        "blocks.2.hook_resid_pre",
        "blocks.2.hook_resid_mid",
        "blocks.2.hook_resid_post",
    ],
}


@pytest.mark.parametrize("kind", ["pre", "mid", "post", "all"])
def test_residual_stream_equals_run_with_cache(gpt2_like, tokens, kind):
    _, cache = gpt2_like.run_with_cache(tokens)
    resid = residual_stream(gpt2_like, tokens, kind)
    assert resid.dims == ("component", "batch", "pos", "d_model")
    assert resid.labels["component"] == EXPECTED_NAMES[kind]
    for got, name in zip(resid.tensor, EXPECTED_NAMES[kind]):
        assert torch.equal(got, cache[name]), name
    if kind in ("pre", "all"):
        accumulated = cache.accumulated_resid(incl_mid=kind == "all")
        torch.testing.assert_close(resid.tensor, accumulated, atol=1e-6, rtol=0)


def test_residual_stream_layer_subset_stops_early(gpt2_like, tokens):
    _, cache = gpt2_like.run_with_cache(tokens)
    final = residual_stream(gpt2_like, tokens, "pre", layers=[0, 3])
    assert final.labels["component"] == ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_post"]
    assert torch.equal(final.tensor[1], cache["blocks.2.hook_resid_post"])

    fired = []
    spy = [
        (name, lambda activation, hook: fired.append(hook.name))
        for name in ("blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre", "ln_final.hook_normalized")
    ]
    with gpt2_like.hooks(fwd_hooks=spy):
        first = residual_stream(gpt2_like, tokens, "all", layers=range(1))
        assert fired == ["blocks.0.hook_mlp_out"]  # block 0 ran, blocks 1 and 2 did not
        fired.clear()
        residual_stream(gpt2_like, tokens, "post")
        assert "ln_final.hook_normalized" not in fired  # no final norm, no unembedding
    assert first.labels["component"] == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid"]
    assert torch.equal(first.tensor[1], cache["blocks.0.hook_resid_mid"])


def test_residual_stream_from_text(gpt2_like):
    text = ["The cat sat", "on the mat!"]
    assert torch.equal(
        residual_stream(gpt2_like, text).tensor, residual_stream(gpt2_like, gpt2_like.to_tokens(text)).tensor
    )


def test_residual_stream_errors(gpt2_like, parallel_model, tokens):
    with pytest.raises(ValueError, match=r"layers \[3\] out of range: kind='post' takes layers 0..2"):
        residual_stream(gpt2_like, tokens, "post", layers=[0, 3])
    with pytest.raises(ValueError, match=r"layers \[-1\] out of range: kind='pre' takes layers 0..3"):
        residual_stream(gpt2_like, tokens, "pre", layers=[-1])
    with pytest.raises(ValueError, match="kind must be"):
        residual_stream(gpt2_like, tokens, "middle")
    for kind in ("mid", "all"):  # TransformerLens itself raises KeyError('blocks.0.hook_resid_mid')
        with pytest.raises(ValueError, match="parallel_attn_mlp"):
            residual_stream(parallel_model, tokens, kind)
    assert len(residual_stream(parallel_model, tokens, "post")) == 3


# --- decompose_residual --------------------------------------------------------------------


@pytest.mark.parametrize("which", ["gpt2_like", "rotary_model", "parallel_model"])
def test_decompose_residual_sums_to_residual_stream(request, tokens, which):
    model = request.getfixturevalue(which)
    _, cache = model.run_with_cache(tokens)
    parts = decompose_residual(model, tokens)
    embeddings = ["hook_embed", "hook_pos_embed"] if which == "gpt2_like" else ["hook_embed"]
    blocks = [f"blocks.{layer}.hook_{part}_out" for layer in range(3) for part in ("attn", "mlp")]
    assert parts.labels["component"] == embeddings + blocks
    torch.testing.assert_close(parts.sum("component"), cache["blocks.2.hook_resid_post"], atol=1e-5, rtol=0)
    upto_1 = decompose_residual(model, tokens, layer=1)
    assert len(upto_1) == len(embeddings) + 2
    torch.testing.assert_close(upto_1.sum("component"), cache["blocks.1.hook_resid_pre"], atol=1e-5, rtol=0)


def test_decompose_residual_equals_activation_cache(gpt2_like, tokens):
    _, cache = gpt2_like.run_with_cache(tokens)
    reference, _ = cache.decompose_resid(return_labels=True)
    torch.testing.assert_close(decompose_residual(gpt2_like, tokens).tensor, reference, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"layer 4 out of range: 0..3"):
        decompose_residual(gpt2_like, tokens, layer=4)


def test_a_run_serves_both_views_and_keeps_what_they_cached(gpt2_like, tokens):
    run = Run(gpt2_like, tokens)
    stream = residual_stream(gpt2_like, run, "post")
    assert all(name in run for name in stream.labels["component"])
    fired = []
    with gpt2_like.hooks(fwd_hooks=[("hook_embed", lambda activation, hook: fired.append(hook.name))]):
        assert torch.equal(residual_stream(gpt2_like, run, "post").tensor, stream.tensor)
        assert not fired  # nothing recomputed
        parts = decompose_residual(gpt2_like, run)
    assert fired == ["hook_embed"]  # one pass for the parts the run lacked
    torch.testing.assert_close(parts.sum("component"), stream.tensor[-1], atol=1e-5, rtol=0)


# --- stream_cache / load_cache -------------------------------------------------------------


def token_batches(n_rows: int = 24, pos: int = 8, seed: int = 1) -> list[torch.Tensor]:
    """Random token batches of uneven sizes (5, 3, 5, 3, ...), n_rows rows of `pos` tokens."""
    rows = torch.randint(0, 257, (n_rows, pos), generator=torch.Generator().manual_seed(seed))
    sizes = []
    while sum(sizes) < n_rows:
        sizes.append(min((5, 3)[len(sizes) % 2], n_rows - sum(sizes)))
    return list(rows.split(sizes))


def mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process (Linux /proc/self/maps), or None."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *fields = line.split(maxsplit=5)
        low, high = (int(bound, 16) for bound in span.split("-"))
        if low <= address < high:
            return fields[4].strip() if len(fields) == 5 else None
    return None


def test_stream_cache_equals_run_with_cache(gpt2_like, tmp_path):
    batches = token_batches()
    names = "blocks.*.hook_resid_post"
    out = stream_cache(
        gpt2_like, batches, names, tmp_path / "f32", dtype=torch.float32, shard_tokens=40, batch_size=2, progress=False
    )
    stream_cache(gpt2_like, batches, names, tmp_path / "f16", shard_tokens=40, batch_size=2, progress=False)
    every_row = torch.cat(batches)
    _, reference = gpt2_like.run_with_cache(every_row)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["names"] == [f"blocks.{layer}.hook_resid_post" for layer in range(3)]
    assert manifest["complete"] and manifest["dtype"] == "float32" and manifest["n_tokens"] == 24 * 8
    assert [shard["rows"] for shard in manifest["shards"]] == [5, 5, 5, 5, 4]  # 40 tokens // 8 = 5 rows a shard
    assert manifest["shapes"]["blocks.0.hook_resid_post"] == [8, 32]

    cache = load_cache(out)
    assert len(cache) == 24 and cache.n_shards == 5
    assert torch.equal(cache.tokens, every_row)
    for name in cache.names:
        torch.testing.assert_close(cache[name], reference[name], atol=1e-5, rtol=0)
        torch.testing.assert_close(load_cache(tmp_path / "f16")[name].float(), reference[name], atol=2e-3, rtol=1e-3)
        assert torch.equal(torch.cat([shard[name] for shard in cache.iter_shards()]), cache[name])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
def test_load_cache_is_memory_mapped(gpt2_like, tmp_path):
    batches = token_batches()
    stream_cache(
        gpt2_like,
        batches,
        ["blocks.1.hook_resid_mid"],
        tmp_path,
        dtype=torch.float32,
        shard_tokens=1000,
        progress=False,
    )
    shard = load_cache(tmp_path).shard(0)
    activation = shard["blocks.1.hook_resid_mid"]
    assert mapped_file(activation.data_ptr()) == os.path.realpath(tmp_path / "shard_00000.safetensors")
    _, reference = gpt2_like.run_with_cache(torch.cat(batches), names_filter="blocks.1.hook_resid_mid")
    torch.testing.assert_close(activation, reference["blocks.1.hook_resid_mid"], atol=1e-5, rtol=0)


def test_stream_cache_texts_become_bos_led_rows(gpt2_like, tmp_path):
    texts = ["Once upon a time", "there was a cat.", "", "It sat on a very long mat indeed."]
    stream_cache(gpt2_like, texts, "blocks.0.hook_resid_pre", tmp_path, max_len=10, shard_tokens=20, progress=False)
    cache = load_cache(tmp_path)
    bos = eos = gpt2_like.tokenizer.bos_token_id
    joined = [t for text in texts for t in gpt2_like.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]]
    expected = torch.tensor([[bos] + joined[i : i + 9] for i in range(0, len(joined) - 8, 9)])
    assert cache.manifest["source"] == "texts" and len(cache) == len(joined) // 9
    assert torch.equal(cache.tokens, expected)
    _, reference = gpt2_like.run_with_cache(expected)
    torch.testing.assert_close(
        cache["blocks.0.hook_resid_pre"].float(), reference["blocks.0.hook_resid_pre"], atol=2e-3, rtol=1e-3
    )


def test_stream_cache_errors(gpt2_like, tmp_path):
    batches = token_batches()
    with pytest.raises(ValueError, match="unknown hook name 'blocks.0.hook_resid_postt'"):
        stream_cache(gpt2_like, batches, "blocks.0.hook_resid_postt", tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="empty"):
        stream_cache(gpt2_like, [], "blocks.0.hook_resid_post", tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="do not fire"):  # hook_result only fires with use_attn_result
        stream_cache(gpt2_like, batches, ["blocks.0.attn.hook_result"], tmp_path / "c", progress=False)

    stream_cache(gpt2_like, batches, "blocks.0.hook_resid_post", tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="different names"):
        stream_cache(gpt2_like, batches, "blocks.1.hook_resid_post", tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="different model"):  # same config, other weights
        stream_cache(random_model(seed=5), batches, "blocks.0.hook_resid_post", tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="other tokens"):
        stream_cache(gpt2_like, token_batches(seed=2), "blocks.0.hook_resid_post", tmp_path / "d", progress=False)


# --- kill -9 and resume ----------------------------------------------------------------------

N_SHARDS = 12  # 24 rows of 8 tokens, 2 rows a shard


def run_kill_test_stream(out_dir: str, seconds_per_forward: float = 0.0) -> None:
    """The stream the kill test interrupts: also run, in a subprocess, slowed down by a sleeping hook."""
    model = random_model(seed=3)
    if seconds_per_forward:
        model.add_hook("hook_embed", lambda activation, hook: time.sleep(seconds_per_forward))
    stream_cache(
        model, token_batches(), "blocks.*.hook_resid_*", out_dir, shard_tokens=16, batch_size=1, progress=False
    )


def test_stream_cache_resumes_after_kill_9(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_cache; test_cache.run_kill_test_stream({str(killed)!r}, 0.1)"
    child = subprocess.Popen([sys.executable, "-c", script], cwd=TESTS.parent)
    try:
        deadline = time.monotonic() + 60
        while len(list(killed.glob("shard_*.safetensors"))) < 2:  # 0.2 s a shard once started
            assert child.poll() is None and time.monotonic() < deadline, "the streaming subprocess ended early"
            time.sleep(0.01)
        time.sleep(0.1)  # half-way through the next shard
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    finished = {path: path.stat().st_ino for path in killed.glob("shard_*.safetensors")}
    assert 2 <= len(finished) < N_SHARDS
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    (killed / f"shard_{N_SHARDS - 1:05d}.safetensors.tmp").write_bytes(b"\x00" * 100)  # as if killed mid-write

    run_kill_test_stream(str(killed))
    run_kill_test_stream(str(clean))
    assert {path: path.stat().st_ino for path in finished} == finished  # finished shards were not recomputed
    files = sorted(path.name for path in clean.iterdir())
    assert (
        files
        == sorted(path.name for path in killed.iterdir())
        == ["manifest.json"] + [f"shard_{index:05d}.safetensors" for index in range(N_SHARDS)]
    )
    for name in files:
        assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
    assert len(load_cache(killed)) == 24
