"""`lenskit report`: the main job writes one offline page and a summary whose numbers are lenskit's own."""

import pytest
from headless_chromium import CHROMIUM, Chromium

import lenskit
from lenskit import cli
from lenskit.attribution import attribute
from lenskit.report import DEFAULT_ANSWER, DEFAULT_PROMPT, DEFAULT_WRONG
from lenskit.report import main as report_main
from lenskit.zoo import DEFAULT_MODEL


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert cli.main(["report", "--out", str(out)]) == 0
    return out


def test_the_summary_reports_the_models_logit_difference(report_page, capsys):
    model = lenskit.load(DEFAULT_MODEL)
    logits = model(model.to_tokens(DEFAULT_PROMPT))[0, -1]
    expected = (logits[model.to_single_token(DEFAULT_ANSWER)] - logits[model.to_single_token(DEFAULT_WRONG)]).item()
    report = report_main(DEFAULT_MODEL, report_page.parent / "again.html", progress=False)
    assert report.logit_diff == pytest.approx(expected, abs=1e-4)
    heads = attribute(model, DEFAULT_PROMPT, DEFAULT_ANSWER, DEFAULT_WRONG, by="head").query("component == 'head'")
    assert report.top_heads.value.tolist() == pytest.approx(heads.value.head(3).tolist())
    assert f"{expected:.3f}" in capsys.readouterr().out


def test_the_page_is_self_contained(report_page):
    html = report_page.read_text()
    assert html.count("CircuitsVis") >= 1 and "https://" not in html.split("</head>")[1]
    for title in ("logit lens", "attribution per head", "residual stream patching", "information-flow"):
        assert title in html, title


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_the_page_opens_offline_without_errors(report_page):
    with Chromium() as browser:
        tab = browser.open(report_page)
        tab.wait_for(
            "document.querySelectorAll('[id^=lenskit-cv-]').length > 0 && "
            "[...document.querySelectorAll('[id^=lenskit-cv-]')].every(d => d.children.length)"
        )
        pixels = tab.screenshot().astype(float)
        assert tab.requests == [report_page.resolve().as_uri()]
        assert tab.errors == []
    assert pixels.std() > 10


def test_a_corrupted_prompt_of_another_length_is_refused(tmp_path, capsys):
    assert cli.main(["report", "--corrupted", "When Mary went to the store", "--out", str(tmp_path / "r.html")]) == 2
    assert "as many tokens as the prompt" in capsys.readouterr().err


def test_the_report_runs_few_full_forward_passes(tmp_path):
    """One run of the prompt serves every analysis; patching adds the corrupted run (its cells re-run only
    the blocks after their layer, without the embedding). A full forward pass is counted where it embeds."""
    model = lenskit.load(DEFAULT_MODEL)
    embeddings = []
    model.hook_dict["hook_embed"].add_hook(lambda activation, hook: embeddings.append(activation.shape))
    try:
        from lenskit.report import build_report

        build_report(model, DEFAULT_MODEL, progress=False).save(tmp_path / "r.html")
    finally:
        model.reset_hooks()
    assert 1 <= len(embeddings) <= 6, embeddings
