"""The main job: one prompt, every analysis, one self-contained HTML page (``lenskit report``).

    lenskit report                                   # the zoo's default model and IOI prompt
    lenskit report --model gpt2 --prompt "..." --answer " Mary" --wrong " John" --corrupted "..."

The page holds the tokens, the logit lens, attribution per layer and per head, the attention patterns
of the top heads, the residual-stream patching grid (clean prompt into the corrupted one) and the
information-flow graph. It inlines everything it shows (circuitsvis' bundle once), so it opens offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from lenskit.flow import flow
from lenskit import metrics, viz
from lenskit.attribution import attribute
from lenskit.lens import logit_lens
from lenskit.models import load
from lenskit.patching import patch
from lenskit.tokens import token_id
from lenskit.zoo import DEFAULT_MODEL

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
DEFAULT_ANSWER, DEFAULT_WRONG = " Mary", " John"
DEFAULT_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
TOP_HEADS = 3


@dataclass
class Report:
    """What `build_report` measured, and the page's figures."""

    model_name: str
    prompt: str
    answer: str
    wrong: str
    corrupted: str
    logit_diff: float
    corrupted_logit_diff: float
    top_heads: pd.DataFrame
    figures: list[viz.Figure] = field(default_factory=list)

    def summary(self) -> str:
        heads = ", ".join(f"L{r.layer}H{r.head} {r.value:+.2f}" for r in self.top_heads.itertuples())
        return "\n".join([
            f"model      {self.model_name}",
            f"prompt     {self.prompt!r}",
            f"logit diff {self.answer!r} - {self.wrong!r}: {self.logit_diff:.3f} "
            f"(corrupted {self.corrupted!r}: {self.corrupted_logit_diff:.3f})",
            f"top heads  {heads}",
        ])

    def save(self, path: str | Path) -> Path:
        return viz.save_page(self.figures, path, title=f"lenskit report: {self.model_name}")


def build_report(
    model: HookedTransformer,
    model_name: str,
    prompt: str = DEFAULT_PROMPT,
    answer: str = DEFAULT_ANSWER,
    wrong: str = DEFAULT_WRONG,
    corrupted: str = DEFAULT_CORRUPTED,
    progress: bool = True,
) -> Report:
    """Run every analysis on `prompt` and collect the figures."""
    tokens = model.to_tokens(prompt)
    corrupted_tokens = model.to_tokens(corrupted)
    if corrupted_tokens.shape != tokens.shape:
        raise ValueError(f"the corrupted prompt must have as many tokens as the prompt "
                         f"({corrupted_tokens.shape[1]} vs {tokens.shape[1]}): {model.to_str_tokens(corrupted)}")
    answer_id, wrong_id = token_id(model, answer), token_id(model, wrong)
    str_tokens = model.to_str_tokens(prompt)

    by_layer = attribute(model, tokens, answer_id, wrong_id, by="layer")
    by_head = attribute(model, tokens, answer_id, wrong_id, by="head")
    heads = by_head[by_head.component == "head"]
    head_grid = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    head_grid[heads["layer"].to_numpy(dtype=int), heads["head"].to_numpy(dtype=int)] = torch.tensor(heads.value.to_numpy(dtype=float)).float()
    top_heads = heads.head(TOP_HEADS)[["layer", "head", "value"]].reset_index(drop=True)
    metric = metrics.logit_diff(answer_id, wrong_id)
    patching = patch(model, tokens, corrupted_tokens, metric, site="resid_pre", by="layer_pos", progress=progress)
    with torch.no_grad():
        corrupted_logits = model(corrupted_tokens)[0, -1]
        surprise = [0.0, *model(tokens, return_type="loss", loss_per_token=True)[0].tolist()]  # -log p(token | prefix)
    corrupted_diff = (corrupted_logits[answer_id] - corrupted_logits[wrong_id]).item()

    figures = [
        viz.colored_tokens(str_tokens, surprise, title=f"prompt ({len(str_tokens)} tokens), coloured by -log p(token | prefix)"),
        logit_lens(model, tokens, targets=[answer_id, wrong_id], progress=progress).plot(title="logit lens: top token by layer"),
        _layer_attribution_figure(by_layer, model.cfg.n_layers, f"attribution of logit({answer!r}) - logit({wrong!r}) per layer"),
        viz.heatmap(head_grid, [f"L{layer}" for layer in range(model.cfg.n_layers)], [f"H{h}" for h in range(model.cfg.n_heads)],
                    title="attribution per head", row_title="layer", col_title="head"),
        *[viz.attention_patterns(model, tokens, layer) for layer in sorted(set(top_heads.layer.astype(int)))],
        patching.normalised().plot(title=f"residual stream patching: clean {prompt!r} into corrupted {corrupted!r} "
                                         "(0 = corrupted, 1 = clean)"),
        flow(model, tokens).plot(),
    ]
    return Report(model_name, prompt, answer, wrong, corrupted, by_layer.attrs["logit_diff"], corrupted_diff, top_heads, figures)


def _layer_attribution_figure(frame: pd.DataFrame, n_layers: int, title: str) -> viz.Figure:
    """Attention and MLP contributions as a [2, layer] heatmap (embeddings and biases in the title)."""
    grid = torch.zeros(2, n_layers)
    for row, component in enumerate(("attn", "mlp")):
        part = frame[frame.component == component]
        grid[row, part.layer.to_numpy(dtype=int)] = torch.tensor(part.value.to_numpy(dtype=float)).float()
    rest = frame[~frame.component.isin(["attn", "mlp"])].groupby("component").value.sum()
    others = ", ".join(f"{name} {value:+.2f}" for name, value in rest.items())
    return viz.heatmap(grid, ["attn", "mlp"], [f"L{layer}" for layer in range(n_layers)], title=f"{title} ({others})")


def main(model_name: str | None, out: str | Path, **options) -> Report:
    """`lenskit report`: build the report, save it to `out`, print the summary."""
    model_name = model_name or DEFAULT_MODEL
    report = build_report(load(model_name), model_name, **{k: v for k, v in options.items() if v is not None})
    path = report.save(out)
    print(report.summary())
    print(f"wrote {path}")
    return report
