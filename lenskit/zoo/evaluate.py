"""Measure a zoo model's behaviours on held-out data: IOI (with and without BOS) and induction.

    python -m lenskit.zoo.evaluate ioi-4l        # or a folder written by lenskit.zoo.train

Independent of the training code: prompts go through the model's own tokenizer (`to_tokens`),
induction scores are read from `run_with_cache` attention patterns.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import Tensor

import lenskit
from lenskit.backend import Model
from lenskit.models import ZOO_PREFIX
from lenskit.zoo.data import IOIExample, ioi_dataset
from lenskit.zoo.tokenizer import SPECIAL_TOKENS

IOI_PROMPTS = 200
INDUCTION_LENGTH = 20
INDUCTION_BATCH = 16
INDUCTION_LENGTHS = (10, 20, 30)
"""Lengths of R at which the best induction score is also reported, where <bos> R R fits the context."""


@torch.no_grad()
def ioi_logit_diffs(model: Model, examples: list[IOIExample], prepend_bos: bool = True) -> Tensor:
    """logit(indirect object) - logit(subject) at each prompt's last position: [n_examples]."""
    tokens = model.to_tokens([e.prompt for e in examples], prepend_bos=prepend_bos, padding_side="right")
    pad = model.tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["pad_token"])
    last = (tokens != pad).sum(dim=1) - 1
    logits = model(tokens)[torch.arange(len(examples)), last]  # [n_examples, d_vocab]
    io = torch.tensor([model.to_single_token(" " + e.io) for e in examples])
    subject = torch.tensor([model.to_single_token(" " + e.subject) for e in examples])
    return logits.gather(1, io[:, None])[:, 0] - logits.gather(1, subject[:, None])[:, 0]


def repeated_tokens(model: Model, length: int, batch: int, seed: int = 0) -> Tensor:
    """[BOS] + R + R with R uniform over the non-special tokens: [batch, 1 + 2 * length]."""
    generator = torch.Generator().manual_seed(seed)
    first_word = len(SPECIAL_TOKENS)
    half = torch.randint(first_word, model.cfg.d_vocab, (batch, length), generator=generator)
    bos = torch.full((batch, 1), model.tokenizer.bos_token_id)
    return torch.cat([bos, half, half], dim=1)


@torch.no_grad()
def induction(model: Model, length: int = INDUCTION_LENGTH, batch: int = INDUCTION_BATCH, seed: int = 0) -> dict:
    """Induction scores [n_layers, n_heads] (TransformerLens Main Demo: the mean attention on the
    diagonal offset 1 - length), the same on the diagonal one further right ("shifted_scores": a head
    that copies from the token after next, reading the answer from a previous-token output there),
    and the mean loss on the first and the second copy of R."""
    tokens = repeated_tokens(model, length, batch, seed)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))

    def diagonal_scores(offset: int) -> Tensor:
        return torch.stack(
            [
                cache["pattern", layer].diagonal(offset=offset, dim1=-2, dim2=-1).mean(dim=(0, 2))
                for layer in range(model.cfg.n_layers)
            ]
        )

    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(0)  # [2 * length]
    return {
        "scores": diagonal_scores(1 - length),
        "shifted_scores": diagonal_scores(2 - length),
        "loss_first_half": losses[:length].mean().item(),
        "loss_second_half": losses[length:].mean().item(),
    }


def best_head(scores: Tensor) -> tuple[str, float]:
    """The "layer.head" name and score of the highest entry of scores [n_layers, n_heads]."""
    layer, head = divmod(int(scores.argmax()), scores.shape[1])
    return f"{layer}.{head}", scores.max().item()


def evaluate(model: Model, n_prompts: int = IOI_PROMPTS, seed: int = 0) -> dict:
    """All measured behaviours on held-out names in held-out templates, as a flat dict of numbers."""
    examples = ioi_dataset(n_prompts, seed=seed, held_out=True)
    with_bos = ioi_logit_diffs(model, examples, prepend_bos=True)
    without_bos = ioi_logit_diffs(model, examples, prepend_bos=False)
    in_distribution = ioi_logit_diffs(model, ioi_dataset(n_prompts, seed=seed, held_out=False))
    fitting = [length for length in INDUCTION_LENGTHS if 1 + 2 * length <= model.cfg.n_ctx]
    by_length = {length: induction(model, length, seed=seed) for length in {INDUCTION_LENGTH, *fitting}}
    result = by_length[INDUCTION_LENGTH]
    induction_head, induction_score = best_head(result["scores"])
    shifted_head, shifted_score = best_head(result["shifted_scores"])
    return {
        "n_prompts": n_prompts,
        "ioi_accuracy": (with_bos > 0).float().mean().item(),
        "ioi_logit_diff": with_bos.mean().item(),
        "ioi_accuracy_no_bos": (without_bos > 0).float().mean().item(),
        "ioi_logit_diff_no_bos": without_bos.mean().item(),
        "ioi_logit_diff_train_names_templates": in_distribution.mean().item(),
        "induction_head": induction_head,
        "induction_score": induction_score,
        "shifted_induction_head": shifted_head,
        "shifted_induction_score": shifted_score,
        "loss_first_half": result["loss_first_half"],
        "loss_second_half": result["loss_second_half"],
        **{f"induction_score_length_{length}": by_length[length]["scores"].max().item() for length in fitting},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="zoo name (ioi-4l or lenskit/ioi-4l) or a checkpoint folder")
    parser.add_argument("--prompts", type=int, default=IOI_PROMPTS, help="held-out IOI prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out data")
    args = parser.parse_args(argv)
    name = args.name if "/" in args.name else ZOO_PREFIX + args.name
    model = lenskit.load(name)
    metrics = evaluate(model, args.prompts, args.seed)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
