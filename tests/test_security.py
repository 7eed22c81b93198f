"""Nothing read from a file is trusted: no remote code unless the caller asks, no path outside where the
user pointed, every token string entering HTML escaped (checked in headless Chromium)."""

import json

import pytest
import torch
import transformers
from conftest import make_model
from headless_chromium import CHROMIUM, Chromium
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models

import lenskit
from lenskit import viz
from lenskit.run import Run
from lenskit.shards import load_cache, stream_cache

# --- remote code and the network ---------------------------------------------------------------------


def remote_code_folder(root, marker):
    """A tokenizer folder whose auto_map points at Python that, if ever imported, writes `marker`."""
    folder = root / "evil_tokenizer"
    folder.mkdir()
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"})
    )
    return folder


def test_a_lenskit_folder_cannot_switch_on_remote_code(tmp_path):
    marker = tmp_path / "ran"
    evil = remote_code_folder(tmp_path, marker)
    folder = tmp_path / "model"
    lenskit.save(lenskit.load("lenskit/ioi-4l"), folder)
    config = json.loads((folder / "hooked_transformer.json").read_text())
    config |= {"tokenizer_name": str(evil), "trust_remote_code": True}
    (folder / "hooked_transformer.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").unlink()  # so TransformerLens would reach for tokenizer_name
    model = lenskit.load(folder)
    assert not marker.exists() and model.tokenizer is None and model.cfg.trust_remote_code is False


def test_a_config_file_cannot_switch_on_remote_code_or_reach_out(tmp_path):
    marker = tmp_path / "ran"
    remote_code_folder(tmp_path, marker)
    fields = dict(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=16, d_vocab=20, act_fn="gelu")
    config = tmp_path / "model.json"
    config.write_text(json.dumps(fields | {"tokenizer_name": "evil_tokenizer", "trust_remote_code": True}))
    with pytest.raises(ValueError):  # transformers refuses the auto_map without the caller's consent
        lenskit.load(config)
    assert not marker.exists()
    for name in ("gpt2", "../outside", str(tmp_path.parent)):
        config.write_text(json.dumps(fields | {"tokenizer_name": name}))
        with pytest.raises(ValueError, match="may name only a tokenizer folder inside its own folder"):
            lenskit.load(config)
    config.write_text(json.dumps(fields | {"trust_remote_code": True}))
    assert lenskit.load(config).cfg.trust_remote_code is False


@pytest.mark.parametrize(
    "name", ["lenskit/../../..", "lenskit/../zoo/checkpoints/ioi-4l", "lenskit//etc", "lenskit/ioi-4l/../ioi-4l"]
)
def test_zoo_names_never_leave_the_zoo(name):
    with pytest.raises(ValueError, match="is not a zoo name"):
        lenskit.load(name)
    from lenskit import whisper

    with pytest.raises(ValueError, match="is not a zoo name"):
        whisper.load(name)


# --- the activation store ----------------------------------------------------------------------------


@pytest.fixture
def stored_cache(tmp_path):
    model = make_model("gpt2")
    out = tmp_path / "acts"
    stream_cache(model, torch.randint(0, 89, (4, 8)), "blocks.0.hook_resid_post", out, batch_size=2, progress=False)
    return out


@pytest.mark.parametrize(
    "shard_file", ["../../outside.safetensors", "/etc/passwd", "sub/shard_00000.safetensors", None, 7]
)
def test_load_cache_reads_only_shards_inside_its_folder(stored_cache, shard_file):
    manifest = json.loads((stored_cache / "manifest.json").read_text())
    manifest["shards"][0]["file"] = shard_file
    (stored_cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="shards are files shard_NNNNN.safetensors inside the cache folder"):
        load_cache(stored_cache)


def test_stream_cache_removes_only_its_own_temporary_files(tmp_path):
    out = tmp_path / "acts"
    out.mkdir()
    mine = [out / "notes.tmp", out / "draft.safetensors.tmp"]
    for path in mine:
        path.write_text("the user's")
    (out / "shard_00000.safetensors.tmp").write_text("half-written by an interrupted run")
    stream_cache(make_model("gpt2"), torch.randint(0, 89, (4, 8)), "blocks.0.hook_resid_post", out, progress=False)
    assert all(path.read_text() == "the user's" for path in mine)
    assert not (out / "shard_00000.safetensors.tmp").exists()
    assert len(load_cache(out)) == 4


# --- HTML: token strings are payloads ----------------------------------------------------------------

PAYLOADS = [
    "<script>window.pwned=1</script>",
    "<!--<script>",
    "<img/src=x/onerror=window.pwned=2>",
    "</script><script>window.pwned=3</script>",
    "\u2028window.pwned=4\u2029",
    "&lt;b&gt;",
]
WORDS = ["<unk>", "<bos>", "<eos>", "<pad>", "the", "cat", *PAYLOADS]


@pytest.fixture(scope="module")
def payload_model(tmp_path_factory):
    """A model whose tokens are script-injection payloads (split on whitespace only)."""
    tokenizer = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    model = make_model("gpt2", d_vocab=len(WORDS))
    folder = tmp_path_factory.mktemp("payload-tokenizer")
    fast.save_pretrained(folder)
    model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(folder))
    return model


def payload_tokens() -> torch.Tensor:
    """[1, pos]: BOS, "the", every payload, "cat", "the" (ids: whitespace inside a payload cannot split it)."""
    return torch.tensor([[1, 4, *range(6, 6 + len(PAYLOADS)), 5, 4]])


def test_payload_tokens_read_back_as_the_payloads(payload_model):
    assert payload_model.to_str_tokens(payload_tokens()[0]) == ["<bos>", "the", *PAYLOADS, "cat", "the"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_nothing_in_the_tokens_runs_in_a_browser(payload_model, tmp_path):
    prompt = payload_tokens()
    lens = lenskit.logit_lens(payload_model, prompt, targets=[6], progress=False)
    graph = lenskit.flow(payload_model, prompt, progress=False)
    figures = [
        lens.plot(),
        Run(payload_model, prompt).attention_patterns(layer=0),
        viz.colored_tokens(payload_model.to_str_tokens(prompt[0]), list(range(prompt.shape[1]))),
        lens.plot_topk(),
        graph.plot(),
    ]
    path = viz.save_page(figures, tmp_path / "page.html")
    fragments = tmp_path / "fragments.html"  # what a notebook shows
    fragments.write_text(
        "<html><body>"
        + lens._repr_html_()
        + graph._repr_html_()
        + lenskit.attribute(payload_model, prompt, 6, 5, by="position").to_html()
        + "</body></html>"
    )
    for page in (path, fragments):
        with Chromium() as browser:
            tab = browser.open(page)
            tab.wait_for("document.readyState === 'complete'")
            if page == path:  # the graph's own script survived "<!--<script>" in its data, and ran
                tab.wait_for("document.querySelector('.lenskit-routes')?.getAttribute('data-ready')")
                assert tab.evaluate("document.querySelectorAll('path[data-edge]').length") > 0
            assert tab.evaluate("typeof window.pwned") == "undefined", page.name
            assert tab.evaluate("document.querySelectorAll('img[src=x]').length") == 0
            text = tab.evaluate("document.body.innerText")
            assert "<script>window.pwned=1</script>" in text  # shown as text, not run
            assert tab.errors == [], tab.errors
