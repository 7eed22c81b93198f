"""The experiments an agent can run: each tool is a function of a `Lab` and plain JSON arguments.

A tool returns a `Finding`: compact text an LLM can read (small tables, top tokens, numbers
with units) and, when there is one, the path of an HTML picture it wrote into the workspace.
`TOOLS` lists them in the order an agent sees them; `lenskit.agent.server` serves them over MCP
and `lenskit.agent.loop` hands the same ones to a chat model.

The `Lab` holds what the tools share:
- the workspace (pictures are written to ``workspace/pictures``; audio paths may point here);
- the model roots: local model files and folders are loaded only from inside these (or the
  workspace); zoo names (``lenskit/NAME``) and the wheel-packaged models are always allowed;
  hub names are not, so no tool reaches the network;
- loaded models, kept between calls: at most `max_models` (default 2), the least recently used
  is dropped when another is loaded.
No tool runs code or shell commands, and none reads or writes outside these folders.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lenskit import metrics, viz
from lenskit import surgery as surgery_module
from lenskit.errors import InputError, MissingFileError
from lenskit.models import ZOO_PREFIX, describe, load, zoo_names
from lenskit.packaged import PACKAGED
from lenskit.tokens import as_tokens


@dataclass(frozen=True)
class Finding:
    """A tool's result: `text` for the agent, `picture` (a path inside the workspace) or None, `model` used."""

    text: str
    picture: str | None = None
    model: str | None = None


class Lab:
    """The state the tools share: workspace, model roots, loaded models (LRU, at most `max_models`)."""

    def __init__(self, workspace: str | os.PathLike, model_roots: list[str | os.PathLike] = (), max_models: int = 2):
        if max_models < 1:
            raise InputError(f"max_models must be at least 1, not {max_models}")
        self.workspace = Path(workspace).resolve()
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.model_roots = [Path(root).resolve() for root in model_roots]
        self.max_models = max_models
        self._models: OrderedDict[str, object] = OrderedDict()
        self._pictures = 0

    def model(self, name: str, speech: bool = False):
        """The model called `name` (a zoo name, a packaged model's name, or a path inside a root), loaded once."""
        key = self._model_key(name)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        if speech:
            from lenskit import whisper

            model = whisper.load(key)
        else:
            model = load(key)
        self._models[key] = model
        while len(self._models) > self.max_models:
            self._models.popitem(last=False)
        return model

    def loaded(self) -> list[str]:
        """Names of the models in memory, least recently used first."""
        return list(self._models)

    def inside(self, path: str, what: str) -> Path:
        """`path` resolved, if it lies inside the workspace or a model root; otherwise a ValueError."""
        resolved = (self.workspace / Path(path).expanduser()).resolve()
        allowed = [self.workspace, *self.model_roots]
        if not any(resolved == root or root in resolved.parents for root in allowed):
            raise InputError(
                f"{what} {path!r} is outside the folders this server may read: "
                f"{', '.join(str(root) for root in allowed)}"
            )
        if not resolved.exists():
            raise MissingFileError(f"{what} {path!r} does not exist (resolved to {resolved})")
        return resolved

    def picture_path(self, tool: str) -> Path:
        """A fresh picture file in ``workspace/pictures`` for one call of `tool`."""
        self._pictures += 1
        folder = self.workspace / "pictures"
        folder.mkdir(exist_ok=True)
        return folder / f"{os.getpid()}-{self._pictures}-{tool}.html"

    def _model_key(self, name: str) -> str:
        if name.startswith(ZOO_PREFIX) or name in PACKAGED:
            return name
        return str(self.inside(name, "model"))


# --- the tools ---------------------------------------------------------------------------------


def list_models(lab: Lab) -> Finding:
    """List the models this server can load: zoo names, real models installed from wheels, and model
    files or folders inside the model roots. Pass one of these names as `model` to the other tools."""
    lines = ["zoo (trained by lenskit, always available):", *(f"  {ZOO_PREFIX}{name}" for name in zoo_names())]
    lines.append("real pretrained models from wheels:")
    for name, packaged in PACKAGED.items():
        try:
            packaged.path()
            state = "installed"
        except (FileNotFoundError, ValueError) as error:
            state = f"not available ({error})"
        lines.append(f"  {name}: {packaged.description} [{packaged.kind}; {state}]")
    for root in lab.model_roots:
        found = (
            sorted(
                p
                for p in root.iterdir()
                if p.suffix in (".gguf", ".bin", ".json")
                or (p / "config.json").is_file()
                or (p / "hooked_transformer.json").is_file()
                or (p / "model.bin").is_file()
            )
            if root.is_dir()
            else []
        )
        lines.append(f"in {root}:")
        lines += [f"  {p}" for p in found] or ["  (nothing loadable)"]
    if lab.loaded():
        lines.append(f"in memory: {', '.join(lab.loaded())}")
    return Finding("\n".join(lines))


def model_info(lab: Lab, model: str) -> Finding:
    """Architecture of a text model: layers, heads, widths, vocabulary, context, parameters, and its hook names."""
    m = lab.model(model)
    text = (
        f"{describe(m, model, hook_names=False)}\n"
        f"hooks per layer L = 0..{m.cfg.n_layers - 1}: blocks.L.hook_resid_pre, blocks.L.attn.hook_q/k/v/z, "
        "blocks.L.attn.hook_pattern, blocks.L.hook_attn_out, blocks.L.mlp.hook_post, blocks.L.hook_mlp_out, "
        "blocks.L.hook_resid_post"
    )
    return Finding(text, model=model)


def generate(lab: Lab, model: str, prompt: str, max_new_tokens: int = 20) -> Finding:
    """Greedy continuation of `prompt` (at most 200 new tokens): the prompt's tokens and the text generated."""
    _check_range("max_new_tokens", max_new_tokens, 1, 200)
    m = lab.model(model)
    tokens = as_tokens(m, prompt, "prompt")
    generated = surgery_module.generate(m, tokens, surgery_module.full(m), max_new_tokens)
    text = (
        f"prompt tokens ({tokens.shape[1]}): {m.to_str_tokens(tokens[0])}\n"
        f"continuation: {m.to_string(generated[0, tokens.shape[1] :])!r}"
    )
    return Finding(text, model=model)


def logit_lens(
    lab: Lab, model: str, prompt: str, position: int = -1, targets: list[str] | None = None, top_k: int = 3
) -> Finding:
    """The logit lens at one position of `prompt`: per layer, the top_k next tokens with probabilities and
    each target token's probability and rank. Writes a heatmap of the top token per layer and position."""
    _check_range("top_k", top_k, 1, 10)
    from lenskit.lens import logit_lens as run_lens

    m = lab.model(model)
    lens = run_lens(m, prompt, targets=targets, top_k=top_k, progress=False)
    table = lens.summary(pos=position)
    picture = lab.picture_path("logit_lens")
    viz.save_page([lens.plot()], picture, title=f"logit lens: {prompt}")
    return Finding(f"logit lens at position {position} of {prompt!r}:\n{table.to_string()}", str(picture), model)


def attribute(
    lab: Lab,
    model: str,
    prompt: str,
    answer: str,
    wrong: str,
    by: Literal["layer", "head", "neuron", "position"] = "head",
    top: int = 10,
) -> Finding:
    """Direct logit attribution of logit(answer) - logit(wrong) at the last position of `prompt`, split by
    layer, head, neuron or source position: the `top` largest contributions (they sum to the difference)."""
    _check_range("top", top, 1, 50)
    from lenskit.attribution import attribute as run_attribution

    frame = run_attribution(lab.model(model), prompt, answer, wrong, by=by)
    columns = [
        c
        for c in ("component", "layer", "head", "neuron", "src_pos", "token", "value")
        if c in frame and frame[c].notna().any()
    ]
    head = frame.reindex(frame.value.abs().sort_values(ascending=False).index).head(top)[columns]
    text = (
        f"logit({answer!r}) - logit({wrong!r}) = {frame.attrs['logit_diff']:.3f} at the last position; "
        f"{len(frame)} parts by {by}, largest |value| first:\n{head.to_string(index=False, float_format='%.3f')}"
    )
    return Finding(text, model=model)


def patch(
    lab: Lab,
    model: str,
    prompt: str,
    corrupted: str,
    answer: str,
    wrong: str,
    site: Literal["resid_pre", "attn_out", "mlp_out", "z"] = "resid_pre",
    by: Literal["layer", "layer_pos", "layer_head"] = "layer",
    top: int = 10,
) -> Finding:
    """Activation patching: run `corrupted`, write in the activation of `prompt` at one site at a time, and
    measure logit(answer) - logit(wrong). Normalised: 0 = the corrupted run, 1 = the clean run. The two
    prompts need the same number of tokens. Writes a heatmap of the normalised grid."""
    _check_range("top", top, 1, 50)
    from lenskit.patching import patch as run_patch

    result = run_patch(
        lab.model(model), prompt, corrupted, metrics.logit_diff(answer, wrong), site=site, by=by, progress=False
    )
    return _patching_finding(lab, model, result, "patch", f"patched {site} by {by}", f"patching {site} by {by}", top)


def path_patch(
    lab: Lab,
    model: str,
    prompt: str,
    corrupted: str,
    answer: str,
    wrong: str,
    senders: Literal["heads", "mlps"] = "heads",
    receivers: list[tuple[int, int, Literal["q", "k", "v"]]] | None = None,
    top: int = 10,
) -> Finding:
    """Path patching (the IOI paper's method): run `corrupted`, and let one sender's (head's or MLP's) clean
    output reach only the receivers: the logits (default), or the q/k/v of the given heads
    [[layer, head, "q"], ...]. Measures logit(answer) - logit(wrong), normalised: 0 = corrupted run, 1 = clean
    run. Senders after every receiver are blank. Writes a heatmap of the grid."""
    _check_range("top", top, 1, 50)
    from lenskit.path_patching import path_patch as run_path_patch

    result = run_path_patch(
        lab.model(model),
        prompt,
        corrupted,
        metrics.logit_diff(answer, wrong),
        senders=senders,
        receivers="logits" if receivers is None else [tuple(r) for r in receivers],
        progress=False,
    )
    target = "the logits" if receivers is None else ", ".join(f"L{r[0]}H{r[1]}.{r[2]}" for r in receivers)
    label = f"path patching {senders} -> {target}"
    return _patching_finding(lab, model, result, "path_patch", label, label, top)


def _patching_finding(lab: Lab, model: str, result, picture_name: str, label: str, title: str, top: int) -> Finding:
    """A patching grid as a finding: the clean and corrupted values, the `top` largest normalised cells
    (blank cells left out) and a heatmap of the normalised grid."""
    normalised = result.normalised()
    frame = _compact(normalised.to_frame()).dropna(subset=["value"])
    largest = frame.reindex(frame.value.abs().sort_values(ascending=False).index).head(top)
    picture = lab.picture_path(picture_name)
    viz.save_page([normalised.plot(title=f"{title} (0 = corrupted, 1 = clean)")], picture)
    text = (
        f"logit diff: clean {result.clean_value:.3f}, corrupted {result.corrupted_value:.3f}\n"
        f"{label}, normalised, largest |value| first:\n"
        f"{largest.to_string(index=False, float_format='%.3f')}"
    )
    return Finding(text, str(picture), model)


def surgery(
    lab: Lab, model: str, prompt: str, blocks: list[int], positions: list[int] | None = None, generate_tokens: int = 20
) -> Finding:
    """Run the model with its blocks skipped, repeated or permuted, against the intact model: loss on the
    prompt, the top next tokens at `positions` (default the last), a greedy generation, and which next
    tokens became more or less likely at the last position. `blocks` is the sequence of block indices the
    residual stream passes through, e.g. for 6 layers: skip layer 3 = [0, 1, 2, 4, 5]; repeat layer 2 =
    [0, 1, 2, 2, 3, 4, 5]; swap 2 and 3 = [0, 1, 3, 2, 4, 5]."""
    _check_range("generate_tokens", generate_tokens, 0, 100)
    m = lab.model(model)
    schedules = [surgery_module.full(m), surgery_module.sequence(blocks)]
    table = surgery_module.evaluate(
        m, schedules, prompt, positions=positions, generate_tokens=generate_tokens, progress=False
    )
    tokens = as_tokens(m, prompt, "prompt")
    with torch.no_grad():
        changed = [surgery_module.run(m, tokens, s)[0, -1].softmax(-1) for s in schedules]
    delta = changed[1] - changed[0]
    up, down = delta.topk(5), (-delta).topk(5)
    more = ", ".join(f"{m.to_string(i.unsqueeze(0))!r} {v:+.3f}" for v, i in zip(up.values.tolist(), up.indices))
    less = ", ".join(f"{m.to_string(i.unsqueeze(0))!r} {-v:+.3f}" for v, i in zip(down.values.tolist(), down.indices))
    text = (
        f"{table.drop(columns='blocks').to_string(index=False, float_format='%.3f')}\n"
        f"probability change at the last position (schedule minus intact): more likely {more}; less likely {less}"
    )
    return Finding(text, model=model)


def flow_summary(lab: Lab, model: str, prompt: str, top: int = 10) -> Finding:
    """The information-flow graph of `prompt` (LM Transparency Tool): the `top` strongest edges (which
    attention heads and MLPs carry information between which positions). Writes the interactive graph."""
    _check_range("top", top, 1, 50)
    from lenskit.flow import flow

    graph = flow(lab.model(model), prompt)
    edges = graph.edges.sort_values("weight", ascending=False).head(top)
    columns = [
        c
        for c in ("layer", "kind", "head", "source_pos", "source_token", "target_pos", "target_token", "weight")
        if c in edges
    ]
    picture = lab.picture_path("flow")
    graph.save_html(picture)
    return Finding(
        f"strongest information-flow edges:\n{edges[columns].to_string(index=False, float_format='%.3f')}",
        str(picture),
        model,
    )


def head_detectors(
    lab: Lab,
    model: str,
    prompt: str,
    kind: Literal["previous_token", "duplicate_token", "induction"] = "induction",
    top: int = 5,
) -> Finding:
    """How much each head behaves like a previous-token, duplicate-token or induction head on `prompt`
    (TransformerLens' detector scores, 0..1): the `top` heads. Induction needs a repeated token sequence."""
    _check_range("top", top, 1, 50)
    from lenskit.vocab import head_scores

    m = lab.model(model)
    scores = head_scores(m, prompt, kind, progress=False)
    picture = lab.picture_path("head_detectors")
    viz.save_page([scores.plot()], picture, title=f"{kind} scores")
    frame = scores.to_frame().sort_values("value", ascending=False).head(top)
    return Finding(
        f"{kind} score per head, highest first:\n{frame.to_string(index=False, float_format='%.3f')}",
        str(picture),
        model,
    )


def transcribe(lab: Lab, model: str, audio: str) -> Finding:
    """Transcribe an audio file (WAV, up to 30 s, inside the workspace or a model root) with a Whisper model."""
    from lenskit import whisper

    result = whisper.transcribe(lab.model(model, speech=True), lab.inside(audio, "audio"), progress=False)
    return Finding(f"transcript: {result.text!r}", model=model)


def layer_removal(
    lab: Lab, model: str, audio: str, reference: str, part: Literal["encoder", "decoder"] = "decoder"
) -> Finding:
    """Transcribe `audio` with 0, 1, 2, ... final layers of the Whisper encoder or decoder removed: the
    transcript and word error rate against `reference` for each."""
    from lenskit import whisper

    table = whisper.layer_removal(
        lab.model(model, speech=True), lab.inside(audio, "audio"), reference, part=part, progress=False
    )
    return Finding(table.to_string(index=False, float_format="%.3f"), model=model)


TOOLS = [
    list_models,
    model_info,
    generate,
    logit_lens,
    attribute,
    patch,
    path_patch,
    surgery,
    flow_summary,
    head_detectors,
    transcribe,
    layer_removal,
]
"""Every experiment tool, in the order an agent sees them (`note` is the log's, in the server)."""


def _compact(frame):
    """A result frame without the label columns that only repeat their index column (layer_label == layer)."""
    repeated = [
        f"{c}_label"
        for c in frame.columns
        if f"{c}_label" in frame and (frame[f"{c}_label"].astype(str) == frame[c].astype(str)).all()
    ]
    return frame.drop(columns=repeated)


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InputError(f"{name}={value} is out of range: {low}..{high}")
