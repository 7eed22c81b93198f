"""The IOI experiment (Wang et al. 2022; TransformerLens Exploratory Analysis Demo) on a batch of prompts.

"When John and Mary went to the shops, John gave the bag to" -> " Mary": the metric is the logit
difference logit(IO) - logit(S) at the last position. Each sentence frame gives two clean prompts
(either name repeats as the subject S: BABA and ABBA), and each prompt's corrupted run is the other one,
as in the demo: the subject's second mention (S2) becomes the indirect object (IO), so the right answer
flips. (The paper's path patching uses its "ABC" set instead, three different names; here the flip serves
for every patching measurement.)

Prompt sets, the first one the model reads: the paper's fifteen templates with the paper's names that are
single tokens for the model (`PAPER_FRAMES` frames, 120 prompts; `n_frames` for fewer), as for a
pretrained model such as SmolLM2; the demo's eight prompts (small word-level test models); the zoo's
held-out names in held-out templates (the zoo model was trained on the paper's templates).

Measured: the clean and corrupted logit differences and the accuracy (logit IO > logit S); the direct
logit attribution of every head; residual-stream patching (``resid_pre`` at each layer and at the
positions named by their role: IO, S1, S1+1, S2, END); head-output patching (``z`` of one head at
every position; left out on the paper's set, where path patching takes its place); path patching from
every head to the logits, and from every earlier head into the name movers' queries; attention from END
to the IO, S1 and S2. All are normalised where patched (0 = corrupted, 1 = clean). Prompts of different
templates put the roles at different positions, so prompts are run in groups that share a layout, and
each grid is the mean over groups weighted by their size: the mean over all prompts, as patching treats
prompts independently. The circuit's heads are then classed by the rules in `CIRCUIT_RULES` (name
movers, negative name movers, S-inhibition), and `comparison` says in words how the structure compares
with GPT-2 small's published circuit.

(This module is long because it is one paper's whole pipeline in the paper's terms: prompt sets,
measurements, the circuit's classes and their table and pictures; each part is read with the others.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lenskit import metrics, sites
from lenskit.attribution import attribute, needed_hooks
from lenskit.backend import Model
from lenskit.errors import InputError
from lenskit.experiments.reproduction import Reproduction, resolve_model
from lenskit.patching import PatchResult, patch
from lenskit.path_patching import path_patch
from lenskit.run import Run
from lenskit.tokens import as_tokens, knows_every_word, token_ids
from lenskit.viz import heatmap
from lenskit.zoo import DEFAULT_MODEL
from lenskit.zoo.data import EVAL_NAMES, EVAL_TEMPLATES, OBJECTS, PAPER_TEMPLATES, PLACES, IOIExample

DEMO_FRAMES = [
    ("When John and Mary went to the shops, {} gave the bag to", "Mary", "John"),
    ("When Tom and James went to the park, {} gave the ball to", "Tom", "James"),
    ("When Dan and Sid went to the shops, {} gave an apple to", "Dan", "Sid"),
    ("After Martin and Amy went to the park, {} gave a drink to", "Martin", "Amy"),
]
"""The demo's sentences, {} marking S2, with their two names (the first one is the IO of the first prompt)."""
FRAMES_PER_TEMPLATE = 4
PAPER_NAMES = """Michael Christopher Jessica Matthew Ashley Jennifer Joshua Amanda Daniel David James Robert John
Joseph Andrew Ryan Brandon Jason Justin Sarah William Jonathan Stephanie Brian Nicole Nicholas Anthony Heather Eric
Elizabeth Adam Megan Melissa Kevin Steven Thomas Timothy Christina Kyle Rachel Laura Lauren Amber Brittany Danielle
Richard Kimberly Jeffrey Amy Crystal Michelle Tiffany Jeremy Benjamin Mark Emily Aaron Charles Rebecca Jacob Stephen
Patrick Sean Erin Jamie Kelly Samantha Nathan Sara Dustin Paul Angela Tyler Scott Katherine Andrea Gregory Erica Mary
Travis Lisa Kenneth Bryan Lindsey Kristen Jose Alexander Jesse Katie Lindsay Shannon Vanessa Courtney Christine Alicia
Cody Allison Bradley Samuel""".split()
"""First names of the IOI paper's dataset; a model gets those that are one token after a space in its tokenizer."""
PAPER_PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"]
PAPER_OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"]
PAPER_FRAMES = 60
"""Sentence frames of the default paper set: 4 per template, two prompts each (ABBA and BABA): 120 prompts."""
MIN_PAPER_NAMES = 40
"""A model reads the paper's set when at least this many of its names are single known tokens (the zoo's
word-level tokenizer knows about 20: it gets its own held-out names and templates instead)."""
PAPER_SOURCE = "the IOI paper's templates and names"
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


def single_token_names(model: Model, names: list[str] = PAPER_NAMES) -> list[str]:
    """The names that are one known token after a space (`model.to_single_token` accepts " Name")."""
    chosen = []
    for name in names:
        try:
            model.to_single_token(" " + name)
        except (AssertionError, ValueError, KeyError):
            continue
        if knows_every_word(model, " " + name):
            chosen.append(name)
    return chosen


def paper_frames(model: Model, n_frames: int = PAPER_FRAMES, seed: int = 0) -> list[tuple[str, str, str]]:
    """`n_frames` frames of the paper's templates (frame i uses template i mod 15), each with two distinct
    single-token names of the model and a random place and object. Raises when too few names are single tokens."""
    names = single_token_names(model)
    if len(names) < MIN_PAPER_NAMES:
        raise InputError(
            f"only {len(names)} of the paper's {len(PAPER_NAMES)} names are single tokens "
            f"(at least {MIN_PAPER_NAMES} needed)"
        )
    rng = random.Random(seed)
    frames = []
    for i in range(n_frames):
        first, second = rng.sample(names, 2)
        sentence = PAPER_TEMPLATES[i % len(PAPER_TEMPLATES)].format(
            A=first, B=second, S="{}", place=rng.choice(PAPER_PLACES), object=rng.choice(PAPER_OBJECTS)
        )
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


def unreadable(model: Model, examples: list[IOIExample]) -> str | None:
    """Why the model cannot run these prompts (an unknown word, a name of several tokens), or None."""
    for name in sorted({n for e in examples for n in (e.io, e.subject)}):
        pieces = model.to_str_tokens(" " + name, prepend_bos=False)
        if len(pieces) != 1:
            return f"{' ' + name!r} is not a single token: {pieces}"
    unknown = next((e.prompt for e in examples if not knows_every_word(model, e.prompt)), None)
    return None if unknown is None else f"{unknown!r} has a word the tokenizer does not know"


def choose_prompts(model: Model, n_frames: int | None = None) -> tuple[str, list[IOIExample], list[str]]:
    """The first prompt set the model reads: the paper's templates with the model's single-token names
    (`n_frames` frames, default `PAPER_FRAMES`), the demo's prompts, the zoo's held-out ones.
    Returns (source, clean, corrupted)."""
    problems = []

    def paper():
        return paper_frames(model, n_frames or PAPER_FRAMES)

    for source, frames in (
        (PAPER_SOURCE, paper),
        ("the demo's prompts", lambda: DEMO_FRAMES),
        ("held-out names in held-out zoo templates", zoo_frames),
    ):
        try:
            clean, corrupted = ioi_prompts(frames())
        except ValueError as error:
            problems.append(f"{source}: {error}")
            continue
        problem = unreadable(model, clean)
        if problem is None:
            return source, clean, corrupted
        problems.append(f"{source}: {problem}")
    raise InputError(f"no IOI prompt set suits this model's tokenizer ({'; '.join(problems)})")


def role_positions(model: Model, tokens: Tensor, example: IOIExample) -> tuple[int, ...]:
    """Positions of `ROLES` in one prompt's tokens [pos]: the IO once, the subject twice, END last."""
    io, subject = token_ids(model, [" " + example.io, " " + example.subject]).tolist()
    io_at, subject_at = ((tokens == t).nonzero().flatten().tolist() for t in (io, subject))
    if len(io_at) != 1 or len(subject_at) != 2:
        raise InputError(
            f"an IOI prompt names the IO once and the subject twice: {example.prompt!r} reads "
            f"{model.to_str_tokens(tokens)}"
        )
    return io_at[0], subject_at[0], subject_at[0] + 1, subject_at[1], len(tokens) - 1


@dataclass
class Group:
    """Prompts that share a layout (length and role positions), and what was measured on them."""

    clean: Tensor  # [batch, pos]
    corrupted: Tensor  # [batch, pos]
    io: list[str]
    subject: list[str]
    positions: tuple[int, ...]  # of ROLES

    def measure(self, model: Model, head_patching: bool = True) -> dict:
        """Per-prompt logit differences [batch] (clean, corrupted), head attribution [layer, head], attention
        from END to the IO, S1 and S2 [layer, head, 3], and the patching grids (batch means): resid_pre by
        role, path patching from each head to the logits, and (`head_patching`) each head's output z."""
        run = Run(model, self.clean)  # one clean pass serves the attention, attribution and the patching
        patterns = [sites.act_name("pattern", layer) for layer in range(model.cfg.n_layers)]
        store = run.require([*patterns, *needed_hooks(model, "head"), *sites.residual_names(model, "pre")])
        with torch.no_grad():
            diffs = [
                logit_diffs(model, self.clean, self.io, self.subject, run.logits),
                logit_diffs(model, self.corrupted, self.io, self.subject),
            ]
        io_at, s1_at, _, s2_at, end = self.positions
        attention = (
            torch.stack(
                [
                    torch.stack([store[name][:, :, end, at].mean(0) for at in (io_at, s1_at, s2_at)], -1)
                    for name in patterns
                ]
            )
            .float()
            .cpu()
        )  # [layer, head, (IO, S1, S2)]
        heads = attribute(model, run, self.io, self.subject, by="head").query("component == 'head'")
        attribution = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
        attribution[heads["layer"].to_numpy(int), heads["head"].to_numpy(int)] = torch.tensor(
            heads["value"].to_numpy()
        ).float()
        metric = self.metric()
        resid = patch(
            model,
            run,
            self.corrupted,
            metric,
            site="resid_pre",
            by="layer_pos",
            positions=self.positions,
            progress=False,
        )
        to_logits = path_patch(model, run, self.corrupted, metric, receivers="logits", progress=False)
        head_outputs = (
            patch(model, run, self.corrupted, metric, site="z", by="layer_head", progress=False)
            if head_patching
            else None
        )
        return {
            "clean": diffs[0],
            "corrupted": diffs[1],
            "attribution": attribution,
            "attention": attention,
            "resid": resid,
            "heads": head_outputs,
            "to_logits": to_logits,
        }

    def metric(self) -> metrics.Metric:
        return metrics.logit_diff(self.io, self.subject)


def logit_diffs(
    model: Model, tokens: Tensor, io: list[str], subject: list[str], logits: Tensor | None = None
) -> Tensor:
    """logit(IO) - logit(S) at the last position of each prompt: [batch] (from `logits` of `tokens` if given)."""
    logits = (model(tokens) if logits is None else logits)[:, -1]
    rows = torch.arange(len(tokens))
    return logits[rows, token_ids(model, io)] - logits[rows, token_ids(model, subject)]


def groups(model: Model, clean: list[IOIExample], corrupted: list[str]) -> list[Group]:
    """The prompts split into groups of one layout, in order of first appearance."""
    layouts: dict[tuple, list[int]] = {}
    clean_tokens = [as_tokens(model, e.prompt, "prompts")[0] for e in clean]
    corrupted_tokens = [as_tokens(model, p, "corrupted prompts")[0] for p in corrupted]
    for i, (example, tokens) in enumerate(zip(clean, clean_tokens)):
        if corrupted_tokens[i].shape != tokens.shape:
            raise InputError(f"{example.prompt!r} and its corrupted twin {corrupted[i]!r} differ in length")
        layouts.setdefault((len(tokens), role_positions(model, tokens, example)), []).append(i)
    return [
        Group(
            torch.stack([clean_tokens[i] for i in members]),
            torch.stack([corrupted_tokens[i] for i in members]),
            [" " + clean[i].io for i in members],
            [" " + clean[i].subject for i in members],
            positions,
        )
        for (_, positions), members in layouts.items()
    ]


def pooled(grids: list[PatchResult], weights: list[float], labels: dict | None = None) -> PatchResult:
    """One grid for all prompts from the grids of the groups (batch means), weighted by group size."""

    def mean(values):
        return sum(w * v for w, v in zip(weights, values))

    first = grids[0]
    return PatchResult(
        mean([g.tensor for g in grids]),
        first.dims,
        labels or first.labels,
        mean([g.clean_value for g in grids]),
        mean([g.corrupted_value for g in grids]),
    )


def top_indices(values: Tensor) -> list[int]:
    """Flat indices of the `TOP` entries of largest |value| in a [layer, head] grid."""
    return values.flatten().abs().argsort(descending=True)[:TOP].tolist()


def head_name(flat_index: int, model: Model) -> str:
    """ "layer.head" (the paper's naming, e.g. 9.9) of a flat index into [layer, head]."""
    layer, head = divmod(flat_index, model.cfg.n_heads)
    return f"{layer}.{head}"


def summary(
    model: Model,
    clean: Tensor,
    corrupted: Tensor,
    attribution: Tensor,
    resid: PatchResult,
    heads: PatchResult | None,
    circuit: Circuit,
) -> pd.DataFrame:
    """The table: logit differences [n_prompts] and accuracy, the top heads by attribution [layer, head],
    each layer's strongest role in the normalised resid_pre grid [layer, role], the top heads by z patching
    (when measured), the top heads by path patching to the logits and the circuit's classes."""
    rows = [
        ("logit difference, clean", "IO - S", clean.mean().item()),
        ("logit difference, corrupted", "IO - S", corrupted.mean().item()),
        ("accuracy, clean", "logit IO > logit S", (clean > 0).float().mean().item()),
    ]
    rows += [
        ("direct logit attribution", head_name(i, model), attribution.flatten()[i].item())
        for i in top_indices(attribution)
    ]
    for layer, values in zip(resid.labels["layer"], resid.tensor):
        best = int(values.argmax())
        rows.append(
            (
                "resid_pre patching (normalised)",
                f"{sites.act_name('resid_pre', layer)} at {ROLES[best]}",
                values[best].item(),
            )
        )
    if heads is not None:
        rows += [
            ("head output (z) patching (normalised)", head_name(i, model), heads.tensor.flatten()[i].item())
            for i in top_indices(heads.tensor)
        ]
    rows += [
        ("path patching to logits (normalised)", head_name(i, model), circuit.to_logits.tensor.flatten()[i].item())
        for i in top_indices(circuit.to_logits.tensor)
    ]
    rows += [
        ("name mover", f"{layer}.{head}", circuit.to_logits.tensor[layer, head].item())
        for layer, head in circuit.name_movers
    ]
    rows += [
        ("negative name mover", f"{layer}.{head}", circuit.to_logits.tensor[layer, head].item())
        for layer, head in circuit.negative_name_movers
    ]
    rows += [
        (
            "S-inhibition (path patching to name movers' q)",
            f"{layer}.{head}",
            circuit.to_queries.tensor[layer, head].item(),
        )
        for layer, head in circuit.s_inhibition
    ]
    return pd.DataFrame(rows, columns=["measurement", "component", "value"])


NAME_MOVER_MIN = 0.05
"""Least normalised path-patching effect to the logits (a share of the clean - corrupted gap) of a name mover."""
S_INHIBITION_MIN = 0.05
"""Least normalised path-patching effect, through the name movers' queries, of an S-inhibition head."""
CANDIDATES = 8
"""Heads listed per path-patching measurement in the circuit table, classed or not."""
GPT2_NAME_MOVERS = [(9, 9), (9, 6), (10, 0)]
GPT2_S_INHIBITION = [(7, 3), (7, 9), (8, 6), (8, 10)]
GPT2_LAYERS = 12
CIRCUIT_RULES = (
    f"Rules. Name mover: path patching from the head to the logits restores at least {NAME_MOVER_MIN:.0%} of the "
    "clean - corrupted logit difference, its direct logit attribution is positive, and at END it attends more "
    "to the IO than to S1 and S2 together. Negative name mover: the same with the path effect at most "
    f"-{NAME_MOVER_MIN:.0%} and a negative attribution. S-inhibition: path patching from the head to the name "
    f"movers' queries (all positions) restores at least {S_INHIBITION_MIN:.0%}, and at END it attends more to S2 "
    "than to the IO. Each class is listed strongest first (by its path-patching effect)."
)


@dataclass
class Circuit:
    """The IOI circuit's heads by class, found by the stated rules (`CIRCUIT_RULES`) from pooled measurements."""

    name_movers: list[tuple[int, int]]
    negative_name_movers: list[tuple[int, int]]
    s_inhibition: list[tuple[int, int]]
    to_logits: PatchResult  # normalised [layer, head]
    to_queries: PatchResult | None  # normalised [layer, head], NaN for heads at or after the first name mover
    attribution: Tensor  # [layer, head]
    attention: Tensor  # [layer, head, (IO, S1, S2)] from END
    table: pd.DataFrame

    def numbers(self) -> dict:
        """The classes as lists of [layer, head], strongest first."""
        return {
            "name_movers": [list(h) for h in self.name_movers],
            "negative_name_movers": [list(h) for h in self.negative_name_movers],
            "s_inhibition": [list(h) for h in self.s_inhibition],
        }


def by_length(batches: list[Group]) -> list[Group]:
    """Groups of one layout merged into groups of one length (path patching needs no shared role positions)."""
    merged: dict[int, list[Group]] = {}
    for group in batches:
        merged.setdefault(group.clean.shape[1], []).append(group)
    return [
        Group(
            torch.cat([g.clean for g in gs]),
            torch.cat([g.corrupted for g in gs]),
            [n for g in gs for n in g.io],
            [n for g in gs for n in g.subject],
            gs[0].positions,
        )
        for gs in merged.values()
    ]


def path_to_queries(
    model: Model, batches: list[Group], receivers: list[tuple[int, int]], progress: bool = True
) -> PatchResult:
    """Path patching from every head to the queries of `receivers` (at all positions), pooled over the prompts
    (a mean weighted by group size) and normalised: [layer, head], NaN where a head is not before any receiver."""
    merged = by_length(batches)
    total = sum(len(g.clean) for g in merged)
    results = [
        path_patch(
            model,
            g.clean,
            g.corrupted,
            g.metric(),
            senders="heads",
            receivers=[(layer, head, "q") for layer, head in receivers],
            progress=False,
        )
        for g in tqdm(merged, desc="ioi: path patching to the name movers' queries", disable=not progress)
    ]
    return pooled(results, [len(g.clean) / total for g in merged]).normalised()


def classify(
    model: Model,
    batches: list[Group],
    measured: list[dict],
    weights: list[float],
    attribution: Tensor,
    progress: bool = True,
) -> Circuit:
    """Name movers from path patching to the logits, then S-inhibition heads from path patching to their queries."""
    to_logits = pooled([m["to_logits"] for m in measured], weights).normalised()
    attention = sum(w * m["attention"] for w, m in zip(weights, measured))
    effect = to_logits.tensor
    to_io, to_s1, to_s2 = attention.unbind(-1)
    heads = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    reads_io = [h for h in heads if to_io[h] > to_s1[h] + to_s2[h]]
    name_movers = sorted(
        (h for h in reads_io if effect[h] >= NAME_MOVER_MIN and attribution[h] > 0), key=lambda h: -effect[h]
    )
    negative = sorted(
        (h for h in reads_io if effect[h] <= -NAME_MOVER_MIN and attribution[h] < 0), key=lambda h: effect[h]
    )
    to_queries, s_inhibition = None, []
    if name_movers:
        to_queries = path_to_queries(model, batches, name_movers, progress)
        through = to_queries.tensor.nan_to_num(float("-inf"))
        s_inhibition = sorted(
            (h for h in heads if through[h] >= S_INHIBITION_MIN and to_s2[h] > to_io[h]), key=lambda h: -through[h]
        )
    classes = {
        **{h: "name mover" for h in name_movers},
        **{h: "negative name mover" for h in negative},
        **{h: "S-inhibition" for h in s_inhibition},
    }
    listed = list(classes)
    for grid in (effect, None if to_queries is None else to_queries.tensor):
        if grid is not None:
            order = grid.nan_to_num(0).flatten().abs().argsort(descending=True)[:CANDIDATES].tolist()
            listed += [divmod(i, model.cfg.n_heads) for i in order if divmod(i, model.cfg.n_heads) not in listed]
    rows = [
        {
            "class": classes.get(h, "unclassed candidate"),
            "head": f"{h[0]}.{h[1]}",
            "path to logits": effect[h].item(),
            "path to name movers' q": float("nan") if to_queries is None else to_queries.tensor[h].item(),
            "direct attribution": attribution[h].item(),
            "attn END->IO": to_io[h].item(),
            "attn END->S1": to_s1[h].item(),
            "attn END->S2": to_s2[h].item(),
        }
        for h in listed
    ]
    return Circuit(
        name_movers, negative, s_inhibition, to_logits, to_queries, attribution, attention, pd.DataFrame(rows)
    )


def _heads(heads: list[tuple[int, int]]) -> str:
    return ", ".join(f"{layer}.{head}" for layer, head in heads) or "none"


def _depth(heads: list[tuple[int, int]], n_layers: int) -> str:
    if not heads:
        return "no layers"
    low, high = min(h[0] for h in heads), max(h[0] for h in heads)
    span = f"layer {low}" if low == high else f"layers {low}-{high}"
    return f"{span} of {n_layers} (depth {low / n_layers:.2f}-{(high + 1) / n_layers:.2f})"


def comparison(model: Model, circuit: Circuit, resid: PatchResult) -> str:
    """How the circuit found here compares with GPT-2 small's published one, in words, with the numbers
    (`resid`: the normalised resid_pre grid [layer, role])."""
    n_layers, table = model.cfg.n_layers, circuit.table.set_index("head")

    def described(heads, column):
        return (
            "; ".join(
                f"{layer}.{head} ({column} {table.loc[f'{layer}.{head}', column]:+.2f}, attribution "
                f"{table.loc[f'{layer}.{head}', 'direct attribution']:+.2f}, END->IO {table.loc[f'{layer}.{head}', 'attn END->IO']:.2f}, "
                f"END->S2 {table.loc[f'{layer}.{head}', 'attn END->S2']:.2f})"
                for layer, head in heads
            )
            or "none"
        )

    nm, si = circuit.name_movers, circuit.s_inhibition
    text = (
        f"Compared with GPT-2 small (name movers {_heads(GPT2_NAME_MOVERS)}, {_depth(GPT2_NAME_MOVERS, GPT2_LAYERS)}; "
        f"S-inhibition {_heads(GPT2_S_INHIBITION)}, {_depth(GPT2_S_INHIBITION, GPT2_LAYERS)}): "
        f"this model has {len(nm)} name mover{'' if len(nm) == 1 else 's'}, {_depth(nm, n_layers)}: {described(nm, 'path to logits')}. "
    )
    if circuit.negative_name_movers:
        text += (
            f"Negative name movers (GPT-2: 10.7, 11.10): {described(circuit.negative_name_movers, 'path to logits')}. "
        )
    else:
        text += "No negative name mover passes the rule (GPT-2 has 10.7 and 11.10). "
    if nm:
        text += f"S-inhibition heads: {len(si)}, {_depth(si, n_layers)}: {described(si, 'path to name movers' + chr(39) + ' q')}. "
        if si:
            below = max(h[0] for h in si) < min(h[0] for h in nm)
            text += (
                "As in GPT-2, every S-inhibition head sits below every name mover, so the two-step structure "
                "(S-inhibition writes to END, name movers read it in their queries) holds. "
                if below
                else "Unlike GPT-2, some S-inhibition heads are not below every name mover. "
            )
        else:
            text += "Unlike GPT-2, no head passes the S-inhibition rule. "
    else:
        text += "Without name movers there are no queries to path-patch into, so no S-inhibition heads are sought. "
    unclassed = table[(table["class"] == "unclassed candidate") & (table["path to logits"].abs() >= NAME_MOVER_MIN)]
    if len(unclassed):

        def failed(row):
            sign = 1 if row["path to logits"] > 0 else -1
            reasons = [] if sign * row["direct attribution"] > 0 else ["its direct attribution has the other sign"]
            if row["attn END->IO"] <= row["attn END->S1"] + row["attn END->S2"]:
                reasons.append(
                    f"END attends to the IO {row['attn END->IO']:.2f}, to S1 {row['attn END->S1']:.2f} "
                    f"and to S2 {row['attn END->S2']:.2f}"
                )
            return "; ".join(reasons)

        text += (
            "Heads with a path effect to the logits past the threshold that the rules leave unclassed: "
            + "; ".join(
                f"{head} (path to logits {row['path to logits']:+.2f}, attribution {row['direct attribution']:+.2f}: "
                f"{failed(row)})"
                for head, row in unclassed.iterrows()
            )
            + ". "
        )
    s2, end = resid.tensor[:, ROLES.index("S2")], resid.tensor[:, ROLES.index("END")]
    moved = next((layer for layer in range(len(end)) if end[layer] > s2[layer]), None)
    if moved:  # None: never; 0: at the embeddings already
        text += (
            f"Residual patching: the answer's information sits at S2 up to layer {moved - 1} "
            f"(resid_pre {s2[moved - 1]:.2f} there) and at END from layer {moved} (resid_pre {end[moved]:.2f}); "
            "in GPT-2 small it moves from S2 to END around the S-inhibition heads' layers 7-8."
        )
    return text


def paper_set(model: Model, n_frames: int | None = None) -> list[IOIExample] | None:
    """The IOI prompts from the paper's templates if the model reads them, else None."""
    try:
        clean, _ = ioi_prompts(paper_frames(model, n_frames or PAPER_FRAMES))
    except ValueError:
        return None
    return clean if unreadable(model, clean) is None else None


def run(model: Model | str | None = None, progress: bool = True, n_frames: int | None = None) -> Reproduction:
    """The IOI reproduction; `n_frames` sets the size of the paper's set (two prompts per frame; default
    `PAPER_FRAMES`, 120 prompts)."""
    model = resolve_model(model, DEFAULT_MODEL)
    source, clean, corrupted = choose_prompts(model, n_frames)
    head_patching = source != PAPER_SOURCE
    batches = groups(model, clean, corrupted)
    measured = [
        group.measure(model, head_patching) for group in tqdm(batches, desc="ioi: prompt groups", disable=not progress)
    ]
    weights = [len(group.clean) / len(clean) for group in batches]
    attribution = sum(w * m["attribution"] for w, m in zip(weights, measured))
    resid = pooled(
        [m["resid"] for m in measured], weights, {"layer": measured[0]["resid"].labels["layer"], "pos": list(ROLES)}
    ).normalised()
    heads = pooled([m["heads"] for m in measured], weights).normalised() if head_patching else None
    circuit = classify(model, batches, measured, weights, attribution, progress)
    table = summary(
        model,
        torch.cat([m["clean"] for m in measured]),
        torch.cat([m["corrupted"] for m in measured]),
        attribution,
        resid,
        heads,
        circuit,
    )

    top_head = head_name(top_indices(attribution)[0], model)
    top_layer = int(top_head.split(".")[0])
    labels = ([f"L{layer}" for layer in range(model.cfg.n_layers)], [f"H{head}" for head in range(model.cfg.n_heads)])
    figures = [
        heatmap(
            attribution,
            *labels,
            row_title="layer",
            col_title="head",
            title="direct logit attribution of each head to logit(IO) - logit(S)",
        ),
        resid.plot(title="resid_pre patching by layer and role (0 = corrupted, 1 = clean)"),
        heads.plot(title="head output (z) patching at all positions (0 = corrupted, 1 = clean)")
        if heads is not None
        else heatmap(
            circuit.to_logits.tensor,
            *labels,
            row_title="layer",
            col_title="head",
            title="path patching from each head to the logits (0 = corrupted, 1 = clean)",
        ),
        Run(model, clean[0].prompt).attention_patterns(
            top_layer, title=f"attention patterns of layer {top_layer} ({top_head} tops the direct logit attribution)"
        ),
    ]
    if circuit.to_queries is not None:
        figures.append(
            heatmap(
                circuit.to_queries.tensor.nan_to_num(0),
                *labels,
                row_title="layer",
                col_title="head",
                title="path patching from each head to the name movers' queries (0 = corrupted, 1 = clean)",
            )
        )
    patching = (
        "Head output (z) patching: each head's z at every position."
        if head_patching
        else "Head output (z) patching is left out on this set: path patching (the paper's method) takes its place."
    )
    notes = (
        f"{len(clean)} prompts ({source}), ABBA and BABA, in {len(batches)} groups of one layout. Corrupted "
        "run: the same sentence with S2 replaced by the IO (the demo's flipped prompts, used here for path patching "
        "too instead of the paper's ABC set), so the answer flips and the corrupted logit difference is minus the "
        "clean one. Patching is normalised: 0 is the corrupted run's logit difference, 1 the clean run's. resid_pre "
        "rows show each layer's strongest role; positions before S2 are the same in both runs, so patching there "
        f"gives 0. {patching} {CIRCUIT_RULES} {comparison(model, circuit, resid)}"
        + ("" if source == PAPER_SOURCE else f" {DEMO_FINDINGS}")
    )
    return Reproduction(
        "Indirect object identification: logit difference, attribution, patching and the circuit",
        table,
        figures,
        notes,
        tables={"circuit": circuit.table},
        numbers=circuit.numbers(),
    )
