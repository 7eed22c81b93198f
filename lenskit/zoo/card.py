"""Write a zoo checkpoint's model card (README.md) from its config, its training log and a fresh evaluation.

    python -m lenskit.zoo.card ioi-4l        # or a checkpoint folder

The numbers in the card are measured when it is written, by `lenskit.zoo.evaluate`, so the card
cannot drift from the weights beside it.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import lenskit
from lenskit.files import read_json
from lenskit.models import CONFIG_FILE, ZOO_PREFIX, ZOO_ROOT
from lenskit.zoo import data
from lenskit.zoo.evaluate import evaluate
from lenskit.zoo.train import LOG_FILE, RECIPES

CARD_FILE = "README.md"
TARGETS = [  # (what, measured value, target, met?) from the metrics of `evaluate`
    ("held-out IOI accuracy", lambda m: m["ioi_accuracy"], ">= 95%", lambda m: m["ioi_accuracy"] >= 0.95),
    ("held-out IOI logit difference", lambda m: m["ioi_logit_diff"], ">= 3.0", lambda m: m["ioi_logit_diff"] >= 3.0),
    ("best induction score", lambda m: m["induction_score"], ">= 0.6", lambda m: m["induction_score"] >= 0.6),
    (
        "repeated-half loss / first-half loss",
        lambda m: m["loss_second_half"] / m["loss_first_half"],
        "<= 0.5",
        lambda m: m["loss_second_half"] <= 0.5 * m["loss_first_half"],
    ),
]


def training_summary(folder: Path) -> dict:
    """Steps, final logged loss and training time from train_log.csv."""
    with open(folder / LOG_FILE) as f:
        rows = list(csv.DictReader(f))
    return {
        "steps": int(rows[-1]["step"]),
        "final_loss": float(rows[-1]["loss"]),
        "minutes": float(rows[-1]["seconds"]) / 60,
    }


def position_init(recipe) -> str:
    """How the card describes the start of W_pos: TransformerLens' random init unless the recipe says otherwise."""
    if recipe is None or recipe.sinusoidal_positions is None:
        return ""
    return f", initialised as {recipe.sinusoidal_positions} x the sinusoidal code of Vaswani et al., then trained"


def repeat_lengths(recipe) -> str:
    """The lengths of R seen in training, if the recipe is known."""
    return f", {recipe.repeat_lengths[0]} to {recipe.repeat_lengths[1]} tokens long" if recipe else ""


def model_card(name: str, folder: Path, metrics: dict) -> str:
    """The card's Markdown text."""
    cfg = read_json(folder / CONFIG_FILE)
    recipe = RECIPES.get(name)
    log = training_summary(folder)
    by_length = {
        key.rsplit("_", 1)[1]: value for key, value in metrics.items() if key.startswith("induction_score_length_")
    }
    mixture = ", ".join(f"{kind} {share:.0%}" for kind, share in recipe.mixture.items()) if recipe else "see train.py"
    return f"""# lenskit/{name}

A small GPT-2-style `HookedTransformer` trained by lenskit on synthetic text, shipped so that every
analysis runs offline on a model with real learned circuits. Load it with `lenskit.load("lenskit/{name}")`.

## Architecture
{cfg["n_layers"]} layers, d_model {cfg["d_model"]}, {cfg["n_heads"]} heads of {cfg["d_head"]}, MLP {cfg["d_mlp"]} ({cfg["act_fn"]}),
LayerNorm, learned positional embeddings (n_ctx {cfg["n_ctx"]}{position_init(recipe)}), untied unembedding, vocabulary {cfg["d_vocab"]} word-level
tokens (`lenskit.zoo.tokenizer`; `<bos>` is prepended, as TransformerLens does by default).

## Data (`lenskit.zoo.data`, generated on the fly, seeded)
Mixture per batch: {mixture}.
- IOI sentences in {len(data.TRAIN_TEMPLATES)} templates (ABBA and BABA), {len(data.TRAIN_NAMES)} names, {len(data.PLACES)} places, {len(data.OBJECTS)} objects.
- `<bos>` R R with R uniformly random tokens (induction){repeat_lengths(recipe)}.
- Simple templated stories with one or two characters (any name, the held-out ones included).

Held out for evaluation: {len(data.EVAL_NAMES)} names that never occur in a training IOI sentence
({", ".join(data.EVAL_NAMES)}) and {len(data.EVAL_TEMPLATES)} templates never seen in training.

## Training
`python -m lenskit.zoo.train {name}`: {log["steps"]} steps of batch {recipe.batch_size if recipe else "?"}, AdamW, peak lr
{recipe.lr if recipe else "?"} with warmup and cosine decay, on one CPU thread ({log["minutes"]:.0f} minutes). Final training loss
{log["final_loss"]:.3f} (mean of the last logging interval; per-interval losses in `{LOG_FILE}`).

## Measured behaviours
`python -m lenskit.zoo.evaluate {name}` ({metrics["n_prompts"]} held-out IOI prompts: held-out names in held-out templates):

| behaviour | value |
|---|---|
| IOI accuracy (logit IO > logit S), with BOS | {metrics["ioi_accuracy"]:.1%} |
| IOI mean logit difference, with BOS | {metrics["ioi_logit_diff"]:.2f} |
| IOI accuracy, without BOS | {metrics["ioi_accuracy_no_bos"]:.1%} |
| IOI mean logit difference, without BOS (the BOS effect) | {metrics["ioi_logit_diff_no_bos"]:.2f} |
| IOI mean logit difference, training names and templates | {metrics["ioi_logit_diff_train_names_templates"]:.2f} |
| best induction head (TransformerLens score on repeated random tokens) | {metrics["induction_head"]}: {metrics["induction_score"]:.2f} |
| best head on the diagonal one position past it (copying from the token after next) | {metrics["shifted_induction_head"]}: {metrics["shifted_induction_score"]:.2f} |
| best induction score by length of R ({" / ".join(by_length)}) | {" / ".join(f"{v:.2f}" for v in by_length.values())} |
| loss on first / repeated half of `<bos>` R R | {metrics["loss_first_half"]:.2f} / {metrics["loss_second_half"]:.2f} |

## Against the zoo's targets

| target | measured | wanted | met |
|---|---|---|---|
""" + "".join(
        f"| {what} | {value(metrics):.3g} | {wanted} | {'yes' if met(metrics) else 'NO'} |\n"
        for what, value, wanted, met in TARGETS
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="zoo name (ioi-4l) or a checkpoint folder")
    args = parser.parse_args(argv)
    folder = Path(args.name) if "/" in args.name else ZOO_ROOT / args.name.removeprefix(ZOO_PREFIX)
    name = folder.name
    metrics = evaluate(lenskit.load(folder))
    card = folder / CARD_FILE
    card.write_text(model_card(name, folder, metrics))
    print(card.read_text())
    return card


if __name__ == "__main__":
    main()
