"""The input contract of the analyses and the CLI: each bad input gets a lenskit error that names it.

One table: (what is called, the expected error type, a word its message must contain). Every error
is an `InputError` (a ValueError): never a deep torch error, a silent truncation or a silent <unk>.
Hypothesis then throws random token tensors and indices at the entry points.
"""

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lenskit
from lenskit import cli, hooks, metrics, surgery, vocab
from lenskit.errors import InputError, LenskitError, MissingFileError
from lenskit.run import Run

LONG = " ".join(["the cat sat on a mat"] * 12)  # 72 words: longer than the test models' n_ctx of 64
GOOD = "the cat sat on a mat"


def cases():
    """(id, call(model), error type, word in the message)."""
    ids = torch.tensor([[1, 4, 5, 6]])
    return [
        ("lens-float-ids", lambda m: lenskit.logit_lens(m, ids.float(), progress=False), InputError, "integer"),
        (
            "lens-id-equal-to-d_vocab",
            lambda m: lenskit.logit_lens(m, torch.tensor([[1, 13]]), progress=False),
            InputError,
            "vocabulary",
        ),
        (
            "lens-negative-id",
            lambda m: lenskit.logit_lens(m, torch.tensor([[1, -1]]), progress=False),
            InputError,
            "vocabulary",
        ),
        ("lens-bool-ids", lambda m: lenskit.logit_lens(m, ids.bool(), progress=False), InputError, "integer"),
        ("lens-text-longer-than-context", lambda m: lenskit.logit_lens(m, LONG, progress=False), InputError, "n_ctx"),
        (
            "lens-ids-longer-than-context",
            lambda m: lenskit.logit_lens(m, torch.ones(1, 65, dtype=torch.long), progress=False),
            InputError,
            "n_ctx",
        ),
        (
            "lens-unknown-target",
            lambda m: lenskit.logit_lens(m, GOOD, targets=" xyzzy", progress=False),
            InputError,
            "vocabulary",
        ),
        (
            "lens-float-target",
            lambda m: lenskit.logit_lens(m, GOOD, targets=1.5, progress=False),
            InputError,
            "token string or id",
        ),
        ("lens-top-k-0", lambda m: lenskit.logit_lens(m, GOOD, top_k=0, progress=False), InputError, "top_k"),
        (
            "lens-layer-out-of-range",
            lambda m: lenskit.logit_lens(m, GOOD, layers=[9], progress=False),
            InputError,
            "out of range",
        ),
        ("lens-empty-list", lambda m: lenskit.logit_lens(m, [], progress=False), InputError, "no prompts"),
        ("attribute-unknown-answer", lambda m: lenskit.attribute(m, GOOD, " xyzzy"), InputError, "vocabulary"),
        ("attribute-two-token-answer", lambda m: lenskit.attribute(m, GOOD, "cat sat"), InputError, "single token"),
        ("attribute-by", lambda m: lenskit.attribute(m, GOOD, "cat", by="neurons"), InputError, "by="),
        ("attribute-pos", lambda m: lenskit.attribute(m, GOOD, "cat", pos=7), InputError, "out of range"),
        ("attribute-long", lambda m: lenskit.attribute(m, LONG, "cat"), InputError, "n_ctx"),
        (
            "patch-max-cells-negative",
            lambda m: lenskit.patch(m, GOOD, GOOD, metrics.logit_diff("cat", "dog"), max_cells=-1, progress=False),
            InputError,
            "max_cells",
        ),
        (
            "patch-max-cells-float",
            lambda m: lenskit.patch(m, GOOD, GOOD, metrics.logit_diff("cat", "dog"), max_cells=2.5, progress=False),
            InputError,
            "max_cells",
        ),
        (
            "patch-site",
            lambda m: lenskit.patch(m, GOOD, GOOD, metrics.logit_diff("cat", "dog"), site="zz", progress=False),
            InputError,
            "site",
        ),
        (
            "patch-shapes",
            lambda m: lenskit.patch(m, GOOD, "the cat", metrics.logit_diff("cat", "dog"), progress=False),
            InputError,
            "same shape",
        ),
        (
            "patch-unknown-answer",
            lambda m: lenskit.patch(m, GOOD, GOOD, metrics.logit_diff(" xyzzy", "dog"), progress=False),
            InputError,
            "vocabulary",
        ),
        (
            "patch-layer",
            lambda m: lenskit.patch(m, GOOD, GOOD, metrics.logit_diff("cat", "dog"), layers=[5], progress=False),
            InputError,
            "out of range",
        ),
        (
            "path-patch-senders",
            lambda m: lenskit.path_patch(
                m, GOOD, GOOD, metrics.logit_diff("cat", "dog"), senders="all", progress=False
            ),
            InputError,
            "senders",
        ),
        (
            "path-patch-max-senders",
            lambda m: lenskit.path_patch(
                m, GOOD, GOOD, metrics.logit_diff("cat", "dog"), max_senders=0, progress=False
            ),
            InputError,
            "max_senders",
        ),
        ("flow-long", lambda m: lenskit.flow(m, LONG, progress=False), InputError, "n_ctx"),
        ("flow-batch", lambda m: lenskit.flow(m, GOOD, batch=3, progress=False), InputError, "batch"),
        (
            "ablate-head-string",
            lambda m: hooks.ablate("blocks.0.attn.hook_z", head="10").run(m, ids),
            InputError,
            "head=",
        ),
        (
            "ablate-head-float",
            lambda m: hooks.ablate("blocks.0.attn.hook_z", head=1.0).run(m, ids),
            InputError,
            "head=",
        ),
        (
            "ablate-head-out-of-range",
            lambda m: hooks.ablate("blocks.0.attn.hook_z", head=4).run(m, ids),
            InputError,
            "out of range",
        ),
        (
            "cache-unknown-hook",
            lambda m: hooks.cache("blocks.0.hook_resid_prex").run(m, ids),
            InputError,
            "unknown hook name",
        ),
        ("residual-kind", lambda m: lenskit.residual_stream(m, GOOD, kind="middle"), InputError, "kind"),
        ("residual-layers", lambda m: lenskit.residual_stream(m, GOOD, layers=[7]), InputError, "out of range"),
        ("head-scores-kind", lambda m: vocab.head_scores(m, GOOD, kind="copying"), InputError, "kind"),
        ("neuron-layer", lambda m: vocab.neuron(m, layer=3, neuron=0), InputError, "out of range"),
        ("project-shape", lambda m: vocab.project(m, torch.zeros(31)), InputError, "d_model"),
        (
            "generate-negative",
            lambda m: surgery.generate(m, GOOD, surgery.full(m), n_tokens=-1),
            InputError,
            "n_tokens",
        ),
        (
            "generate-past-context",
            lambda m: surgery.generate(m, GOOD, surgery.full(m), n_tokens=64),
            InputError,
            "context",
        ),
        ("lens-layers-string", lambda m: lenskit.logit_lens(m, GOOD, layers="3", progress=False), InputError, "layers"),
        ("lens-top-k-float", lambda m: lenskit.logit_lens(m, GOOD, top_k=2.5, progress=False), InputError, "top_k"),
        (
            "lens-chunk-size-negative",
            lambda m: lenskit.logit_lens(m, GOOD, chunk_size=-5, progress=False),
            InputError,
            "chunk_size",
        ),
        (
            "lens-plot-batch-string",
            lambda m: lenskit.logit_lens(m, GOOD, progress=False).plot(batch="0"),
            InputError,
            "batch",
        ),
        ("attribute-pos-float", lambda m: lenskit.attribute(m, GOOD, "cat", pos=1.5), InputError, "pos"),
        ("attribute-pos-string", lambda m: lenskit.attribute(m, GOOD, "cat", pos="a"), InputError, "pos"),
        (
            "patch-heads-float",
            lambda m: lenskit.patch(m, GOOD, GOOD, LOGIT_DIFF, site="z", by="layer_head", heads=[1.5], progress=False),
            InputError,
            "heads",
        ),
        (
            "patch-layers-string",
            lambda m: lenskit.patch(m, GOOD, GOOD, LOGIT_DIFF, layers="10", progress=False),
            InputError,
            "layers",
        ),
        (
            "metric-kl-reference-vocabulary",
            lambda m: lenskit.patch(m, GOOD, GOOD, metrics.kl_to(torch.zeros(1, 1, 5)), progress=False),
            InputError,
            "vocabulary",
        ),
        (
            "flow-threshold-string",
            lambda m: lenskit.flow(m, GOOD, threshold="x", progress=False),
            InputError,
            "threshold",
        ),
        (
            "flow-threshold-nan",
            lambda m: lenskit.flow(m, GOOD, threshold=float("nan"), progress=False),
            InputError,
            "threshold",
        ),
        ("flow-top-neurons-k", lambda m: lenskit.flow(m, GOOD, progress=False).top_neurons(0, 0, k=0), InputError, "k"),
        ("residual-layers-float", lambda m: lenskit.residual_stream(m, GOOD, layers=[1.0]), InputError, "layers"),
        ("decompose-layer-string", lambda m: lenskit.decompose_residual(m, GOOD, layer="1"), InputError, "layer"),
        ("neuron-layer-float", lambda m: vocab.neuron(m, layer=1.5, neuron=0), InputError, "layer"),
        ("project-nan", lambda m: vocab.project(m, torch.full((32,), float("nan"))), InputError, "NaN"),
        ("schedule-string", lambda m: surgery.run(m, GOOD, "012"), InputError, "string"),
        ("generate-float", lambda m: surgery.generate(m, GOOD, surgery.full(m), n_tokens=1.5), InputError, "n_tokens"),
        ("add-vector-string", lambda m: hooks.add("blocks.0.hook_resid_pre", "x"), InputError, "vector"),
        (
            "resample-seed-string",
            lambda m: hooks.resample("blocks.0.hook_resid_pre", torch.zeros(1, 2, 32), seed="x").run(m, ids[:, :2]),
            InputError,
            "seed",
        ),
        ("hook-name-none", lambda m: hooks.ablate(None), InputError, "hook names"),
        (
            "stream-batch-size-0",
            lambda m: lenskit.stream_cache(
                m, [GOOD], "blocks.0.hook_resid_post", _tmp() / "a", batch_size=0, max_len=4, progress=False
            ),
            InputError,
            "batch_size",
        ),
        (
            "stream-out-dir-is-a-file",
            lambda m: lenskit.stream_cache(m, [GOOD], "blocks.0.hook_resid_post", __file__, max_len=4, progress=False),
            InputError,
            "is a file",
        ),
        (
            "run-of-another-model",
            lambda m: lenskit.logit_lens(m, Run(_other(), torch.tensor([[1, 4]])), progress=False),
            InputError,
            "another model",
        ),
        (
            "run-cache-of-other-tokens",
            lambda m: lenskit.attribute(m, "the cat", "cat", cache=Run.everything(m, GOOD).activations),
            InputError,
            "cache holds a run",
        ),
    ]


_OTHER = []
LOGIT_DIFF = metrics.logit_diff("cat", "dog")


def _tmp() -> Path:
    return Path(tempfile.mkdtemp())


def _other():
    if not _OTHER:
        from conftest import make_model

        _OTHER.append(make_model("gpt2", seed=1, d_vocab=13))
    return _OTHER[0]


@pytest.mark.parametrize("call, error, word", [case[1:] for case in cases()], ids=[case[0] for case in cases()])
def test_bad_input_gets_a_named_lenskit_error(word_model, call, error, word):
    hooks_before = sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in word_model.hook_dict.values())
    with pytest.raises(error, match=word) as raised:
        call(word_model)
    assert isinstance(raised.value, (LenskitError, ValueError))
    assert sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in word_model.hook_dict.values()) == hooks_before


def test_unknown_words_in_a_prompt_are_warned_about_by_name(word_model):
    with pytest.warns(UserWarning, match=r"does not know \['xyzzy'\]"):
        lenskit.logit_lens(word_model, "the xyzzy sat", progress=False)


def test_glob_hook_names_work_everywhere(word_model, tmp_path):
    """The README's `--names 'blocks.*.hook_resid_post'` and stream_cache with a list of globs."""
    out = lenskit.stream_cache(
        word_model, [GOOD, "a dog ran"], ["blocks.*.hook_resid_post"], tmp_path / "acts", max_len=8, progress=False
    )
    cache = lenskit.load_cache(out)
    assert cache.names == [f"blocks.{layer}.hook_resid_post" for layer in range(3)]
    stored = cache["blocks.2.hook_resid_post"]
    expected = Run(word_model, cache.tokens[:1])["blocks.2.hook_resid_post"]
    torch.testing.assert_close(stored[:1].float(), expected.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool])
def test_stream_cache_refuses_integer_dtypes(word_model, tmp_path, dtype):
    with pytest.raises(InputError, match="dtype"):
        lenskit.stream_cache(
            word_model, [GOOD], ["blocks.0.hook_resid_post"], tmp_path / "a", dtype=dtype, max_len=8, progress=False
        )


@pytest.mark.parametrize(
    "argv, word",
    [
        (
            ["cache", "lenskit/ioi-4l", "--text-file", "x.txt", "--names", "x", "--out", "o", "--max-len", "0"],
            "at least 1",
        ),
        (
            ["cache", "lenskit/ioi-4l", "--text-file", "x.txt", "--names", "x", "--out", "o", "--batch-size", "0"],
            "at least 1",
        ),
        (
            ["cache", "lenskit/ioi-4l", "--text-file", "x.txt", "--names", "x", "--out", "o", "--batch-size", "two"],
            "whole number",
        ),
        (["agent", "--base-url", "u", "--model", "m", "--goal", "g", "--timeout", "nan"], "finite"),
        (["reproduce", "nonexistent"], "invalid choice"),
    ],
)
def test_cli_refuses_bad_options_in_one_line(argv, word, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert word in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, word",
    [
        (["report", "--answer", " xyzzy"], "vocabulary"),
        (["report", "--prompt", "When Mary and John went to the store, John gave a drink to " * 40], "n_ctx"),
        (["cache", "lenskit/ioi-4l", "--text-file", "no-such-file.txt", "--names", "x", "--out", "o"], "not found"),
        (["log", "--db", "no-such.db", "list"], "no experiment log"),
    ],
)
def test_cli_turns_lenskit_errors_into_one_line_and_exit_2(argv, word, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lenskit: error:") and word in err and err.count("\n") == 1


def test_cli_keeps_the_traceback_of_a_bug(monkeypatch):
    """Only lenskit's own errors become one line: a genuine bug (here a KeyError) propagates."""

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "run_info", broken)
    with pytest.raises(KeyError):
        cli.main(["info", "lenskit/ioi-4l"])


def test_error_types_keep_the_builtin_contract():
    assert issubclass(InputError, ValueError) and issubclass(MissingFileError, FileNotFoundError)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.lists(st.integers(-3, 16), min_size=2, max_size=6), min_size=1, max_size=3).filter(
        lambda rows: len({len(r) for r in rows}) == 1
    ),
    st.sampled_from([torch.long, torch.int32, torch.float32]),
)
def test_random_token_tensors_either_work_or_get_an_input_error(word_model, rows, dtype):
    ids = torch.tensor(rows, dtype=dtype)
    valid = not dtype.is_floating_point and int(ids.min()) >= 0 and int(ids.max()) < word_model.cfg.d_vocab
    for call in (
        lambda: lenskit.logit_lens(word_model, ids, progress=False),
        lambda: lenskit.attribute(word_model, ids, 4),
        lambda: vocab.head_scores(word_model, ids, progress=False),
        lambda: lenskit.residual_stream(word_model, ids),
    ):
        if valid:
            call()
        else:
            with pytest.raises(InputError):
                call()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.integers(-8, 8), st.floats(-2, 2), st.text(max_size=3), st.booleans()))
def test_random_head_indices_either_work_or_get_an_input_error(word_model, head):
    ablation = lambda: hooks.ablate("blocks.0.attn.hook_z", head=head).run(word_model, torch.tensor([[1, 4, 5]]))
    if isinstance(head, int) and not isinstance(head, bool) and -4 <= head < 4:
        ablation()
    else:
        with pytest.raises(InputError):
            ablation()


def test_the_readme_cache_example_with_a_glob_runs(tmp_path, monkeypatch, capsys):
    """README: lenskit cache lenskit/ioi-4l --text-file corpus.txt --names 'blocks.*.hook_resid_post' --out acts/"""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("When Mary and John went to the store, John gave a drink to Mary\n" * 20)
    argv = ["cache", "lenskit/ioi-4l", "--text-file", "corpus.txt", "--names", "blocks.*.hook_resid_post"]
    assert cli.main([*argv, "--out", "acts/"]) == 0
    cache = lenskit.load_cache(tmp_path / "acts")
    model = lenskit.load("lenskit/ioi-4l")
    assert cache.names == [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]


def test_attribution_patching_works_inside_inference_mode(word_model):
    metric = metrics.logit_diff("cat", "dog")
    expected = lenskit.attribution_patch(word_model, GOOD, "the dog sat on a mat", metric)
    with torch.inference_mode():
        inside = lenskit.attribution_patch(word_model, GOOD, "the dog sat on a mat", metric)
    torch.testing.assert_close(inside.tensor, expected.tensor)


def test_patching_works_with_float64_as_the_default_dtype(word_model):
    metric = metrics.logit_diff("cat", "dog")
    expected = lenskit.patch(word_model, GOOD, "the dog sat on a mat", metric, progress=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        patched = lenskit.patch(word_model, GOOD, "the dog sat on a mat", metric, progress=False)
        paths = lenskit.path_patch(word_model, GOOD, "the dog sat on a mat", metric, progress=False)
    finally:
        torch.set_default_dtype(default)
    torch.testing.assert_close(patched.tensor, expected.tensor)
    assert paths.tensor.shape == (3, 4)


@pytest.fixture(scope="module")
def speech():
    """The zoo's small Whisper, a second of quiet noise and its transcript's decoder sequence."""
    from lenskit import whisper

    model = whisper.load("lenskit/speech-3l")
    audio = 0.01 * torch.randn(16000, generator=torch.Generator().manual_seed(0))
    return model, audio, whisper.transcribe(model, audio, progress=False).sequence


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda w, m, a, s: w.decoder_logit_lens(m, a, s.float()), "integers"),
        (lambda w, m, a, s: w.decoder_logit_lens(m, a, "hello"), "tokenize it first"),
        (lambda w, m, a, s: w.decoder_logit_lens(m, a, torch.tensor([[-1]])), "0.."),
        (lambda w, m, a, s: w.decoder_logit_attribution(m, a, s, target=1.5), "target"),
        (lambda w, m, a, s: w.decoder_logit_attribution(m, a, s, target=5, pos=1.5), "pos"),
        (lambda w, m, a, s: w.transcribe(m, a, max_tokens=0, progress=False), "max_tokens"),
        (lambda w, m, a, s: w.transcribe(m, a, max_tokens=2.5, progress=False), "max_tokens"),
        (lambda w, m, a, s: w.transcribe(m, a, language="xx", progress=False), "language"),
        (lambda w, m, a, s: w.remove_final_layers(m, "decoder", 1.5), "count"),
        (lambda w, m, a, s: w.word_error_rate(None, "hello"), "texts"),
    ],
)
def test_whisper_bad_input_gets_a_named_lenskit_error(speech, call, word):
    from lenskit import whisper

    with pytest.raises(InputError, match=word):
        call(whisper, *speech)
