"""The BOS experiment (TransformerLens Main Demo): the IOI logit difference with and without a prepended BOS.

On GPT-2 small the Main Demo's prompt, "Claire and Mary went to the shops, then Mary gave a bottle of
milk to", " Claire" vs " Mary", gives 6.754 with BOS and 2.782 without. The zoo model runs the same
measurement on a prompt in its own vocabulary, and on held-out IOI prompts.
"""

from __future__ import annotations

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from lenskit.experiments.reproduction import Reproduction, resolve_model
from lenskit.tokens import token_id
from lenskit.zoo import DEFAULT_MODEL
from lenskit.zoo.data import ioi_dataset
from lenskit.zoo.evaluate import ioi_logit_diffs

DEMO = ("Claire and Mary went to the shops, then Mary gave a bottle of milk to", " Claire", " Mary")
ZOO = ("When Claire and Mary went to the shop, Mary gave a drink to", " Claire", " Mary")
HELD_OUT_PROMPTS = 100


def logit_diff(model: HookedTransformer, prompt: str, answer: str, wrong: str, prepend_bos: bool) -> float:
    """logit(answer) - logit(wrong) after the prompt's last token."""
    with torch.no_grad():
        logits = model(model.to_tokens(prompt, prepend_bos=prepend_bos))[0, -1]
    return (logits[token_id(model, answer)] - logits[token_id(model, wrong)]).item()


def knows_every_word(model: HookedTransformer, text: str) -> bool:
    """Whether the tokenizer reads `text` without an unknown token."""
    unk = getattr(model.tokenizer, "unk_token_id", None)
    return unk is None or unk not in model.to_tokens(text, prepend_bos=False)[0]


def run(model: HookedTransformer | str | None = None, progress: bool = True) -> Reproduction:
    model = resolve_model(model, DEFAULT_MODEL)
    prompt, answer, wrong = DEMO if knows_every_word(model, DEMO[0]) else ZOO
    rows = [{
        "prompt": prompt, "answer - wrong": f"{answer!r} - {wrong!r}",
        "with BOS": logit_diff(model, prompt, answer, wrong, True),
        "without BOS": logit_diff(model, prompt, answer, wrong, False),
    }]
    examples = ioi_dataset(HELD_OUT_PROMPTS, held_out=True)
    if all(knows_every_word(model, e.prompt) for e in examples):
        rows.append({
            "prompt": f"mean over {HELD_OUT_PROMPTS} held-out IOI prompts", "answer - wrong": "IO - S",
            "with BOS": ioi_logit_diffs(model, examples, prepend_bos=True).mean().item(),
            "without BOS": ioi_logit_diffs(model, examples, prepend_bos=False).mean().item(),
        })
    table = pd.DataFrame(rows)
    table["BOS effect"] = table["with BOS"] - table["without BOS"]
    return Reproduction(
        "Logit difference with and without a prepended BOS", table,
        notes="GPT-2 small on the Main Demo prompt: 6.754 with BOS, 2.782 without (TransformerLens Main Demo).",
    )
