"""The IOI experiment (Wang et al. 2022; TransformerLens Exploratory Analysis Demo) on a batch of prompts.

"When John and Mary went to the shops, John gave the bag to" -> " Mary": the metric is the logit
difference logit(IO) - logit(S) at the last position. Each sentence frame gives two clean prompts
(either name repeats as the subject S), and each prompt's corrupted run is the other one, as in the
demo: the subject's second mention (S2) becomes the indirect object (IO), so the right answer flips.

Measured: the clean and corrupted logit differences and the accuracy (logit IO > logit S); the direct
logit attribution of every head; residual-stream patching (``resid_pre`` at each layer and at the
positions named by their role: IO, S1, S1+1, S2, END) and head-output patching (``z`` of one head at
every position), both normalised (0 = corrupted, 1 = clean). Prompts of different templates put the
roles at different positions, so prompts are run in groups that share a layout, and each grid is the
mean over groups weighted by their size: the mean over all prompts, as patching treats prompts
independently. Models that know the demo's words (GPT-2) get the demo's eight prompts; the zoo gets
held-out names in held-out templates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from lenskit import metrics
from lenskit.attribution import attribute
from lenskit.experiments.bos import knows_every_word
from lenskit.experiments.reproduction import Reproduction, resolve_model
from lenskit.patching import PatchResult, patch
from lenskit.tokens import token_ids
from lenskit.viz import attention_patterns, heatmap
from lenskit.zoo import DEFAULT_MODEL
from lenskit.zoo.data import EVAL_NAMES, EVAL_TEMPLATES, OBJECTS, PLACES, IOIExample

DEMO_FRAMES = [
    ("When John and Mary went to the shops, {} gave the bag to", "Mary", "John"),
    ("When Tom and James went to the park, {} gave the ball to", "Tom", "James"),
    ("When Dan and Sid went to the shops, {} gave an apple to", "Dan", "Sid"),
    ("After Martin and Amy went to the park, {} gave a drink to", "Martin", "Amy"),
]
"""The demo's sentences, {} marking S2, with their two names (the first one is the IO of the first prompt)."""
FRAMES_PER_TEMPLATE = 4
ROLES = ("IO", "S1", "S1+1", "S2", "END")
TOP = 3
DEMO_FINDINGS = (
    "GPT-2 small in the demo and the paper: the name mover heads 9.9, 9.6 and 10.0 write the answer "
    "(10.7 and 11.10 write against it); the S-inhibition heads 7.3, 7.9, 8.6 and 8.10 move what S2 holds "
    "to END, where residual patching shifts from S2 to END."
)


def zoo_frames(seed: int = 0) -> list[tuple[str, str, str]]:
    """`FRAMES_PER_TEMPLATE` frames of every held-out template, with two held-out names each."""
    rng = random.Random(seed)
    frames = []
    for template in EVAL_TEMPLATES:
        for _ in range(FRAMES_PER_TEMPLATE):
            first, second = rng.sample(EVAL_NAMES, 2)
            sentence = template.format(A=first, B=second, S="{}", place=rng.choice(PLACES), object=rng.choice(OBJECTS))
            frames.append((sentence, first, second))
    return frames


def ioi_prompts(frames: list[tuple[str, str, str]]) -> tuple[list[IOIExample], list[str]]:
    """Clean examples and their corrupted prompts: a frame gives both orders of its names (ABBA and BABA),
    and the corrupted prompt of each is the other one (S2 replaced by the IO)."""
    clean, corrupted = [], []
    for sentence, first, second in frames:
        for io, subject in ((first, second), (second, first)):
            clean.append(IOIExample(sentence.format(subject), io, subject))
            corrupted.append(sentence.format(io))
    return clean, corrupted


def unreadable(model: HookedTransformer, examples: list[IOIExample]) -> str | None:
    """Why the model cannot run these prompts (an unknown word, a name of several tokens), or None."""
    for name in sorted({n for e in examples for n in (e.io, e.subject)}):
        pieces = model.to_str_tokens(" " + name, prepend_bos=False)
        if len(pieces) != 1:
            return f"{' ' + name!r} is not a single token: {pieces}"
    unknown = next((e.prompt for e in examples if not knows_every_word(model, e.prompt)), None)
    return None if unknown is None else f"{unknown!r} has a word the tokenizer does not know"


def choose_prompts(model: HookedTransformer) -> tuple[str, list[IOIExample], list[str]]:
    """The demo's prompts if the model reads them, else the zoo's held-out ones: (source, clean, corrupted)."""
    problems = []
    for source, frames in (("the demo's prompts", DEMO_FRAMES), ("held-out names in held-out zoo templates", zoo_frames())):
        clean, corrupted = ioi_prompts(frames)
        problem = unreadable(model, clean)
        if problem is None:
            return source, clean, corrupted
        problems.append(f"{source}: {problem}")
    raise ValueError(f"no IOI prompt set suits this model's tokenizer ({'; '.join(problems)})")


def role_positions(model: HookedTransformer, tokens: Tensor, example: IOIExample) -> tuple[int, ...]:
    """Positions of `ROLES` in one prompt's tokens [pos]: the IO once, the subject twice, END last."""
    io, subject = token_ids(model, [" " + example.io, " " + example.subject]).tolist()
    io_at, subject_at = ((tokens == t).nonzero().flatten().tolist() for t in (io, subject))
    if len(io_at) != 1 or len(subject_at) != 2:
        raise ValueError(f"an IOI prompt names the IO once and the subject twice: {example.prompt!r} reads "
                         f"{model.to_str_tokens(tokens)}")
    return io_at[0], subject_at[0], subject_at[0] + 1, subject_at[1], len(tokens) - 1


@dataclass
class Group:
    """Prompts that share a layout (length and role positions), and what was measured on them."""

    clean: Tensor  # [batch, pos]
    corrupted: Tensor  # [batch, pos]
    io: list[str]
    subject: list[str]
    positions: tuple[int, ...]  # of ROLES

    def measure(self, model: HookedTransformer) -> dict:
        """Per-prompt logit differences [batch] (clean, corrupted), head attribution [layer, head] and the
        two patching grids (batch means)."""
        with torch.no_grad():
            diffs = [logit_diffs(model, tokens, self.io, self.subject) for tokens in (self.clean, self.corrupted)]
        heads = attribute(model, self.clean, self.io, self.subject, by="head").query("component == 'head'")
        attribution = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
        attribution[heads["layer"].to_numpy(int), heads["head"].to_numpy(int)] = torch.tensor(heads["value"].to_numpy()).float()
        metric = metrics.logit_diff(self.io, self.subject)
        resid = patch(model, self.clean, self.corrupted, metric, site="resid_pre", by="layer_pos",
                      positions=self.positions, progress=False)
        head_outputs = patch(model, self.clean, self.corrupted, metric, site="z", by="layer_head", progress=False)
        return {"clean": diffs[0], "corrupted": diffs[1], "attribution": attribution, "resid": resid, "heads": head_outputs}


def logit_diffs(model: HookedTransformer, tokens: Tensor, io: list[str], subject: list[str]) -> Tensor:
    """logit(IO) - logit(S) at the last position of each prompt: [batch]."""
    logits = model(tokens)[:, -1]
    rows = torch.arange(len(tokens))
    return logits[rows, token_ids(model, io)] - logits[rows, token_ids(model, subject)]


def groups(model: HookedTransformer, clean: list[IOIExample], corrupted: list[str]) -> list[Group]:
    """The prompts split into groups of one layout, in order of first appearance."""
    layouts: dict[tuple, list[int]] = {}
    clean_tokens = [model.to_tokens(e.prompt)[0] for e in clean]
    corrupted_tokens = [model.to_tokens(p)[0] for p in corrupted]
    for i, (example, tokens) in enumerate(zip(clean, clean_tokens)):
        if corrupted_tokens[i].shape != tokens.shape:
            raise ValueError(f"{example.prompt!r} and its corrupted twin {corrupted[i]!r} differ in length")
        layouts.setdefault((len(tokens), role_positions(model, tokens, example)), []).append(i)
    return [
        Group(torch.stack([clean_tokens[i] for i in members]), torch.stack([corrupted_tokens[i] for i in members]),
              [" " + clean[i].io for i in members], [" " + clean[i].subject for i in members], positions)
        for (_, positions), members in layouts.items()
    ]


def pooled(grids: list[PatchResult], weights: list[float], labels: dict | None = None) -> PatchResult:
    """One grid for all prompts from the grids of the groups (batch means), weighted by group size."""

    def mean(values):
        return sum(w * v for w, v in zip(weights, values))

    first = grids[0]
    return PatchResult(mean([g.tensor for g in grids]), first.dims, labels or first.labels,
                       mean([g.clean_value for g in grids]), mean([g.corrupted_value for g in grids]))


def top_indices(values: Tensor) -> list[int]:
    """Flat indices of the `TOP` entries of largest |value| in a [layer, head] grid."""
    return values.flatten().abs().argsort(descending=True)[:TOP].tolist()


def head_name(flat_index: int, model: HookedTransformer) -> str:
    """"layer.head" (the paper's naming, e.g. 9.9) of a flat index into [layer, head]."""
    layer, head = divmod(flat_index, model.cfg.n_heads)
    return f"{layer}.{head}"


def summary(model: HookedTransformer, clean: Tensor, corrupted: Tensor, attribution: Tensor,
            resid: PatchResult, heads: PatchResult) -> pd.DataFrame:
    """The table: logit differences [n_prompts] and accuracy, the top heads by attribution [layer, head],
    each layer's strongest role in the normalised resid_pre grid [layer, role], the top heads by patching."""
    rows = [
        ("logit difference, clean", "IO - S", clean.mean().item()),
        ("logit difference, corrupted", "IO - S", corrupted.mean().item()),
        ("accuracy, clean", "logit IO > logit S", (clean > 0).float().mean().item()),
    ]
    rows += [("direct logit attribution", head_name(i, model), attribution.flatten()[i].item())
             for i in top_indices(attribution)]
    for layer, values in zip(resid.labels["layer"], resid.tensor):
        best = int(values.argmax())
        rows.append(("resid_pre patching (normalised)", f"blocks.{layer}.hook_resid_pre at {ROLES[best]}", values[best].item()))
    rows += [("head output (z) patching (normalised)", head_name(i, model), heads.tensor.flatten()[i].item())
             for i in top_indices(heads.tensor)]
    return pd.DataFrame(rows, columns=["measurement", "component", "value"])


def run(model: HookedTransformer | str | None = None, progress: bool = True) -> Reproduction:
    model = resolve_model(model, DEFAULT_MODEL)
    source, clean, corrupted = choose_prompts(model)
    batches = groups(model, clean, corrupted)
    measured = [group.measure(model) for group in tqdm(batches, desc="ioi: prompt groups", disable=not progress)]
    weights = [len(group.clean) / len(clean) for group in batches]
    attribution = sum(w * m["attribution"] for w, m in zip(weights, measured))
    resid = pooled([m["resid"] for m in measured], weights,
                   {"layer": measured[0]["resid"].labels["layer"], "pos": list(ROLES)}).normalised()
    heads = pooled([m["heads"] for m in measured], weights).normalised()
    table = summary(model, torch.cat([m["clean"] for m in measured]), torch.cat([m["corrupted"] for m in measured]),
                    attribution, resid, heads)

    top_head = head_name(top_indices(attribution)[0], model)
    top_layer = int(top_head.split(".")[0])
    figures = [
        heatmap(attribution, [f"L{layer}" for layer in range(model.cfg.n_layers)],
                [f"H{head}" for head in range(model.cfg.n_heads)], row_title="layer", col_title="head",
                title="direct logit attribution of each head to logit(IO) - logit(S)"),
        resid.plot(title="resid_pre patching by layer and role (0 = corrupted, 1 = clean)"),
        heads.plot(title="head output (z) patching at all positions (0 = corrupted, 1 = clean)"),
        attention_patterns(model, clean[0].prompt, top_layer,
                           title=f"attention patterns of layer {top_layer} ({top_head} tops the direct logit attribution)"),
    ]
    notes = (
        f"{len(clean)} prompts ({source}), ABBA and BABA, in {len(batches)} groups of one layout. Corrupted "
        "run: the same sentence with S2 replaced by the IO (the demo's flipped prompts), so the answer flips "
        "and the corrupted logit difference is minus the clean one. Patching is normalised: 0 is the corrupted "
        "run's logit difference, 1 the clean run's. resid_pre rows show each layer's strongest role; positions "
        f"before S2 are the same in both runs, so patching there gives 0. {DEMO_FINDINGS}"
    )
    return Reproduction("Indirect object identification: logit difference, attribution and patching", table, figures, notes)
