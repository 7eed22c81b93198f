"""circuitsvis pictures and the offline page: the values drawn equal TransformerLens' own, and the page
renders in headless Chromium with the network blocked."""

import ast
import html
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import STORIES_DIR, make_model
from headless_chromium import CHROMIUM, Chromium

import lenskit
from lenskit import viz
from lenskit.lens import logit_lens
from lenskit.run import Run
from lenskit.viz import (
    Figure,
    attention_patterns,
    colored_tokens,
    forget_sent_scripts,
    heatmap,
    page,
    save_page,
    top_k_tokens,
)
from lenskit.viz.circuits import BUNDLE_PATH, NOT_LOADED, bundle_script

KINDS = ["gpt2", "llama", "neox"]
RENDER_CALL = re.compile(r'CircuitsVis\.render\("(lenskit-cv-\w+)", CircuitsVis\.(\w+), (.*?)\); else document')


def rendered_props(figure: Figure) -> list[tuple[str, dict]]:
    """(component, props) of each circuitsvis render call in the figure, props parsed back from the page."""
    return [(component, json.loads(props)) for _, component, props in RENDER_CALL.findall(figure.html)]


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return make_model(request.param)


# --- attention patterns ------------------------------------------------------------------------


def test_attention_patterns_draw_the_cached_pattern_of_every_head(model, tokens):
    _, cache = model.run_with_cache(tokens)
    [(component, props)] = rendered_props(Run(model, tokens).attention_patterns(layer=1, batch=2))
    assert component == "AttentionHeads"
    torch.testing.assert_close(torch.tensor(props["attention"]), cache["pattern", 1][2], atol=1e-6, rtol=0)
    assert props["tokens"] == [str(i) for i in tokens[2].tolist()]  # no tokenizer: ids as labels
    assert props["attentionHeadNames"] == ["L1H0", "L1H1", "L1H2", "L1H3"]


def test_attention_patterns_from_a_cache_do_not_run_the_model(model, tokens):
    _, cache = model.run_with_cache(tokens)

    def no_forward_pass(activation, hook):
        raise AssertionError("the model ran")

    with model.hooks(fwd_hooks=[("hook_embed", no_forward_pass)]):
        figure = Run(model, tokens, activations=cache, extend=False).attention_patterns(layer=-1, batch=0)
    [(_, props)] = rendered_props(figure)
    last = model.cfg.n_layers - 1
    torch.testing.assert_close(torch.tensor(props["attention"]), cache["pattern", last][0], atol=1e-6, rtol=0)
    assert f"attention patterns, layer {last}" in figure.html


def test_attention_patterns_label_tokens_with_the_tokenizer(word_model):
    [(_, props)] = rendered_props(Run(word_model, "the cat sat on a mat").attention_patterns(layer=0))
    assert props["tokens"] == ["<bos>", "the", "cat", "sat", "on", "a", "mat"]


def test_attention_patterns_reject_bad_layer_batch_and_cache(tokens):
    model = make_model("gpt2")
    with pytest.raises(ValueError, match=r"layer 3 out of range: the model has 3 layers \(0..2\)"):
        Run(model, tokens).attention_patterns(layer=3)
    with pytest.raises(ValueError, match=r"batch 3 out of range: the tokens have 3 batch rows"):
        Run(model, tokens).attention_patterns(layer=0, batch=3)
    with pytest.raises(ValueError, match=r"the cache holds no 'blocks.0.attn.hook_pattern'"):
        Run(model, tokens, activations={}, extend=False).attention_patterns(layer=0)
    _, short = model.run_with_cache(tokens[:, :4])
    short = {"blocks.0.attn.hook_pattern": short["pattern", 0]}  # a whole cache of a shorter run is refused at once
    with pytest.raises(ValueError, match=r"shape \(3, 4, 4, 4\), but these tokens need \(3, 4, 10, 10\)"):
        Run(model, tokens, activations=short, extend=False).attention_patterns(layer=0)
    assert not any(hook._forward_hooks for hook in model.hook_dict.values())


def test_attention_patterns_draw_the_pattern_they_are_given_and_check_its_shape():
    pattern = torch.rand(2, 3, 3)
    [(_, props)] = rendered_props(attention_patterns(pattern, ["a", "<b>", "c"], title="two heads"))
    torch.testing.assert_close(torch.tensor(props["attention"]), pattern)
    assert props["tokens"] == ["a", "<b>", "c"] and props["attentionHeadNames"] == ["H0", "H1"]
    with pytest.raises(ValueError, match=r"pattern of shape \(2, 3, 3\) for 2 tokens"):
        attention_patterns(pattern, ["a", "b"])
    with pytest.raises(ValueError, match="1 head names for 2 heads"):
        attention_patterns(pattern, ["a", "b", "c"], head_names=["L0H0"])


def test_viz_imports_no_analysis():
    """viz draws what it is given: none of its modules imports a model runner or an analysis."""
    imported = set()
    for path in Path(viz.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    ours = {name for name in imported if name.split(".")[0] == "lenskit"}
    assert {name for name in ours if not name.startswith("lenskit.viz")} <= {"lenskit.errors"}, ours


# --- coloured tokens ---------------------------------------------------------------------------


def test_colored_tokens_carry_one_value_per_token_and_escape_the_tokens():
    figure = colored_tokens(["<b>", " cat", "&"], torch.tensor([0.5, -2.0, 1.25]), title="surprise")
    [(component, props)] = rendered_props(figure)
    assert component == "ColoredTokens"
    assert props == {"tokens": ["&lt;b&gt;", " cat", "&amp;"], "values": [0.5, -2.0, 1.25]}
    assert "<b>" not in figure.html and "surprise" in figure.html
    with pytest.raises(ValueError, match=r"3 tokens but values of shape \(2,\)"):
        colored_tokens(["a", "b", "c"], [1.0, 2.0])
    with pytest.raises(ValueError, match="must be finite"):
        colored_tokens(["a"], [float("nan")])


# --- the lens' top-k tokens --------------------------------------------------------------------


def lens_by_hand(model, tokens, k):
    """Per layer (resid_pre of each block, then the model's own logits): top-k log probs and ids [pos-1, k],
    and the log prob and rank of the token that really follows [pos-1]."""
    logits, cache = model.run_with_cache(tokens)
    streams = [model.unembed(model.ln_final(cache["resid_pre", layer])) for layer in range(model.cfg.n_layers)]
    rows = []
    following = tokens[0, 1:]
    for layer_logits in [*streams, logits]:
        log_probs = layer_logits[0, :-1].log_softmax(-1)
        correct = log_probs[torch.arange(len(following)), following]
        rows.append((*log_probs.topk(k), correct, (log_probs > correct[:, None]).sum(-1)))
    return rows


def test_plot_topk_shows_each_layers_top_tokens_and_the_rank_of_the_next_token(model, tokens):
    figure = logit_lens(model, tokens, top_k=4, progress=False).plot_topk(batch=1)
    rendered = rendered_props(figure)
    by_hand = lens_by_hand(model, tokens[1:2], k=4)
    assert [component for component, _ in rendered] == ["TokenLogProbs"] * (model.cfg.n_layers + 1)
    for (_, props), (top_log_probs, top_ids, correct_log_prob, rank) in zip(rendered, by_hand):
        assert props["prompt"] == [str(i) for i in tokens[1].tolist()]
        torch.testing.assert_close(torch.tensor(props["topKLogProbs"]), top_log_probs, atol=1e-4, rtol=0)
        assert props["topKTokens"] == [[str(i) for i in row] for row in top_ids.tolist()]
        torch.testing.assert_close(torch.tensor(props["correctTokenLogProb"]), correct_log_prob, atol=1e-4, rtol=0)
        assert props["correctTokenRank"] == rank.tolist()
    assert f"blocks.{model.cfg.n_layers - 1}.hook_resid_post" in figure.html


def test_plot_topk_on_chosen_layers_and_its_errors(tokens):
    model = make_model("gpt2")
    assert len(rendered_props(logit_lens(model, tokens, top_k=2, layers=[0, 3], progress=False).plot_topk())) == 2
    with pytest.raises(ValueError, match="at least two tokens"):
        logit_lens(model, tokens[:, :1], progress=False).plot_topk()
    with pytest.raises(ValueError, match=r"batch -4 out of range"):
        logit_lens(model, tokens, progress=False).plot_topk(batch=-4)


def test_plot_topk_on_stories260k_agrees_with_the_models_own_prediction():
    if not STORIES_DIR.exists():
        pytest.skip(f"stories260K is not present at {STORIES_DIR}")
    model = lenskit.load(STORIES_DIR)
    text = "Once upon a time there was a little girl"
    props = rendered_props(logit_lens(model, text, top_k=3, progress=False).plot_topk())[-1][1]
    predicted = model(text)[0, :-1].argmax(-1)
    escaped = lambda strings: [html.escape(s, quote=False) for s in strings]  # noqa: E731  ("<s>" is a token)
    assert props["prompt"] == escaped(model.to_str_tokens(text))
    assert [row[0] for row in props["topKTokens"]] == escaped(model.to_str_tokens(predicted))


def test_top_k_tokens_checks_its_shapes():
    probs, ranks = torch.full((1, 2), 0.5), torch.zeros(1, 2, dtype=torch.long)
    figure = top_k_tokens(["a", "b", "c"], [[["x"], ["y"]]], torch.ones(1, 2, 1), probs, ranks, rows=["<L0>"])
    [(component, props)] = rendered_props(figure)
    assert component == "TokenLogProbs" and props["topKTokens"] == [["x"], ["y"]] and "&lt;L0&gt;" in figure.html
    with pytest.raises(ValueError, match="at least two tokens"):
        top_k_tokens(["a"], [[]], torch.ones(1, 0, 1), probs[:, :0], ranks[:, :0], rows=["L0"])
    with pytest.raises(ValueError, match=r"next_ranks has shape \(1, 1\), but 1 rows and a prompt of 3 tokens"):
        top_k_tokens(["a", "b", "c"], [[["x"], ["y"]]], torch.ones(1, 2, 1), probs, ranks[:, :1], rows=["L0"])


# --- pages and notebooks -----------------------------------------------------------------------


def test_the_bundle_is_the_packaged_circuitsvis_script_safe_to_inline():
    script = bundle_script()
    assert script.startswith("<script>") and script.endswith("</script>")
    assert script.lower().count("</script") == 1 and "sourceMappingURL" not in script
    assert len(script) > 0.99 * BUNDLE_PATH.stat().st_size and "var CircuitsVis" in script


def test_a_page_inlines_the_bundle_once_and_references_nothing_outside(tokens, tmp_path):
    model = make_model("gpt2")
    run = Run(model, tokens)
    figures = [
        run.attention_patterns(0),
        heatmap(torch.ones(1, 1), ["r"], ["c"]),
        run.attention_patterns(1),
        logit_lens(model, run, top_k=2, progress=False).plot_topk(),
    ]
    html = page(figures, title="two <patterns>")
    head, body = html.split("</head>")
    assert head.count(bundle_script()) == 1 and bundle_script() not in body
    assert "<title>two &lt;patterns&gt;</title>" in head
    assert not re.search(r"<(script|link|img|iframe|source)\b[^>]*\b(src|href)=", html, re.IGNORECASE)
    assert not re.search(r"@import|url\(", body) and not re.search(r"\bfrom\s*[\"']https?:", html)
    # every "</script" closes a script element: the bundle's, and one per render call ("<!--" could hide one)
    assert html.lower().count("</script") == 1 + len(RENDER_CALL.findall(html)) and "<!--" not in html
    assert save_page(figures, tmp_path / "p.html").read_text(encoding="utf-8").count("var CircuitsVis") == 1
    assert figures[1].page().count("<script") == 0  # a heatmap alone needs no script


def test_notebook_figures_send_the_bundle_once_per_session(tokens, monkeypatch):
    model = make_model("gpt2")
    first, second = Run(model, tokens).attention_patterns(0), colored_tokens(["a"], [1.0])
    forget_sent_scripts()
    assert first._repr_html_() == bundle_script() + first.html
    assert second._repr_html_() == second.html
    assert NOT_LOADED in second.html  # what shows where the first output's script is missing
    forget_sent_scripts()
    assert second._repr_html_() == bundle_script() + second.html
    monkeypatch.setitem(sys.modules, "google.colab", object())  # Colab: every output is its own frame
    assert first._repr_html_() == bundle_script() + first.html


# --- in a browser ------------------------------------------------------------------------------

ALL_RENDERED = """(() => {
  const divs = [...document.querySelectorAll('[id^=lenskit-cv-]')];
  if (!divs.length || !divs.every(d => d.children.length)) return null;
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
  return {figures: [...document.querySelectorAll('section')].map(box), texts: divs.map(d => d.innerText)};
})()"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_the_page_renders_in_headless_chromium_without_network_or_errors(word_model, tmp_path):
    text = "the cat sat on a mat and the dog ran"
    run = Run(word_model, text)
    figures = [
        run.attention_patterns(0),
        run.attention_patterns(1),
        colored_tokens(word_model.to_str_tokens(text), torch.linspace(-1, 1, 11)),
        heatmap(torch.randn(3, 4), ["L0", "L1", "L2"], ["a", "b", "c", "d"], title="grid"),
        logit_lens(word_model, run, top_k=3, progress=False).plot_topk(),
    ]
    path = save_page(figures, tmp_path / "page.html")
    with Chromium() as browser:
        tab = browser.open(path)
        shown = tab.wait_for(ALL_RENDERED)
        pixels = tab.screenshot().astype(float)
        # hovering a token of the lens' last row shows that position's top-k guesses
        last_row = "[...document.querySelectorAll('.lenskit-lens-topk [id^=lenskit-cv-]')].at(-1)"
        x, y = tab.evaluate(
            f"(() => {{ const token = {last_row}.querySelector('span span');"
            " token.scrollIntoView({block: 'center'}); const r = token.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        tab.move_mouse(x, y)
        tooltip = tab.wait_for(f"{last_row}.querySelector('table')?.innerText", timeout=10)
        assert tab.requests == [path.resolve().as_uri()]
        assert tab.errors == []
    assert not any(NOT_LOADED in t for t in shown["texts"])
    assert len(shown["figures"]) == len(figures)
    for left, top, width, height in shown["figures"]:  # every figure has drawn something
        region = pixels[int(top) : int(top + height), int(left) : int(left + width)]
        assert region.size and region.std(axis=(0, 1)).max() > 10
    props = rendered_props(figures[-1])[-1][1]
    top_token, top_log_prob = props["topKTokens"][0][0], props["topKLogProbs"][0][0]
    assert top_token in tooltip and f"{100 * math.exp(top_log_prob):.2f}%" in tooltip
