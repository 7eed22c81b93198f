"""The input contract of the loaders and the audio front end: each bad file or argument gets a lenskit error
that names it (never a raw JSONDecodeError, KeyError, struct.error, ZeroDivisionError, torch or safetensors
error, and never a model built from a config no model can have).

One table: (how the bad input is built in tmp_path, the expected error type, a word its message must
contain), over every entry point: `lenskit.load` (config .json, lenskit and Hugging Face folders, GGUF,
llama2.c .bin, names), `lenskit.whisper.load` (openai .pt, lenskit, Hugging Face and CTranslate2 folders),
`describe`, and audio (WAV files, samples, spectrograms, `transcribe`). Every model is tiny and built from
a config. Hypothesis then throws random WAV headers, configs, GGUF bytes and corrupted CTranslate2 files at them.
"""

import json
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import WORDS, make_model, word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_whisper_ctranslate2 import model_bin
from test_whisper_support import hf_whisper, one_torch_thread  # noqa: F401  (fixture)

import lenskit
from lenskit import whisper
from lenskit.errors import InputError, LenskitError, MissingFileError, ModelFileError
from lenskit.gguf import GGUFError
from lenskit.models import describe
from lenskit.whisper import HookedWhisper, WhisperConfig
from lenskit.whisper.convert import _hf_name_to_openai
from lenskit.whisper.ctranslate2 import CTranslate2FormatError

TEXT = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=16, d_vocab=20, act_fn="gelu")
SPEECH = WhisperConfig(
    n_mels=80,
    n_audio_ctx=4,
    n_audio_state=16,
    n_audio_head=2,
    n_audio_layer=1,
    n_vocab=51865,
    n_text_ctx=8,
    n_text_state=16,
    n_text_head=2,
    n_text_layer=1,
)  # 8 mel frames
SMALL = dict(
    n_mels=16,
    n_audio_ctx=4,
    n_audio_state=16,
    n_audio_head=2,
    n_audio_layer=1,
    n_vocab=40,
    n_text_ctx=8,
    n_text_state=16,
    n_text_head=2,
    n_text_layer=2,
)
DELETE = object()


# --- building the good inputs that the cases spoil -----------------------------------------------------


def ct2_variables(dims: dict, openai: dict) -> dict:
    """The WhisperSpec variables of ctranslate2's converter for an openai-whisper state dict (fused projections)."""
    zeros = torch.zeros(dims["n_audio_state"])
    out = {
        "encoder/num_heads": torch.tensor(dims["n_audio_head"], dtype=torch.int16),
        "decoder/num_heads": torch.tensor(dims["n_text_head"], dtype=torch.int16),
        "encoder/position_encodings/encodings": openai["encoder.positional_embedding"],
        "decoder/position_encodings/encodings": openai["decoder.positional_embedding"],
        "decoder/embeddings/weight": openai["decoder.token_embedding.weight"],
    }
    for name in ("conv1", "conv2"):
        for kind in ("weight", "bias"):
            out[f"encoder/{name}/{kind}"] = openai[f"encoder.{name}.{kind}"]
    for ours, theirs in (("encoder/layer_norm", "encoder.ln_post"), ("decoder/layer_norm", "decoder.ln")):
        out[f"{ours}/gamma"], out[f"{ours}/beta"] = openai[f"{theirs}.weight"], openai[f"{theirs}.bias"]
    for stack, n_layers in (("encoder", dims["n_audio_layer"]), ("decoder", dims["n_text_layer"])):
        for layer in range(n_layers):
            o, c = f"{stack}.blocks.{layer}", f"{stack}/layer_{layer}"
            attentions = [("attn", "self_attention", [["query", "key", "value"]])]
            if stack == "decoder":
                attentions.append(("cross_attn", "attention", [["query"], ["key", "value"]]))
            for ours, theirs, groups in attentions:
                for index, names in enumerate(groups + [["out"]]):
                    out[f"{c}/{theirs}/linear_{index}/weight"] = torch.cat(
                        [openai[f"{o}.{ours}.{n}.weight"] for n in names]
                    )
                    out[f"{c}/{theirs}/linear_{index}/bias"] = torch.cat(
                        [zeros if n == "key" else openai[f"{o}.{ours}.{n}.bias"] for n in names]
                    )
                norm = f"{o}.{ours}_ln"
                out[f"{c}/{theirs}/layer_norm/gamma"], out[f"{c}/{theirs}/layer_norm/beta"] = (
                    openai[f"{norm}.weight"],
                    openai[f"{norm}.bias"],
                )
            out[f"{c}/ffn/layer_norm/gamma"], out[f"{c}/ffn/layer_norm/beta"] = (
                openai[f"{o}.mlp_ln.weight"],
                openai[f"{o}.mlp_ln.bias"],
            )
            for index, theirs in ((0, "mlp.0"), (1, "mlp.2")):
                out[f"{c}/ffn/linear_{index}/weight"] = openai[f"{o}.{theirs}.weight"]
                out[f"{c}/ffn/linear_{index}/bias"] = openai[f"{o}.{theirs}.bias"]
    return {name: value.detach().contiguous() for name, value in out.items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Good inputs, each made once: folders and files that a case copies into its tmp_path and spoils."""
    root = tmp_path_factory.mktemp("good")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_model("gpt2", d_vocab=len(WORDS))
        tokenizer_folder = root / "tokenizer"
        word_tokenizer().save_pretrained(tokenizer_folder)
        model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(tokenizer_folder))
        lenskit.save(model, root / "text")
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
        ).save_pretrained(root / "hf")
        whisper.save(HookedWhisper(WhisperConfig(**SMALL)), root / "speech")
        hf = hf_whisper(WhisperConfig(**SMALL))
        hf.save_pretrained(root / "hf_whisper")
        openai = {_hf_name_to_openai(k): v for k, v in hf.state_dict().items() if k != "proj_out.weight"}
        torch.save({"dims": SMALL, "model_state_dict": openai}, root / "tiny.pt")
        ct2 = root / "ct2"
        ct2.mkdir()
        (ct2 / "model.bin").write_bytes(
            model_bin(ct2_variables(SMALL, openai), [("decoder/projection/weight", "decoder/embeddings/weight")])
        )
        (ct2 / "config.json").write_text(
            json.dumps({"suppress_ids": [3], "suppress_ids_begin": [2], "alignment_heads": [[1, 0]], "lang_ids": []})
        )
        (ct2 / "vocabulary.json").write_text(json.dumps([f"t{i}" for i in range(SMALL["n_vocab"])]))
    return root


def copy(base, name, tmp_path):
    """A copy of the good file or folder `name` in tmp_path."""
    copier = shutil.copytree if (base / name).is_dir() else shutil.copy
    return Path(copier(base / name, tmp_path / name))


def edit_json(path, **changes):
    """Rewrite the JSON object in `path` with `changes` (DELETE removes a key; dims_x edits dims' x)."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target, key = (data["dims"], key.removeprefix("dims_")) if key.startswith("dims_") else (data, key)
        if value is DELETE:
            target.pop(key)
        else:
            target[key] = value
    path.write_text(json.dumps(data))
    return path.parent


def text_config(tmp_path, **changes):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({k: v for k, v in (TEXT | changes).items() if v is not DELETE}))
    return path


def lenskit_folder(base, tmp_path, **changes):
    return edit_json(copy(base, "text", tmp_path) / "hooked_transformer.json", **changes)


def speech_folder(base, tmp_path, **changes):
    return edit_json(copy(base, "speech", tmp_path) / "hooked_whisper.json", **changes)


def write(path, data):
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def spoil(folder, name, data):
    """`folder`, with its file `name` replaced by `data` (bytes or text), or cut to half when data is None."""
    path = folder / name
    write(path, path.read_bytes()[: path.stat().st_size // 2] if data is None else data)
    return folder


def llama2c(path, dim=8, hidden=16, layers=1, heads=2, kv=2, vocab=20, seq=8, cut=0):
    """A llama2.c checkpoint of zeros with this header (its arrays `cut` floats short)."""
    head_dim = dim // heads if heads > 0 else 1
    floats = (
        vocab * dim
        + layers * (2 * dim + 2 * dim * dim + 2 * kv * head_dim * dim + 3 * hidden * dim)
        + dim
        + seq * head_dim
    )
    path.write_bytes(
        struct.pack("<7i", dim, hidden, layers, heads, kv, vocab, seq)
        + np.zeros(max(floats - cut, 0), np.float32).tobytes()
    )
    return path


def wav(path, fmt: bytes, data: bytes = bytes(64)):
    """A WAV file with this 'fmt ' chunk body and 'data' chunk."""
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return write(path, b"RIFF" + struct.pack("<I", len(body)) + body)


def fmt(encoding=1, channels=1, rate=16000, bits=16):
    """The 16 bytes of a 'fmt ' chunk (its byte rate and block size wrapped as the header's fields do)."""
    return struct.pack(
        "<HHIIHH", encoding, channels, rate, rate * channels * bits // 8 % 2**32, channels * bits // 8 % 2**16, bits
    )


def speech_model():
    return HookedWhisper(SPEECH)


# --- the table -------------------------------------------------------------------------------------------


def cases():
    """(id, build(base, tmp_path) -> the call that must fail, error type, word in the message)."""
    load, wload = lenskit.load, whisper.load
    nan = float("nan")
    return [
        # lenskit.load: a .json file of HookedTransformerConfig fields
        ("config-invalid-json", lambda b, t: lambda: load(write(t / "m.json", "{")), ModelFileError, "m.json"),
        ("config-not-an-object", lambda b, t: lambda: load(write(t / "m.json", "[1]")), ModelFileError, "JSON object"),
        ("config-empty", lambda b, t: lambda: load(write(t / "m.json", "{}")), ModelFileError, "d_model"),
        ("config-unknown-field", lambda b, t: lambda: load(text_config(t, n_layer=2)), ModelFileError, "n_layer"),
        (
            "config-n_layers-negative",
            lambda b, t: lambda: load(text_config(t, n_layers=-1)),
            ModelFileError,
            "n_layers=-1",
        ),
        ("config-n_layers-0", lambda b, t: lambda: load(text_config(t, n_layers=0)), ModelFileError, "n_layers"),
        ("config-d_model-0", lambda b, t: lambda: load(text_config(t, d_model=0)), ModelFileError, "d_model=0"),
        (
            "config-n_heads-not-dividing",
            lambda b, t: lambda: load(text_config(t, n_heads=3)),
            ModelFileError,
            "n_heads=3",
        ),
        ("config-d_vocab-negative", lambda b, t: lambda: load(text_config(t, d_vocab=-5)), ModelFileError, "d_vocab"),
        ("config-n_ctx-negative", lambda b, t: lambda: load(text_config(t, n_ctx=-1)), ModelFileError, "n_ctx"),
        ("config-d_mlp-float", lambda b, t: lambda: load(text_config(t, d_mlp=1.5)), ModelFileError, "d_mlp"),
        ("config-d_head-string", lambda b, t: lambda: load(text_config(t, d_head="8")), ModelFileError, "d_head"),
        ("config-dtype", lambda b, t: lambda: load(text_config(t, dtype="float17")), ModelFileError, "float17"),
        ("config-act_fn", lambda b, t: lambda: load(text_config(t, act_fn="swishy")), ModelFileError, "act_fn"),
        (
            "config-normalization",
            lambda b, t: lambda: load(text_config(t, normalization_type="BN")),
            ModelFileError,
            "normalization_type",
        ),
        (
            "config-kv-heads",
            lambda b, t: lambda: load(text_config(t, n_key_value_heads=3)),
            ModelFileError,
            "n_key_value_heads",
        ),
        (
            "config-rotary-dim",
            lambda b, t: lambda: load(text_config(t, positional_embedding_type="rotary", rotary_dim=7)),
            ModelFileError,
            "rotary_dim",
        ),
        ("config-eps", lambda b, t: lambda: load(text_config(t, eps=-1.0)), ModelFileError, "eps"),
        (
            "config-bool",
            lambda b, t: lambda: load(text_config(t, default_prepend_bos="yes")),
            ModelFileError,
            "default_prepend_bos",
        ),
        ("config-device", lambda b, t: lambda: load(text_config(t, device="gpu")), ModelFileError, "device"),
        (
            "config-no-vocab-no-tokenizer",
            lambda b, t: lambda: load(text_config(t, d_vocab=-1)),
            ModelFileError,
            "tokenizer",
        ),
        (
            "config-tokenizer-outside",
            lambda b, t: lambda: load(text_config(t, tokenizer_name="../x")),
            ModelFileError,
            "tokenizer_name",
        ),
        (
            "config-option-it-does-not-take",
            lambda b, t: lambda: load(text_config(t), dtype="float16"),
            InputError,
            "dtype",
        ),
        ("config-seed", lambda b, t: lambda: load(text_config(t), seed="one"), InputError, "seed"),
        # lenskit.load: a lenskit folder (save's)
        (
            "folder-invalid-json",
            lambda b, t: lambda: load(spoil(copy(b, "text", t), "hooked_transformer.json", "{x")),
            ModelFileError,
            "hooked_transformer.json",
        ),
        (
            "folder-config-empty",
            lambda b, t: lambda: load(spoil(copy(b, "text", t), "hooked_transformer.json", "{}")),
            ModelFileError,
            "d_model",
        ),
        (
            "folder-no-dtype-is-fine-but-d_mlp-disagrees",
            lambda b, t: lambda: load(lenskit_folder(b, t, d_mlp=48, dtype=DELETE)),
            ModelFileError,
            "W_in",
        ),
        (
            "folder-fewer-layers",
            lambda b, t: lambda: load(lenskit_folder(b, t, n_layers=2)),
            ModelFileError,
            "blocks.2",
        ),
        (
            "folder-d_vocab-disagrees",
            lambda b, t: lambda: load(lenskit_folder(b, t, d_vocab=99, d_vocab_out=99)),
            ModelFileError,
            "W_E",
        ),
        ("folder-n_heads-0", lambda b, t: lambda: load(lenskit_folder(b, t, n_heads=0)), ModelFileError, "n_heads"),
        ("folder-dtype", lambda b, t: lambda: load(lenskit_folder(b, t, dtype="float17")), ModelFileError, "float17"),
        (
            "folder-tokenizer-key",
            lambda b, t: lambda: load(lenskit_folder(b, t, tokenizer={"bos_token": 1})),
            ModelFileError,
            "bos_token",
        ),
        (
            "folder-dtype-argument",
            lambda b, t: lambda: load(copy(b, "text", t), dtype="float17"),
            InputError,
            "float17",
        ),
        ("folder-device-argument", lambda b, t: lambda: load(copy(b, "text", t), device="gpu"), InputError, "gpu"),
        (
            "folder-option-it-does-not-take",
            lambda b, t: lambda: load(copy(b, "text", t), fold_ln=False),
            InputError,
            "fold_ln",
        ),
        (
            "folder-corrupt-tokenizer",
            lambda b, t: lambda: load(spoil(copy(b, "text", t), "tokenizer.json", "{x")),
            ModelFileError,
            "tokenizer.json",
        ),
        (
            "folder-truncated-weights",
            lambda b, t: lambda: load(spoil(copy(b, "text", t), "model.safetensors", None)),
            ModelFileError,
            "model.safetensors",
        ),
        (
            "folder-weights-not-safetensors",
            lambda b, t: lambda: load(spoil(copy(b, "text", t), "model.safetensors", b"\x08" + bytes(7) + b"{}")),
            ModelFileError,
            "model.safetensors",
        ),
        (
            "folder-weights-missing",
            lambda b, t: lambda: load((lambda f: (f / "model.safetensors").unlink() or f)(copy(b, "text", t))),
            MissingFileError,
            "model.safetensors",
        ),
        ("folder-empty", lambda b, t: lambda: load(t), MissingFileError, "holds no model"),
        ("folder-of-a-speech-model", lambda b, t: lambda: load(copy(b, "speech", t)), InputError, "whisper.load"),
        # lenskit.load: names and paths
        ("name-empty", lambda b, t: lambda: load(""), InputError, "empty"),
        ("name-none", lambda b, t: lambda: load(None), InputError, "NoneType"),
        ("name-missing-path", lambda b, t: lambda: load(t / "absent" / "model.bin"), MissingFileError, "model.bin"),
        ("name-unknown", lambda b, t: lambda: load("gpt2-smal"), InputError, "gpt2-small"),
        ("name-outside-the-zoo", lambda b, t: lambda: load("lenskit/../x"), InputError, "zoo name"),
        ("name-speech-zoo-model", lambda b, t: lambda: load("lenskit/speech-3l"), InputError, "whisper.load"),
        ("file-of-another-kind", lambda b, t: lambda: load(write(t / "notes.txt", "hi")), InputError, "notes.txt"),
        # lenskit.load: a Hugging Face folder
        (
            "hf-invalid-json",
            lambda b, t: lambda: load(spoil(copy(b, "hf", t), "config.json", "{")),
            ModelFileError,
            "config.json",
        ),
        (
            "hf-architectures",
            lambda b, t: lambda: load(edit_json(copy(b, "hf", t) / "config.json", architectures="GPT2LMHeadModel")),
            ModelFileError,
            "architectures",
        ),
        (
            "hf-shape-disagrees",
            lambda b, t: lambda: load(edit_json(copy(b, "hf", t) / "config.json", n_inner=100)),
            ModelFileError,
            "config.json",
        ),
        (
            "hf-negative-layers",
            lambda b, t: lambda: load(edit_json(copy(b, "hf", t) / "config.json", n_layer=-1)),
            ModelFileError,
            "n_layers",
        ),
        (
            "hf-missing-field",
            lambda b, t: lambda: load(edit_json(copy(b, "hf", t) / "config.json", n_positions=None)),
            ModelFileError,
            "n_positions",
        ),
        (
            "hf-truncated-weights",
            lambda b, t: lambda: load(spoil(copy(b, "hf", t), "model.safetensors", None)),
            ModelFileError,
            "model.safetensors",
        ),
        (
            "hf-corrupt-tokenizer",
            lambda b, t: lambda: load(spoil(copy(b, "hf", t), "tokenizer.json", "{x")),
            ModelFileError,
            "tokenizer",
        ),
        ("hf-dtype-argument", lambda b, t: lambda: load(copy(b, "hf", t), dtype=torch.int8), InputError, "int8"),
        # lenskit.load: GGUF and llama2.c files
        (
            "gguf-not-gguf",
            lambda b, t: lambda: load(write(t / "m.gguf", b"GGUF\x03\x00\x00\x00" + bytes(9))),
            GGUFError,
            "m.gguf",
        ),
        ("gguf-empty", lambda b, t: lambda: load(write(t / "m.gguf", b"")), ModelFileError, "m.gguf"),
        ("llama2c-short", lambda b, t: lambda: load(write(t / "m.bin", b"\x01\x02")), ModelFileError, "28 bytes"),
        ("llama2c-header-heads-0", lambda b, t: lambda: load(llama2c(t / "m.bin", heads=0)), ModelFileError, "n_heads"),
        ("llama2c-truncated", lambda b, t: lambda: load(llama2c(t / "m.bin", cut=3)), ModelFileError, "m.bin"),
        (
            "llama2c-two-checkpoints",
            lambda b, t: lambda: (llama2c(t / "a.bin"), llama2c(t / "b.bin"), load(t)),
            InputError,
            "several",
        ),
        ("llama2c-dtype", lambda b, t: lambda: load(llama2c(t / "m.bin"), dtype="float17"), InputError, "float17"),
        ("llama2c-option", lambda b, t: lambda: load(llama2c(t / "m.bin"), seed=1), InputError, "seed"),
        # describe
        ("describe-whisper", lambda b, t: lambda: describe(speech_model(), "w"), InputError, "HookedTransformer"),
        ("describe-name", lambda b, t: lambda: describe("gpt2", "gpt2"), InputError, "HookedTransformer"),
        # lenskit.whisper.load: names and paths
        ("whisper-missing-pt", lambda b, t: lambda: wload(str(t / "tiny.pt")), MissingFileError, "tiny.pt"),
        (
            "whisper-missing-relative",
            lambda b, t: lambda: wload("models/whisper/tiny.pt"),
            MissingFileError,
            "models/whisper/tiny.pt",
        ),
        (
            "whisper-missing-dot-folder",
            lambda b, t: lambda: wload("./no-such-folder"),
            MissingFileError,
            "no-such-folder",
        ),
        ("whisper-empty-name", lambda b, t: lambda: wload(""), InputError, "empty"),
        ("whisper-empty-folder", lambda b, t: lambda: wload(t), MissingFileError, "holds no Whisper model"),
        ("whisper-text-folder", lambda b, t: lambda: wload(copy(b, "text", t)), InputError, "lenskit.load"),
        ("whisper-text-zoo", lambda b, t: lambda: wload("lenskit/ioi-4l"), InputError, "speech model"),
        ("whisper-device", lambda b, t: lambda: wload(copy(b, "speech", t), device="gpu"), InputError, "gpu"),
        # lenskit.whisper.load: an openai-whisper .pt
        (
            "pt-truncated",
            lambda b, t: lambda: wload(spoil(copy(b, "tiny.pt", t).parent, "tiny.pt", None) / "tiny.pt"),
            ModelFileError,
            "tiny.pt",
        ),
        (
            "pt-not-a-checkpoint",
            lambda b, t: lambda: wload(write(t / "tiny.pt", b"not a pickle")),
            ModelFileError,
            "tiny.pt",
        ),
        ("pt-no-dims", lambda b, t: lambda: wload(saved(t, {"model_state_dict": {}})), ModelFileError, "dims"),
        ("pt-a-list", lambda b, t: lambda: wload(saved(t, [1, 2])), InputError, "list"),
        ("pt-n_mels-disagrees", lambda b, t: lambda: wload(resaved(b, t, n_mels=20)), ModelFileError, "conv1"),
        (
            "pt-width-disagrees",
            lambda b, t: lambda: wload(resaved(b, t, n_audio_state=32, n_text_state=32)),
            ModelFileError,
            "tiny.pt",
        ),
        (
            "pt-layers-negative",
            lambda b, t: lambda: wload(resaved(b, t, n_audio_layer=-1)),
            ModelFileError,
            "n_audio_layer",
        ),
        (
            "pt-heads-not-dividing",
            lambda b, t: lambda: wload(resaved(b, t, n_text_head=3)),
            ModelFileError,
            "n_text_head",
        ),
        ("pt-unknown-dim", lambda b, t: lambda: wload(resaved(b, t, n_layers=2)), ModelFileError, "n_layers"),
        (
            "pt-missing-parameter",
            lambda b, t: (
                lambda: wload(
                    resaved(
                        b, t, lambda s: {k: v for k, v in s.items() if k != "decoder.blocks.1.cross_attn.query.weight"}
                    )
                )
            ),
            ModelFileError,
            "decoder.blocks.1.cross_attn.query.weight",
        ),
        (
            "pt-unknown-parameter",
            lambda b, t: lambda: wload(resaved(b, t, lambda s: s | {"extra": torch.zeros(1)})),
            ModelFileError,
            "tiny.pt",
        ),
        (
            "pt-1d-query",
            lambda b, t: (
                lambda: wload(resaved(b, t, lambda s: s | {"encoder.blocks.0.attn.query.weight": torch.zeros(16)}))
            ),
            ModelFileError,
            "tiny.pt",
        ),
        (
            "pt-state-not-tensors",
            lambda b, t: lambda: wload(saved(t, {"dims": SMALL, "model_state_dict": [1]})),
            ModelFileError,
            "model_state_dict",
        ),
        # lenskit.whisper.load: a lenskit folder
        (
            "speech-invalid-json",
            lambda b, t: lambda: wload(spoil(copy(b, "speech", t), "hooked_whisper.json", "{")),
            ModelFileError,
            "hooked_whisper.json",
        ),
        (
            "speech-config-empty",
            lambda b, t: lambda: wload(spoil(copy(b, "speech", t), "hooked_whisper.json", "{}")),
            ModelFileError,
            "dims",
        ),
        (
            "speech-n_mels-disagrees",
            lambda b, t: lambda: wload(speech_folder(b, t, dims_n_mels=20)),
            ModelFileError,
            "conv1",
        ),
        (
            "speech-n_vocab-0",
            lambda b, t: lambda: wload(speech_folder(b, t, dims_n_vocab=0)),
            ModelFileError,
            "n_vocab",
        ),
        (
            "speech-n_mels-float",
            lambda b, t: lambda: wload(speech_folder(b, t, dims_n_mels=16.0)),
            ModelFileError,
            "n_mels",
        ),
        (
            "speech-dims-missing",
            lambda b, t: lambda: wload(speech_folder(b, t, dims_n_text_layer=DELETE)),
            ModelFileError,
            "n_text_layer",
        ),
        (
            "speech-vocabulary",
            lambda b, t: lambda: wload(speech_folder(b, t, vocabulary=[1, 2])),
            ModelFileError,
            "vocabulary",
        ),
        (
            "speech-suppress-tokens",
            lambda b, t: lambda: wload(speech_folder(b, t, suppress_tokens=[99])),
            ModelFileError,
            "suppress_tokens",
        ),
        (
            "speech-alignment-heads",
            lambda b, t: lambda: wload(speech_folder(b, t, alignment_heads=[[0]])),
            ModelFileError,
            "alignment_heads",
        ),
        (
            "speech-truncated-weights",
            lambda b, t: lambda: wload(spoil(copy(b, "speech", t), "model.safetensors", None)),
            ModelFileError,
            "model.safetensors",
        ),
        (
            "speech-weights-missing",
            lambda b, t: lambda: wload((lambda f: (f / "model.safetensors").unlink() or f)(copy(b, "speech", t))),
            MissingFileError,
            "model.safetensors",
        ),
        # lenskit.whisper.load: a Hugging Face folder
        (
            "hf-whisper-shape-disagrees",
            lambda b, t: lambda: wload(edit_json(copy(b, "hf_whisper", t) / "config.json", d_model=32)),
            ModelFileError,
            "hf_whisper",
        ),
        (
            "hf-whisper-layers-negative",
            lambda b, t: lambda: wload(edit_json(copy(b, "hf_whisper", t) / "config.json", encoder_layers=-1)),
            ModelFileError,
            "n_audio_layer",
        ),
        (
            "hf-whisper-invalid-json",
            lambda b, t: lambda: wload(spoil(copy(b, "hf_whisper", t), "config.json", "{")),
            ModelFileError,
            "config.json",
        ),
        (
            "hf-whisper-truncated",
            lambda b, t: lambda: wload(spoil(copy(b, "hf_whisper", t), "model.safetensors", None)),
            ModelFileError,
            "hf_whisper",
        ),
        ("hf-text-folder-for-whisper", lambda b, t: lambda: wload(copy(b, "hf", t)), ModelFileError, "gpt2"),
        # lenskit.whisper.load: a CTranslate2 folder
        (
            "ct2-invalid-config",
            lambda b, t: lambda: wload(spoil(copy(b, "ct2", t), "config.json", "{")),
            CTranslate2FormatError,
            "config.json",
        ),
        (
            "ct2-config-not-an-object",
            lambda b, t: lambda: wload(spoil(copy(b, "ct2", t), "config.json", "[]")),
            CTranslate2FormatError,
            "config.json",
        ),
        (
            "ct2-suppress-ids",
            lambda b, t: lambda: wload(edit_json(copy(b, "ct2", t) / "config.json", suppress_ids=["a"])),
            CTranslate2FormatError,
            "suppress_ids",
        ),
        (
            "ct2-vocabulary-not-a-list",
            lambda b, t: lambda: wload(spoil(copy(b, "ct2", t), "vocabulary.json", "{}")),
            CTranslate2FormatError,
            "vocabulary.json",
        ),
        (
            "ct2-vocabulary-size",
            lambda b, t: lambda: wload(spoil(copy(b, "ct2", t), "vocabulary.json", '["a"]')),
            CTranslate2FormatError,
            "vocabulary.json",
        ),
        (
            "ct2-truncated",
            lambda b, t: lambda: wload(spoil(copy(b, "ct2", t), "model.bin", None)),
            CTranslate2FormatError,
            "truncated",
        ),
        (
            "ct2-heads-not-dividing",
            lambda b, t: lambda: wload(ct2_with(b, t, {"encoder/num_heads": 3})),
            ModelFileError,
            "n_audio_head",
        ),
        (
            "ct2-heads-not-whole",
            lambda b, t: lambda: wload(ct2_with(b, t, {"decoder/num_heads": 1.5})),
            CTranslate2FormatError,
            "num_heads",
        ),
        (
            "ct2-conv-rank",
            lambda b, t: lambda: wload(ct2_with(b, t, {"encoder/conv1/weight": torch.zeros(16)})),
            CTranslate2FormatError,
            "conv1",
        ),
        (
            "ct2-model-bin-missing",
            lambda b, t: lambda: wload((lambda f: (f / "model.bin").unlink() or f)(copy(b, "ct2", t))),
            MissingFileError,
            "model.bin",
        ),
        # audio files
        (
            "wav-0-channels",
            lambda b, t: lambda: whisper.load_audio(wav(t / "a.wav", fmt(channels=0))),
            InputError,
            "0 channels",
        ),
        (
            "wav-4-byte-fmt",
            lambda b, t: lambda: whisper.load_audio(wav(t / "a.wav", b"\x01\x00\x01\x00")),
            InputError,
            "fmt",
        ),
        (
            "wav-extensible-short",
            lambda b, t: lambda: whisper.read_wav(wav(t / "a.wav", fmt(0xFFFE) + b"\0\0")),
            InputError,
            "extensible",
        ),
        ("wav-0-hz", lambda b, t: lambda: whisper.load_audio(wav(t / "a.wav", fmt(rate=0))), InputError, "0 Hz"),
        ("wav-1-hz", lambda b, t: lambda: whisper.load_audio(wav(t / "a.wav", fmt(rate=1))), InputError, "1 Hz"),
        (
            "wav-rate-needing-a-huge-filter",
            lambda b, t: lambda: whisper.load_audio(wav(t / "a.wav", fmt(rate=11127))),
            InputError,
            "ffmpeg",
        ),
        (
            "wav-12-bit",
            lambda b, t: lambda: whisper.load_audio(wav(t / "a.wav", fmt(bits=12))),
            InputError,
            "unsupported WAV encoding",
        ),
        (
            "wav-0-bits",
            lambda b, t: lambda: whisper.load_audio(wav(t / "a.wav", fmt(bits=0))),
            InputError,
            "unsupported WAV encoding",
        ),
        (
            "wav-not-riff",
            lambda b, t: lambda: whisper.load_audio(write(t / "a.wav", b"ID3" + bytes(40))),
            InputError,
            "not a WAV file",
        ),
        (
            "wav-no-data-chunk",
            lambda b, t: lambda: whisper.read_wav(write(t / "a.wav", b"RIFF\x04\0\0\0WAVE")),
            InputError,
            "'data'",
        ),
        ("wav-empty", lambda b, t: lambda: whisper.log_mel(wav(t / "a.wav", fmt(), b"")), InputError, "empty"),
        (
            "wav-nan",
            lambda b, t: (
                lambda: whisper.log_mel(wav(t / "a.wav", fmt(3, bits=32), np.full(50, np.nan, np.float32).tobytes()))
            ),
            InputError,
            "NaN",
        ),
        ("wav-missing", lambda b, t: lambda: whisper.load_audio(t / "gone.wav"), MissingFileError, "gone.wav"),
        ("wav-a-folder", lambda b, t: lambda: whisper.load_audio(t), InputError, "folder"),
        (
            "wav-8k-without-resampling",
            lambda b, t: lambda: whisper.log_mel(wav(t / "a.wav", fmt(rate=8000)), resample=False),
            InputError,
            "8000 Hz",
        ),
        # samples and spectrograms
        ("mel-40-bins", lambda b, t: lambda: whisper.model_input(torch.zeros(40, 3000)), InputError, "40 mel bins"),
        (
            "mel-40-bins-batch",
            lambda b, t: lambda: whisper.model_input(np.zeros((2, 40, 3000), np.float32)),
            InputError,
            "n_mels=80",
        ),
        ("mel-frames", lambda b, t: lambda: whisper.model_input(torch.zeros(80, 100)), InputError, "100 frames"),
        ("mel-nan", lambda b, t: lambda: whisper.model_input(torch.full((80, 3000), nan)), InputError, "NaN"),
        (
            "mel-inf",
            lambda b, t: lambda: whisper.model_input(torch.full((1, 80, 3000), float("inf"))),
            InputError,
            "infinite",
        ),
        (
            "mel-integers",
            lambda b, t: lambda: whisper.model_input(torch.zeros(80, 3000, dtype=torch.long)),
            InputError,
            "floats",
        ),
        ("mel-batch-0", lambda b, t: lambda: whisper.model_input(torch.zeros(0, 80, 3000)), InputError, "batch"),
        ("samples-nan", lambda b, t: lambda: whisper.model_input(torch.full((16000,), nan)), InputError, "NaN"),
        ("samples-inf-array", lambda b, t: lambda: whisper.log_mel(np.full(16000, np.inf)), InputError, "infinite"),
        (
            "samples-complex",
            lambda b, t: lambda: whisper.model_input(torch.zeros(16000, dtype=torch.complex64)),
            InputError,
            "complex",
        ),
        ("samples-bool", lambda b, t: lambda: whisper.model_input(np.zeros(16000, bool)), InputError, "bool"),
        ("samples-int64", lambda b, t: lambda: whisper.model_input(np.zeros(16000, np.int64)), InputError, "int64"),
        ("samples-strings", lambda b, t: lambda: whisper.model_input(np.array(["a", "b"])), InputError, "ndarray"),
        ("samples-none", lambda b, t: lambda: whisper.model_input(None), InputError, "NoneType"),
        ("samples-ragged", lambda b, t: lambda: whisper.model_input([[0.0], [0.0, 1.0]]), InputError, "list"),
        ("samples-stereo", lambda b, t: lambda: whisper.model_input(torch.zeros(2, 16000)), InputError, "mono"),
        ("samples-channels-last", lambda b, t: lambda: whisper.log_mel(torch.zeros(16000, 2)), InputError, "mono"),
        ("samples-scalar", lambda b, t: lambda: whisper.log_mel(torch.tensor(0.5)), InputError, "mono"),
        ("samples-empty", lambda b, t: lambda: whisper.model_input(np.zeros(0, np.float32)), InputError, "empty"),
        ("samples-too-long", lambda b, t: lambda: whisper.log_mel(torch.zeros(31 * 16000)), InputError, "trim=True"),
        (
            "samples-rate-0",
            lambda b, t: lambda: whisper.log_mel(torch.zeros(16000), sample_rate=0),
            InputError,
            "sample_rate",
        ),
        (
            "samples-rate-text",
            lambda b, t: lambda: whisper.log_mel(torch.zeros(16000), sample_rate="16k"),
            InputError,
            "sample_rate",
        ),
        (
            "samples-n_mels-0",
            lambda b, t: lambda: whisper.model_input(torch.zeros(16000), n_mels=0),
            InputError,
            "n_mels",
        ),
        (
            "samples-n_frames-float",
            lambda b, t: lambda: whisper.log_mel(torch.zeros(16000), n_frames=30.5),
            InputError,
            "n_frames",
        ),
        (
            "spectrogram-of-too-few-samples",
            lambda b, t: lambda: whisper.log_mel_spectrogram(torch.zeros(100)),
            InputError,
            "too few",
        ),
        ("resample-stereo", lambda b, t: lambda: whisper.resample_audio(torch.zeros(2, 100), 8000), InputError, "mono"),
        (
            "resample-rate-negative",
            lambda b, t: lambda: whisper.resample_audio(torch.zeros(100), -8000),
            InputError,
            "orig_rate",
        ),
        ("pad-length-0", lambda b, t: lambda: whisper.pad_or_trim(torch.zeros(100), 0), InputError, "length"),
        # what the model reads: transcribe
        (
            "transcribe-nan-spectrogram",
            lambda b, t: lambda: whisper.transcribe(speech_model(), torch.full((80, 8), nan), progress=False),
            InputError,
            "NaN",
        ),
        (
            "transcribe-40-mel-bins",
            lambda b, t: lambda: whisper.transcribe(speech_model(), torch.zeros(40, 8), progress=False),
            InputError,
            "40 mel bins",
        ),
        (
            "transcribe-nan-samples",
            lambda b, t: lambda: whisper.transcribe(speech_model(), torch.full((800,), nan), progress=False),
            InputError,
            "NaN",
        ),
        (
            "transcribe-inf-wav",
            lambda b, t: (
                lambda: whisper.transcribe(
                    speech_model(),
                    wav(t / "a.wav", fmt(3, bits=32), np.full(50, np.inf, np.float32).tobytes()),
                    progress=False,
                )
            ),
            InputError,
            "infinite",
        ),
        (
            "transcribe-batch",
            lambda b, t: lambda: whisper.transcribe(speech_model(), torch.zeros(2, 80, 8), progress=False),
            InputError,
            "one recording",
        ),
        (
            "whisper-config",
            lambda b, t: (
                lambda: WhisperConfig(
                    **(SMALL | {"n_audio_state": 2, "n_text_state": 2, "n_audio_head": 1, "n_text_head": 1})
                )
            ),
            InputError,
            "n_audio_state",
        ),
    ]


def saved(tmp_path, value):
    torch.save(value, tmp_path / "tiny.pt")
    return tmp_path / "tiny.pt"


def resaved(base, tmp_path, state=lambda state: state, **dims):
    """The good .pt with its dims changed (the weights then disagree, or the dims are impossible), and its
    state dict passed through `state`."""
    checkpoint = torch.load(base / "tiny.pt", weights_only=True)
    return saved(tmp_path, {"dims": SMALL | dims, "model_state_dict": state(checkpoint["model_state_dict"])})


def ct2_with(base, tmp_path, changes: dict):
    """The good CTranslate2 folder with variables changed (a number becomes a scalar of its type)."""
    from lenskit.whisper.ctranslate2 import read_model_bin

    folder = copy(base, "ct2", tmp_path)
    table = read_model_bin(folder / "model.bin")
    variables = dict(table.variables) | {
        k: v
        if isinstance(v, torch.Tensor)
        else torch.tensor(v, dtype=torch.int16 if isinstance(v, int) else torch.float32)
        for k, v in changes.items()
    }
    (folder / "model.bin").write_bytes(model_bin(variables, table.aliases.items()))
    return folder


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    """GGUF files are converted into a cache: never the user's."""
    monkeypatch.setenv("LENSKIT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("case", cases(), ids=[case[0] for case in cases()])
def test_bad_input_gets_a_lenskit_error_naming_it(case, base, tmp_path):
    _, build, error, word = case
    call = build(base, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error) as raised:
            call()
    assert word in str(raised.value), str(raised.value)


def test_the_good_inputs_load(base, tmp_path):
    """The inputs the table spoils are good: each loads, the CTranslate2 folder as the .pt it came from."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert lenskit.load(base / "text").cfg.d_vocab == len(WORDS)
        assert lenskit.load(base / "hf").cfg.n_layers == 1
        assert lenskit.load(text_config(tmp_path)).cfg.d_model == 16
        speech = whisper.load(base / "speech")
        from_pt, from_ct2, from_hf = (whisper.load(base / name) for name in ("tiny.pt", "ct2", "hf_whisper"))
    assert speech.cfg == from_pt.cfg == from_ct2.cfg == from_hf.cfg == WhisperConfig(**SMALL)
    assert from_ct2.suppress_tokens == [3] and from_ct2.alignment_heads == [(1, 0)]
    for name, value in from_pt.state_dict().items():
        torch.testing.assert_close(from_ct2.state_dict()[name], value, atol=0, rtol=0)


def test_integer_pcm_samples_are_scaled_as_in_a_wav_file(tmp_path):
    """int16 (and uint8, int8, int32) samples are PCM: the same spectrogram as the floats they encode."""
    ints = (np.sin(np.arange(16000) / 7) * 20000).astype(np.int16)
    expected = whisper.model_input(torch.from_numpy(ints.astype(np.float32) / 32768))
    torch.testing.assert_close(whisper.model_input(ints), expected, atol=0, rtol=0)
    torch.testing.assert_close(whisper.model_input(torch.from_numpy(ints)), expected, atol=0, rtol=0)
    path = wav(tmp_path / "a.wav", fmt(), ints.tobytes())
    torch.testing.assert_close(whisper.model_input(path), expected, atol=0, rtol=0)


# --- random inputs ---------------------------------------------------------------------------------------

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


PATCHES = st.lists(st.tuples(st.integers(12, 70), st.integers(0, 255)), max_size=3)  # (offset, byte) after WAVE


@settings(FUZZ, max_examples=100)
@given(
    encoding=st.sampled_from([1, 0xFFFE]),
    channels=st.integers(1, 3),
    rate=st.sampled_from([16000, 8000, 44100]),
    bits=st.sampled_from([8, 16, 24, 32, 64]),
    data=st.binary(max_size=300),
    patches=PATCHES,
    cut=st.one_of(st.none(), st.none(), st.integers(12, 80)),
)
def test_random_wav_headers_load_or_raise_a_lenskit_error(tmp_path, encoding, channels, rate, bits, data, patches, cut):
    """A WAV file (an extensible one has a 40-byte 'fmt ' chunk) with random header bytes overwritten or cut off."""
    encoding, sub_format = (3, 3) if bits == 64 else (encoding, 1)  # 64-bit samples are floats
    extensible = struct.pack("<HHIH", 22, bits, 0, sub_format) + bytes(14)  # cbSize, valid bits, mask, sub-format GUID
    raw = bytearray(wav(tmp_path / "r.wav", fmt(encoding, channels, rate, bits) + extensible, data).read_bytes())
    for offset, value in patches:
        raw[offset % len(raw)] = value
    path = write(tmp_path / "r.wav", bytes(raw[:cut]))
    try:
        mel = whisper.model_input(path)
    except LenskitError:
        return
    assert mel.shape == (1, 80, 3000) and torch.isfinite(mel).all()


@FUZZ
@given(data=st.binary(max_size=120))
def test_random_bytes_after_a_riff_header_load_or_raise_a_lenskit_error(tmp_path, data):
    path = write(tmp_path / "r.wav", b"RIFF" + struct.pack("<I", len(data) + 4) + b"WAVE" + data)
    try:
        samples, rate = whisper.read_wav(path)
    except LenskitError:
        return
    assert samples.ndim == 2 and rate > 0


ODD = st.one_of(st.integers(-3, 12), st.sampled_from([None, 2.5, "4", True, [2], float("nan")]))


@FUZZ
@given(
    n_heads=st.integers(1, 4),
    d_head=st.sampled_from([2, 4, 6]),
    n_layers=st.integers(1, 2),
    kind=st.sampled_from(["standard", "rotary", "alibi", "shortformer"]),
    norm=st.sampled_from(["LN", "RMS", "LNPre", None]),
    attn_only=st.booleans(),
    spoiled=st.dictionaries(
        st.sampled_from(
            [
                "n_layers",
                "d_model",
                "n_heads",
                "d_head",
                "d_mlp",
                "n_ctx",
                "d_vocab",
                "n_key_value_heads",
                "rotary_dim",
                "eps",
                "act_fn",
            ]
        ),
        ODD,
        max_size=2,
    ),
)
def test_random_configs_build_a_model_or_raise_a_lenskit_error(
    tmp_path, n_heads, d_head, n_layers, kind, norm, attn_only, spoiled
):
    """A valid config with up to two fields replaced by random values: a working model, or a lenskit error."""
    fields = (
        dict(
            n_layers=n_layers,
            d_model=n_heads * d_head,
            n_heads=n_heads,
            d_head=d_head,
            d_mlp=8,
            n_ctx=8,
            d_vocab=11,
            act_fn="gelu",
            positional_embedding_type=kind,
            normalization_type=norm,
            attn_only=attn_only,
        )
        | spoiled
    )
    path = write(tmp_path / "random.json", json.dumps(fields))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lenskit.load(path)
    except LenskitError as error:
        assert "random.json" in str(error)
        return
    assert model(torch.zeros(1, 1, dtype=torch.long)).shape == (1, 1, model.cfg.d_vocab_out)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 2000), value=st.integers(0, 255))
def test_corrupted_ctranslate2_files_load_or_raise_a_lenskit_error(base, tmp_path, position, value):
    folder = tmp_path / "ct2"
    if not folder.exists():
        shutil.copytree(base / "ct2", folder)
    data = bytearray((base / "ct2" / "model.bin").read_bytes())
    data[position] = value  # the header, names and shapes of the first variables, and some weights
    (folder / "model.bin").write_bytes(bytes(data))
    try:
        model = whisper.load(folder)
    except LenskitError:
        return
    assert model.cfg.n_mels == SMALL["n_mels"]


@FUZZ
@given(version=st.sampled_from([1, 2, 3, 4]), data=st.binary(max_size=120))
def test_random_gguf_files_raise_a_lenskit_error(tmp_path, version, data):
    """Random bytes after GGUF's magic: never a model, never a raw error, nothing written to the cache."""
    path = write(tmp_path / "r.gguf", b"GGUF" + struct.pack("<I", version) + data)
    with pytest.raises(GGUFError, match="r.gguf"):
        lenskit.load(path)
    assert not (tmp_path / "cache" / "gguf").exists()
