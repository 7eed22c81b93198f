"""lenskit.models: each route of `load` checked against an independent reference, all offline.

Hugging Face folders are checked against the Hugging Face model itself (same random weights,
eager attention, float32): next-token log-probabilities agree within 1e-4, with and without
TransformerLens's weight processing.
"""

import json
import socket
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import STORIES_DIR, WORDS, make_model, word_tokenizer
from transformer_lens import HookedTransformer

from lenskit import models
from lenskit.models import load, save, zoo_names

VOCAB = 101
SIZES = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    intermediate_size=96,
    vocab_size=VOCAB,
    max_position_embeddings=32,
)
HF_CONFIGS = {
    "GPT2LMHeadModel": lambda: transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=1, eos_token_id=2
    ),
    "GPTNeoForCausalLM": lambda: transformers.GPTNeoConfig(
        num_layers=2,
        hidden_size=64,
        num_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
    ),
    "GPTJForCausalLM": lambda: transformers.GPTJConfig(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, rotary_dim=8
    ),
    "GPTNeoXForCausalLM": lambda: transformers.GPTNeoXConfig(rotary_pct=0.5, **SIZES),
    "OPTForCausalLM": lambda: transformers.OPTConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_dim=96,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        word_embed_proj_dim=64,
    ),
    "BloomForCausalLM": lambda: transformers.BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=VOCAB),
    "LlamaForCausalLM": lambda: transformers.LlamaConfig(num_key_value_heads=2, **SIZES),
    "MistralForCausalLM": lambda: transformers.MistralConfig(num_key_value_heads=2, **SIZES),
    "MixtralForCausalLM": lambda: transformers.MixtralConfig(
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **SIZES
    ),
    "Qwen2ForCausalLM": lambda: transformers.Qwen2Config(num_key_value_heads=2, **SIZES),
    "Qwen3ForCausalLM": lambda: transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **SIZES),
    "Phi3ForCausalLM": lambda: transformers.Phi3Config(num_key_value_heads=4, pad_token_id=0, **SIZES),
    "OlmoeForCausalLM": lambda: transformers.OlmoeConfig(
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, **SIZES
    ),
    "Olmo3ForCausalLM": lambda: transformers.Olmo3Config(num_key_value_heads=2, **SIZES),
}
UNPROCESSED = dict(fold_ln=False, center_writing_weights=False, center_unembed=False)


def randomise_(hf_model: torch.nn.Module) -> None:
    """Every parameter random: norm weights around 1, all else (biases included) around 0."""
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            is_norm = "norm" in name or ".ln_" in name
            param.copy_(1 + 0.1 * torch.randn_like(param) if is_norm else 0.05 * torch.randn_like(param))


def save_hf_model(architecture: str, folder: Path) -> torch.nn.Module:
    """Save a random HF model of `architecture` in `folder` (GPT-2 with a tokenizer); return it."""
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(
        HF_CONFIGS[architecture](), attn_implementation="eager"
    ).eval()
    assert type(hf_model).__name__ == architecture
    randomise_(hf_model)
    hf_model.save_pretrained(folder)
    if architecture == "GPT2LMHeadModel":
        word_tokenizer().save_pretrained(folder)
    return hf_model


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def hf_folder(request, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """(folder, model) for each architecture."""
    folder = tmp_path_factory.mktemp(request.param)
    return folder, save_hf_model(request.param, folder)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    save_hf_model("GPT2LMHeadModel", folder)
    return folder


@pytest.fixture(scope="module")
def hf_tokens() -> torch.Tensor:
    """[batch=3, pos=16] random token ids (conftest's `tokens` suit conftest's models)."""
    return torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("lenskit.load tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_hf_architectures_are_the_tested_ones():
    assert set(models.HF_ARCHITECTURES) == set(HF_CONFIGS)


@pytest.mark.parametrize("processed", [True, False], ids=["processed", "unprocessed"])
def test_hf_folder_matches_hf_log_probs(hf_folder, hf_tokens, processed, no_network):
    folder, hf_model = hf_folder
    model = load(str(folder), **({} if processed else UNPROCESSED))
    assert isinstance(model, HookedTransformer)
    folded = processed and model.cfg.original_architecture != "Olmo3ForCausalLM"  # post-norm: never folded
    assert model.cfg.normalization_type.endswith("Pre") == folded
    with torch.no_grad():
        expected = hf_model(hf_tokens).logits.log_softmax(-1)
        actual = model(hf_tokens).log_softmax(-1)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_hf_folder_tokenizer(hf_folder, no_network):
    folder, _ = hf_folder
    model = load(folder)
    if not (folder / "tokenizer.json").exists():
        assert model.tokenizer is None
        return
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    assert model.to_tokens("the cat sat", prepend_bos=False)[0].tolist() == reference("the cat sat").input_ids
    assert model.to_tokens("the cat sat")[0].tolist() == [WORDS.index("<bos>"), *reference("the cat sat").input_ids]


def test_load_hides_transformer_lens_deprecation(gpt2_folder, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save(load(gpt2_folder), tmp_path)
        load(tmp_path)
    assert not [w for w in caught if "HookedTransformer" in str(w.message)]


def test_save_load_round_trip(hf_folder, hf_tokens, tmp_path):
    folder, _ = hf_folder
    model = load(folder)
    save(model, tmp_path)
    with_tokenizer = model.tokenizer is not None
    assert {p.name for p in tmp_path.iterdir()} == {"hooked_transformer.json", "model.safetensors"} | (
        {"tokenizer.json"} if with_tokenizer else set()
    )
    config = json.loads((tmp_path / "hooked_transformer.json").read_text())
    assert config["dtype"] == "float32" and ("tokenizer" in config) == with_tokenizer
    reloaded = load(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(hf_tokens), model(hf_tokens))
    if with_tokenizer:
        for prepend_bos in (True, False):
            assert torch.equal(
                reloaded.to_tokens("the dog ran", prepend_bos=prepend_bos),
                model.to_tokens("the dog ran", prepend_bos=prepend_bos),
            )


def test_lenskit_folder_dtype_and_device(tmp_path, tokens):
    model = make_model("llama")
    save(model, tmp_path)
    reloaded = load(tmp_path, dtype="float64", device="cpu")
    assert reloaded.W_E.dtype == torch.float64 and reloaded.W_E.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).float(), model(tokens), atol=1e-4, rtol=0)


def test_zoo(monkeypatch, tmp_path, tokens):
    monkeypatch.setattr(models, "ZOO_ROOT", tmp_path)
    model = make_model("gpt2")
    save(model, tmp_path / "tiny")
    (tmp_path / "not-a-checkpoint").mkdir()
    assert zoo_names() == ["tiny"]
    with torch.no_grad():
        assert torch.equal(load("lenskit/tiny")(tokens), model(tokens))
    with pytest.raises(ValueError, match="lenskit/tiny"):
        load("lenskit/tiyn")


def test_zoo_root_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "ZOO_ROOT", tmp_path / "absent")
    assert zoo_names() == []


@pytest.mark.parametrize("name", ["gpt2", "gpt2-small", "pythia-70m", "EleutherAI/pythia-70m"])
def test_transformer_lens_name_passes_through(monkeypatch, name):
    calls = []
    monkeypatch.setattr(HookedTransformer, "from_pretrained", lambda *args, **kwargs: calls.append((args, kwargs)))
    load(name, fold_ln=False, device="cpu", dtype=torch.float16)
    assert calls == [((name,), dict(fold_ln=False, device="cpu", dtype=torch.float16))]


def fail_from_pretrained(*args, **kwargs):
    raise AssertionError("from_pretrained must not be reached")


def test_unknown_name_lists_close_matches(monkeypatch):
    monkeypatch.setattr(HookedTransformer, "from_pretrained", fail_from_pretrained)
    with pytest.raises(ValueError, match="gpt2-smal.*gpt2-small"):
        load("gpt2-smal")


def test_missing_path(monkeypatch, tmp_path):
    monkeypatch.setattr(HookedTransformer, "from_pretrained", fail_from_pretrained)
    for missing in (str(tmp_path / "absent"), "checkpoints/model.bin", "model.safetensors"):
        with pytest.raises(FileNotFoundError, match=missing):
            load(missing)
    with pytest.raises(FileNotFoundError, match="EleutherAI/pythia-70m"):
        load("EleutherAI/pythia-70n")
    with pytest.raises(FileNotFoundError, match="holds no model"):
        load(tmp_path)


def test_missing_weights(gpt2_folder, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text((gpt2_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load(tmp_path / "hf")
    save(make_model("gpt2"), tmp_path / "lenskit")
    (tmp_path / "lenskit" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load(tmp_path / "lenskit")


@pytest.mark.parametrize("kind", ["hf", "lenskit"])
def test_truncated_weights(gpt2_folder, tmp_path, kind):
    if kind == "hf":
        (tmp_path / "config.json").write_text((gpt2_folder / "config.json").read_text())
        weights = (gpt2_folder / "model.safetensors").read_bytes()
    else:
        save(make_model("gpt2"), tmp_path)
        weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooBarForCausalLM"], "model_type": "foobar"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="FooBarForCausalLM.*LlamaForCausalLM"):
        load(tmp_path)


def test_llama2c_dispatch(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("lenskit.llama2c")
    fake.load_llama2c = lambda path, **kwargs: calls.append((Path(path), kwargs))
    monkeypatch.setitem(sys.modules, "lenskit.llama2c", fake)
    (tmp_path / "stories.bin").write_bytes(b"")
    (tmp_path / "tok512.bin").write_bytes(b"")
    load(tmp_path / "stories.bin", fold_ln=False)
    load(tmp_path, device="cpu")
    assert calls == [(tmp_path / "stories.bin", dict(fold_ln=False)), (tmp_path / "stories.bin", dict(device="cpu"))]
    (tmp_path / "other.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="other.bin.*stories.bin"):
        load(tmp_path)


@pytest.mark.skipif(not (STORIES_DIR / "stories260K.bin").exists(), reason="stories260K not present")
def test_llama2c_stories260k():
    pytest.importorskip("lenskit.llama2c")
    model = load(STORIES_DIR)
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab) == (5, 64, 512)


def test_config_file_builds_a_seeded_random_model(tmp_path):
    fields = dict(
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        n_ctx=20,
        d_vocab=50,
        act_fn="gelu",
        normalization_type="LN",
        seed=3,
    )
    path = tmp_path / "shape.json"
    path.write_text(json.dumps(fields))
    model, again, other_seed = load(path), load(str(path)), load(path, seed=4)
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab) == (2, 16, 50)
    tokens = torch.arange(10)[None]
    torch.testing.assert_close(model(tokens), again(tokens), rtol=0, atol=0)
    assert not torch.allclose(model(tokens), other_seed(tokens))


def test_bad_config_files(tmp_path):
    (tmp_path / "typo.json").write_text(json.dumps({"n_layer": 2, "d_model": 16}))
    with pytest.raises(ValueError, match="fields HookedTransformerConfig does not know: n_layer"):
        load(tmp_path / "typo.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load(tmp_path / "broken.json")
