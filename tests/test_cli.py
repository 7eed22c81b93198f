"""The `lenskit` command: info and cache, and one-line errors on bad input."""

import subprocess
import sys

import pytest
import torch
import transformers
from conftest import make_model, word_tokenizer

from lenskit.cli import main
from lenskit.models import load, save


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A saved gpt2-shaped model with a word-level tokenizer covering its vocabulary."""
    model = make_model("gpt2")
    words = ["<unk>", "<bos>", "<eos>", "<pad>", *[f"w{i}" for i in range(model.cfg.d_vocab - 4)]]
    folder = tmp_path_factory.mktemp("model")
    word_tokenizer(words).save_pretrained(folder / "tokenizer")
    model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(folder / "tokenizer"))
    save(model, folder)
    return folder


def test_info_prints_config_params_and_hooks(model_folder, capsys):
    assert main(["info", str(model_folder)]) == 0
    out = capsys.readouterr().out
    n_params = sum(p.numel() for p in make_model("gpt2").parameters())
    assert f"parameters   {n_params:,}" in out
    assert "3 layers, d_model 32, 4 heads x d_head 8, d_mlp 64, vocab 101" in out
    blocks = [line for line in out.splitlines() if line.strip().startswith("blocks.")]
    assert [line.split(":")[0].strip() for line in blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert "attn.hook_z" in blocks[1] and "hook_resid_pre" in blocks[1]
    assert "hook_embed" in out.split("blocks.0")[0]


def test_cache_writes_what_run_with_cache_gives(model_folder, tmp_path):
    from lenskit.shards import load_cache  # noqa: PLC0415 (shards.py is optional for the rest of this file)

    text = tmp_path / "corpus.txt"
    text.write_text("w1 w2 w3 w4\n\nw5 w6 w7\nw8 w9 w10 w11 w12\n")
    out = tmp_path / "acts"
    assert (
        main(
            [
                "cache",
                str(model_folder),
                "--text-file",
                str(text),
                "--names",
                "blocks.1.hook_resid_post",
                "--out",
                str(out),
                "--dtype",
                "float32",
                "--max-len",
                "4",
            ]
        )
        == 0
    )
    cached = load_cache(out)
    assert cached.names == ["blocks.1.hook_resid_post"]
    # 12 words + 3 end-of-text separators, cut into rows of BOS + 3 tokens ("wN" has id N + 4)
    assert cached.tokens.tolist() == [[1, 5, 6, 7], [1, 8, 2, 9], [1, 10, 11, 2], [1, 12, 13, 14], [1, 15, 16, 2]]
    model = load(model_folder)
    tokens = cached.tokens
    _, reference = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    torch.testing.assert_close(cached["blocks.1.hook_resid_post"], reference["blocks.1.hook_resid_post"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "gpt2-smal"], "Did you mean: gpt2-small"),
        (["info", "./no/such/folder"], "no/such/folder"),
        (
            ["cache", "MODEL", "--text-file", "missing.txt", "--names", "x", "--out", "o"],
            "text file not found: missing.txt",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lenskit: error: ") and message in err and err.count("\n") == 1


def test_unknown_hook_name_on_the_command_line(model_folder, tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("w1 w2\n")
    assert (
        main(
            [
                "cache",
                str(model_folder),
                "--text-file",
                str(text),
                "--names",
                "blocks.1.hook_resid_pst",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "unknown hook name 'blocks.1.hook_resid_pst'" in capsys.readouterr().err


def test_console_script_help_and_usage_error():
    done = subprocess.run([sys.executable, "-m", "lenskit.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "info" in done.stdout and "cache" in done.stdout
    done = subprocess.run([sys.executable, "-m", "lenskit.cli", "frobnicate"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice" in done.stderr
