"""The BOS experiment (TransformerLens Main Demo): the IOI logit difference with and without a prepended BOS.

On GPT-2 small the Main Demo's prompt, "Claire and Mary went to the shops, then Mary gave a bottle of
milk to", " Claire" vs " Mary", gives 6.754 with BOS and 2.782 without. The zoo model runs the same
measurement on a prompt in its own vocabulary, and on held-out IOI prompts; a pretrained model that reads
the IOI paper's templates (`lenskit.experiments.ioi`) runs it on that set too.

"With BOS" puts the tokenizer's BOS token (``tokenizer.bos_token_id``) in front of the prompt's own
tokens, whatever the model does by default; "without BOS" runs the prompt's tokens alone. Models whose
tokenizer adds no BOS by default (SmolLM2: its BOS is <|im_start|>) thus get it explicitly.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.experiments import ioi
from lenskit.experiments.reproduction import Reproduction, model_label, resolve_model
from lenskit.readout import Readout
from lenskit.tokens import as_tokens, knows_every_word, token_id, token_ids
from lenskit.zoo import DEFAULT_MODEL
from lenskit.zoo.data import ioi_dataset
from lenskit.zoo.evaluate import ioi_logit_diffs

DEMO = ("Claire and Mary went to the shops, then Mary gave a bottle of milk to", " Claire", " Mary")
ZOO = ("When Claire and Mary went to the shop, Mary gave a drink to", " Claire", " Mary")
HELD_OUT_PROMPTS = 100


def bos_id(model: Model) -> int:
    """The tokenizer's BOS token id; a lenskit error when it has none."""
    bos = getattr(model.tokenizer, "bos_token_id", None)
    if bos is None:
        raise InputError("the BOS experiment needs a tokenizer with a BOS token; this one has none")
    return bos


def tokens_with(model: Model, prompts: list[str], prepend_bos: bool) -> Tensor:
    """The prompts' own tokens [batch, pos] (all of one length), with the BOS token put in front if asked."""
    tokens = as_tokens(model, prompts, "prompts", prepend_bos=False)
    if prepend_bos:
        tokens = torch.cat([torch.full_like(tokens[:, :1], bos_id(model)), tokens], dim=1)
    return tokens


def last_logits(model: Model, tokens: Tensor) -> Tensor:
    """The logits at the last position [batch, d_vocab] (the vocabulary projected at that position only)."""
    with torch.no_grad():
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)[:, -1:]
        return Readout(model)(resid)[:, 0]


def logit_diff(model: Model, prompt: str, answer: str, wrong: str, prepend_bos: bool) -> float:
    """logit(answer) - logit(wrong) after the prompt's last token."""
    logits = last_logits(model, tokens_with(model, [prompt], prepend_bos))[0]
    return (logits[token_id(model, answer)] - logits[token_id(model, wrong)]).item()


def mean_logit_diff(
    model: Model, prompts: list[str], answers: list[str], wrongs: list[str], prepend_bos: bool
) -> float:
    """The mean over prompts of logit(answer) - logit(wrong), prompts run in batches of one length."""
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(as_tokens(model, prompt, "prompts", prepend_bos=False).shape[1], []).append(i)
    total = 0.0
    for members in by_length.values():
        logits = last_logits(model, tokens_with(model, [prompts[i] for i in members], prepend_bos))
        rows = torch.arange(len(members))
        total += (
            (
                logits[rows, token_ids(model, [answers[i] for i in members])]
                - logits[rows, token_ids(model, [wrongs[i] for i in members])]
            )
            .sum()
            .item()
        )
    return total / len(prompts)


def run(model: Model | str | None = None, progress: bool = True, n_frames: int | None = None) -> Reproduction:
    """The BOS experiment; `n_frames` sets the size of the IOI paper's set where it is used (two prompts a frame)."""
    name = model if isinstance(model, str) else None
    model = resolve_model(model, DEFAULT_MODEL)
    bos = bos_id(model)
    prompt, answer, wrong = DEMO if knows_every_word(model, DEMO[0]) else ZOO
    rows = [
        {
            "prompt": prompt,
            "answer - wrong": f"{answer!r} - {wrong!r}",
            "with BOS": logit_diff(model, prompt, answer, wrong, True),
            "without BOS": logit_diff(model, prompt, answer, wrong, False),
        }
    ]
    paper = ioi.paper_set(model, n_frames)
    if paper is not None:
        rows.append(
            {
                "prompt": f"mean over {len(paper)} IOI prompts (the IOI paper's templates and names)",
                "answer - wrong": "IO - S",
                "with BOS": mean_logit_diff(
                    model,
                    [e.prompt for e in paper],
                    [" " + e.io for e in paper],
                    [" " + e.subject for e in paper],
                    True,
                ),
                "without BOS": mean_logit_diff(
                    model,
                    [e.prompt for e in paper],
                    [" " + e.io for e in paper],
                    [" " + e.subject for e in paper],
                    False,
                ),
            }
        )
    else:
        examples = ioi_dataset(HELD_OUT_PROMPTS, held_out=True)
        if all(knows_every_word(model, e.prompt) for e in examples):
            rows.append(
                {
                    "prompt": f"mean over {HELD_OUT_PROMPTS} held-out IOI prompts",
                    "answer - wrong": "IO - S",
                    "with BOS": ioi_logit_diffs(model, examples, prepend_bos=True).mean().item(),
                    "without BOS": ioi_logit_diffs(model, examples, prepend_bos=False).mean().item(),
                }
            )
    table = pd.DataFrame(rows)
    table["BOS effect"] = table["with BOS"] - table["without BOS"]
    default = "prepends it" if model.cfg.default_prepend_bos else "does not prepend it"
    notes = (
        f"{model_label(model, name)}: 'with BOS' puts {model.tokenizer.convert_ids_to_tokens(bos)!r} (id {bos}) "
        f"before the prompt's tokens; by default this model {default}. "
        "GPT-2 small on the Main Demo prompt: 6.754 with BOS, 2.782 without (TransformerLens Main Demo): BOS "
        "adds 3.972. Here: "
        + "; ".join(
            f"{effect:+.3f} ({row})"
            for row, effect in zip(
                ["the Main Demo prompt" if prompt == DEMO[0] else "the zoo's prompt", "the IOI set"],
                table["BOS effect"],
            )
        )
        + (
            ". BOS helps here, as it does GPT-2."
            if (table["BOS effect"] > 0).all()
            else ". Unlike GPT-2, BOS lowers the logit difference here."
            if (table["BOS effect"] < 0).all()
            else ". Unlike GPT-2, BOS does not help everywhere here."
        )
    )
    return Reproduction(
        "Logit difference with and without a prepended BOS",
        table,
        notes=notes,
        numbers={
            "bos_token": model.tokenizer.convert_ids_to_tokens(bos),
            "bos_token_id": bos,
            "default_prepend_bos": bool(model.cfg.default_prepend_bos),
        },
    )
