"""Train a zoo model on the data mixture of `lenskit.zoo.data` and save it as a lenskit folder.

    python -m lenskit.zoo.train ioi-4l                          # writes lenskit/zoo/checkpoints/ioi-4l/
    python -m lenskit.zoo.train tiny --steps 20 --out /tmp/tiny  # a smoke run
    python -m lenskit.zoo.train ioi-4l --init DIR --out DIR2     # continue training a saved model

Seeded and reproducible (on the same machine and thread count). The folder gets the files of
`lenskit.models.save` and train_log.csv (step, loss, lr, seconds, induction): the loss averaged
over each logging interval, and the best TransformerLens induction score of any head at that step,
so the log shows when the induction circuit forms.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from lenskit import backend
from lenskit.config import CONFIG_NEEDS_TL3
from lenskit.models import ZOO_ROOT, load, save
from lenskit.zoo.data import training_batch, vocabulary
from lenskit.zoo.evaluate import induction
from lenskit.zoo.tokenizer import as_transformers, build_tokenizer

if not backend.TL4:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

LOG_FILE = "train_log.csv"


@dataclass
class Recipe:
    """Architecture and optimisation of one zoo model."""

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 64
    mixture: dict[str, float] = field(default_factory=lambda: {"ioi": 0.4, "repeated": 0.3, "stories": 0.3})
    repeat_lengths: tuple[int, int] = (6, 24)
    steps: int = 8000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    log_every: int = 50
    seed: int = 0
    sinusoidal_positions: float | None = None
    """Start W_pos (still learned) at the sinusoidal code times this scale, instead of TransformerLens'
    random init: every offset i - j is then one linear map away, so previous-token heads, and with them
    induction heads, form early."""


RECIPES = {
    # 2 heads per layer, W_pos started at the sinusoidal code. With TransformerLens' random W_pos init,
    # standard induction formed in 1 of about 12 runs (seeds and data variants): layer 0 stayed a
    # diffuse bag of earlier tokens and layer 1 copied with a blurred circuit one position past the
    # induction diagonal (best induction score about 0.1). With the sinusoidal start, every seed tried
    # (0, 1, 2) formed an induction head, scoring 0.8 or more by step 3000 (train_log.csv's column).
    "ioi-4l": Recipe(n_heads=2, steps=6000, sinusoidal_positions=0.1, seed=2),
    "tiny": Recipe(n_layers=1, d_model=32, n_heads=2, d_mlp=64, steps=50, warmup_steps=5, log_every=5),
}


def sinusoidal_code(n_ctx: int, d_model: int) -> Tensor:
    """The position code of "Attention Is All You Need": [n_ctx, d_model], sin on even, cos on odd columns."""
    position = torch.arange(n_ctx)[:, None].float()
    frequency = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2).float() / d_model)
    code = torch.zeros(n_ctx, d_model)
    code[:, 0::2] = torch.sin(position * frequency)
    code[:, 1::2] = torch.cos(position * frequency)
    return code


def build_model(recipe: Recipe) -> HookedTransformer:
    """A freshly initialised GPT-2-style HookedTransformer with the zoo tokenizer (seeded by recipe.seed)."""
    backend.needs_tl3("training a zoo model", CONFIG_NEEDS_TL3)
    tokenizer = as_transformers(build_tokenizer(vocabulary()))
    cfg = HookedTransformerConfig(
        n_layers=recipe.n_layers,
        d_model=recipe.d_model,
        n_heads=recipe.n_heads,
        d_head=recipe.d_model // recipe.n_heads,
        d_mlp=recipe.d_mlp,
        n_ctx=recipe.n_ctx,
        d_vocab=len(tokenizer),
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        seed=recipe.seed,
        default_prepend_bos=True,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer", category=DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer)
    if recipe.sinusoidal_positions is not None:
        with torch.no_grad():
            model.W_pos.copy_(recipe.sinusoidal_positions * sinusoidal_code(cfg.n_ctx, cfg.d_model))
    return model


def lm_loss(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over real (unpadded) targets. logits [batch, pos, vocab], tokens and mask [batch, pos]."""
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    target_mask = mask[:, 1:].flatten()
    return (losses * target_mask).sum() / target_mask.sum()


def learning_rate(step: int, peak: float, warmup_steps: int, steps: int) -> float:
    """Linear warmup to `peak`, then cosine decay to a tenth of it at `steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norm gains or other vectors)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )


def best_induction_score(model: HookedTransformer) -> float:
    """The highest induction score of any head (`lenskit.zoo.evaluate.induction`, on 4 sequences)."""
    return induction(model, batch=4)["scores"].max().item()


def optimise(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: Tensor, lr: float) -> float:
    """One optimiser step on `loss` at learning rate `lr`, gradients clipped to norm 1; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def run_steps(
    model: torch.nn.Module,
    recipe,
    batch_loss: Callable[[], Tensor],
    probe_name: str,
    probe: Callable[[], float],
    log_path: Path,
    progress: bool = True,
) -> None:
    """The loop every zoo trainer runs: `recipe.steps` AdamW steps, each on `batch_loss()` of a fresh batch,
    with warmup and cosine decay. Every `recipe.log_every` steps a row goes to the CSV at `log_path`
    (step, loss averaged over the interval, lr, seconds, and `probe()` under `probe_name`)."""
    optimizer = adamw(model, recipe.lr, recipe.weight_decay)
    model.train()
    start, interval_losses = time.time(), []
    with open(log_path, "w", newline="") as log_file:
        log = csv.writer(log_file)
        log.writerow(["step", "loss", "lr", "seconds", probe_name])
        bar = tqdm(range(recipe.steps), desc="train", dynamic_ncols=True, disable=not progress)
        for step in bar:
            lr = learning_rate(step, recipe.lr, recipe.warmup_steps, recipe.steps)
            interval_losses.append(optimise(model, optimizer, batch_loss(), lr))
            if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
                model.eval()
                with torch.no_grad():
                    probed = probe()
                model.train()
                mean_loss = sum(interval_losses) / len(interval_losses)
                log.writerow([step + 1, f"{mean_loss:.4f}", f"{lr:.6f}", f"{time.time() - start:.1f}", f"{probed:.4f}"])
                log_file.flush()
                bar.set_postfix({"loss": f"{mean_loss:.3f}", probe_name: f"{probed:.3f}"})
                interval_losses = []
    model.eval()


def command_line(description: str, recipes: dict) -> argparse.ArgumentParser:
    """The arguments every zoo training script takes: the recipe's name, --steps, --seed, --threads, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("name", choices=sorted(recipes), help="which recipe to train")
    parser.add_argument("--steps", type=int, help="optimisation steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, help="seed of weights and data (default: the recipe's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1; more threads were 40x slower on a shared 2-core machine)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: lenskit/zoo/checkpoints/NAME)")
    return parser


def with_overrides(recipe, **overrides):
    """A copy of the dataclass `recipe` with the fields of `overrides` that are not None replaced."""
    return dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


def train(recipe: Recipe, out: str | Path, init: str | Path | None = None) -> HookedTransformer:
    """Train a model following `recipe` (from the weights saved in `init` if given), save it and its
    loss log into `out`, return it."""
    out = Path(out)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe)
    if init is not None:
        model.load_state_dict(load(init).state_dict())
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = model.tokenizer.backend_tokenizer
    rng = random.Random(recipe.seed)

    def batch_loss() -> Tensor:
        tokens, mask = training_batch(tokenizer, rng, recipe.batch_size, recipe.mixture, recipe.repeat_lengths)
        return lm_loss(model(tokens), tokens, mask)

    run_steps(model, recipe, batch_loss, "induction", lambda: best_induction_score(model), out / LOG_FILE)
    save(model, out)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = command_line(__doc__.splitlines()[0], RECIPES)
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: the recipe's)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay of matrices (default: the recipe's)")
    parser.add_argument("--init", type=Path, help="continue from the weights of this saved folder")
    args = parser.parse_args(argv)
    recipe = with_overrides(
        RECIPES[args.name],
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    torch.set_num_threads(args.threads)
    train(recipe, args.out or ZOO_ROOT / args.name, args.init)


if __name__ == "__main__":
    main()
