"""The main job: one prompt, every analysis, one self-contained HTML page (``lenskit report``).

    lenskit report                                   # the zoo's default model and IOI prompt
    lenskit report --model gpt2 --prompt "..." --answer " Mary" --wrong " John" --corrupted "..."

The page holds the tokens, the logit lens, attribution per layer and per head, the attention patterns
of the top heads, the residual-stream patching grid (clean prompt into the corrupted one) and the
information-flow graph. It inlines everything it shows (circuitsvis' bundle once), so it opens offline.

One `Run` of the prompt (every hook cached in one forward pass) serves the lens, attribution, the
attention pictures, the flow graph and the clean side of patching; patching adds one forward pass of
the corrupted prompt and re-runs only the layers and positions each patch changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lenskit import metrics, viz
from lenskit.attribution import attribute
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.flow import flow
from lenskit.lens import logit_lens
from lenskit.models import load
from lenskit.patching import patch
from lenskit.run import Run
from lenskit.tokens import as_tokens, token_id
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
        return "\n".join(
            [
                f"model      {self.model_name}",
                f"prompt     {self.prompt!r}",
                f"logit diff {self.answer!r} - {self.wrong!r}: {self.logit_diff:.3f} "
                f"(corrupted {self.corrupted!r}: {self.corrupted_logit_diff:.3f})",
                f"top heads  {heads}",
            ]
        )

    def save(self, path: str | Path) -> Path:
        return viz.save_page(self.figures, path, title=f"lenskit report: {self.model_name}")


def build_report(
    model: Model,
    model_name: str,
    prompt: str = DEFAULT_PROMPT,
    answer: str = DEFAULT_ANSWER,
    wrong: str = DEFAULT_WRONG,
    corrupted: str = DEFAULT_CORRUPTED,
    progress: bool = True,
) -> Report:
    """Run every analysis on `prompt` and collect the figures."""
    run = Run.everything(model, as_tokens(model, prompt, "prompt"))
    corrupted_tokens = as_tokens(model, corrupted, "corrupted")
    if corrupted_tokens.shape != run.tokens.shape:
        raise InputError(
            f"the corrupted prompt must have as many tokens as the prompt "
            f"({corrupted_tokens.shape[1]} vs {run.tokens.shape[1]}): {model.to_str_tokens(corrupted)}"
        )
    answer_id, wrong_id = token_id(model, answer, "answer"), token_id(model, wrong, "wrong")
    str_tokens = run.str_tokens()

    by_layer = attribute(model, run, answer_id, wrong_id, by="layer")
    by_head = attribute(model, run, answer_id, wrong_id, by="head")
    top_heads = by_head[by_head.component == "head"].head(TOP_HEADS)[["layer", "head", "value"]].reset_index(drop=True)
    patching = patch(
        model,
        run,
        corrupted_tokens,
        metrics.logit_diff(answer_id, wrong_id),
        site="resid_pre",
        by="layer_pos",
        progress=progress,
    )
    surprise = [0.0, *model.loss_fn(run.logits, run.tokens, per_token=True)[0].tolist()]  # -log p(token | prefix)

    title = f"logit({answer!r}) - logit({wrong!r})"
    figures = [
        viz.colored_tokens(
            str_tokens, surprise, title=f"prompt ({len(str_tokens)} tokens), coloured by -log p(token | prefix)"
        ),
        logit_lens(model, run, targets=[answer_id, wrong_id], progress=progress).plot(
            title="logit lens: top token by layer"
        ),
        by_layer.plot(title=f"attribution per layer of {title}"),
        by_head.plot(title=f"attribution per head of {title}"),
        *[run.attention_patterns(layer) for layer in sorted(set(top_heads.layer.astype(int)))],
        patching.normalised().plot(
            title=f"residual stream patching: clean {prompt!r} into corrupted {corrupted!r} (0 = corrupted, 1 = clean)"
        ),
        flow(model, run, progress=progress).plot(),
    ]
    return Report(
        model_name,
        prompt,
        answer,
        wrong,
        corrupted,
        by_layer.attrs["logit_diff"],
        patching.corrupted_value,
        top_heads,
        figures,
    )


def main(model_name: str | None, out: str | Path, **options) -> Report:
    """`lenskit report`: build the report, save it to `out`, print the summary."""
    model_name = model_name or DEFAULT_MODEL
    report = build_report(load(model_name), model_name, **{k: v for k, v in options.items() if v is not None})
    path = report.save(out)
    print(report.summary())
    print(f"wrote {path}")
    return report
