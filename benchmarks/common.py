"""What the benchmarks share: models, prompts, clocks, memory, worker subprocesses and the results file.

    gpt2_small(n_layers)              the GPT-2-small shape (gpt2_small_shape.json), random weights
    add_model_argument(parser); load_model(name); describe(model, name)     --model: any lenskit.load name
    add_threads_argument(parser); set_threads(args); worker_flags(args)     --threads, passed on to workers
    prompt_tokens(model, n_pos, seed)  English text (TEXT) or random ids;  ioi_pairs(model, n): real IOI pairs
    interleaved(variants, repeats)    wall and CPU seconds of each variant, interleaved;  medians(times)
    best_of(run, repeats)             (result, CPU s, wall s) of the run with the least CPU time
    rss_mb(), reset_peak_rss()        resident memory now / at its peak (/proc, Linux); start afresh
    start_memory_peak(device), memory_peak_mb(device)   the same, or CUDA allocations
    in_subprocess(script, *args)      `script --worker ARGS` in a fresh Python (its own peak RSS): its JSON line
    write_results(bench, model, data) benchmarks/results/bench_<bench>[_<model>].json

Importing this module also puts tests/ on sys.path, for the reference implementations that the
benchmarks share with the tests (tests/reference/).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
SHAPE = BENCHMARKS / "gpt2_small_shape.json"
GPT2_SMALL = json.loads(SHAPE.read_text())

sys.path.insert(0, str(BENCHMARKS.parent / "tests"))  # tests/reference
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")


# --- models: the default shape, or any lenskit.load name (--model) ----------------------------


def gpt2_small(n_layers: int | None = None) -> HookedTransformer:
    """The GPT-2-small shape with random weights (TransformerLens' init, seed 0), in eval mode;
    `n_layers` fewer blocks for smoke runs."""
    config = GPT2_SMALL | ({"n_layers": n_layers} if n_layers else {})
    return HookedTransformer(HookedTransformerConfig(**config)).eval()


def add_model_argument(
    parser: argparse.ArgumentParser, default: str = "a GPT-2-small-shaped model with random weights"
) -> None:
    parser.add_argument("--model", help=f"any lenskit.load name or path, e.g. smollm2-135m (default: {default})")


def load_model(name: str) -> HookedTransformer:
    """`lenskit.load(name)` in eval mode (a real model offline: smollm2-135m; a config file: random weights)."""
    import lenskit

    return lenskit.load(name).eval()


def describe(model: HookedTransformer, name: str | None = None) -> str:
    """One line: the model's name and shape (layers, d_model, heads, key/value heads, d_mlp, vocabulary)."""
    cfg = model.cfg
    kv = f" ({cfg.n_key_value_heads} key/value)" if cfg.n_key_value_heads else ""
    label = name or "GPT-2-small-shaped model, random weights"
    return (
        f"{label}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads{kv}, d_head {cfg.d_head}, "
        f"d_mlp {cfg.d_mlp}, vocabulary {cfg.d_vocab}"
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")


def set_threads(args: argparse.Namespace) -> None:
    """torch.set_num_threads(--threads), when given."""
    if args.threads:
        torch.set_num_threads(args.threads)


def worker_flags(args: argparse.Namespace, model: bool = True) -> list[str]:
    """The --model (when `model`) and --threads flags given, to pass on to a worker subprocess."""
    flags = ["--model", args.model] if model and args.model else []
    return flags + (["--threads", str(args.threads)] if args.threads else [])


# --- prompts ----------------------------------------------------------------------------------

TEXT = (  # English prompt text for models with a tokenizer, repeated as needed
    "The old lighthouse keeper climbed the narrow stairs every evening to light the lamp. From the top he "
    "could see the whole bay: the fishing boats coming home, the gulls circling over the harbour and the "
    "lights of the village coming on one by one. His daughter Mary had gone to the city to study medicine, "
    "and every week she wrote him a long letter about her lessons, her friends and the crowded streets. "
    "He kept the letters in a wooden box beside his bed and read them again when the winter storms kept "
    "him awake. One night a small boat lost its way in the fog, and the keeper rang the bell until the "
    "sailors found the channel and reached the shore safely. The next morning the whole village came to "
    "thank him, and the children brought him bread, apples and a jar of honey from the farm on the hill. "
)


def prompt_tokens(model: HookedTransformer, n_pos: int, seed: int) -> torch.Tensor:
    """[1, n_pos] tokens: English text for a model with a tokenizer, else random ids (seeded)."""
    if model.tokenizer is None:
        return torch.randint(0, model.cfg.d_vocab, (1, n_pos), generator=torch.Generator().manual_seed(seed))
    tokens = model.to_tokens(TEXT)
    while tokens.shape[1] < n_pos:
        tokens = torch.cat([tokens, model.to_tokens(TEXT, prepend_bos=False)], dim=1)
    return tokens[:, :n_pos]


IOI_TEMPLATES = (  # {A} {B}: the two names of the first clause; {S2}: the second subject mention
    "Then, {A} and {B} went to the office. {S2} gave a letter to",
    "While {A} and {B} were working at the house, {S2} gave a key to",
    "After the lesson, {A} and {B} went home. {S2} gave a book to",
    "Friends {A} and {B} found a bone at the garden. {S2} gave it to",
)
IOI_NAMES = (
    "Mary",
    "John",
    "Tom",
    "James",
    "Sarah",
    "David",
    "Anna",
    "Paul",
    "Emma",
    "Mark",
    "Lisa",
    "Peter",
    "Kate",
    "Michael",
    "Alice",
    "Daniel",
)


def single_token_names(model: HookedTransformer, names=IOI_NAMES) -> list[str]:
    """The names whose " name" is one token of the model (model.to_single_token succeeds)."""
    kept = []
    for name in names:
        try:
            model.to_single_token(" " + name)
        except (AssertionError, ValueError, KeyError):
            continue
        kept.append(name)
    return kept


def ioi_pairs(model: HookedTransformer, n_pairs: int = 8):
    """Real IOI prompt pairs: (clean [n, pos], corrupted [n, pos], metric, examples).

    Clean: a template with the indirect object IO and the subject S, S named again (S2), e.g.
    "Then, Mary and John went to the office. John gave a letter to" (answer " Mary", not " John"); both
    orders of the first clause (IO first, S first). Corrupted: the same prompt with S2 swapped for the
    IO's name ("... office. Mary gave a letter to"). Names are single tokens for the model. Every pair has the
    same length in tokens (the length that most templates give, nearest 15), and the pairs cycle over
    the templates and name pairs. Metric: logit(IO) - logit(S) at the last position, mean over pairs.
    """
    from lenskit import metrics

    if model.tokenizer is None:
        raise ValueError("ioi_pairs needs a model with a tokenizer")
    names = single_token_names(model)
    if len(names) < 2:
        raise ValueError(f"fewer than two of the IOI names are single tokens for this model: {names}")
    couples = [(names[i], names[(i + k) % len(names)]) for k in (1, 3, 5) for i in range(len(names))]
    candidates = []  # (template index, couple index, length, clean text, corrupted text, IO, S)
    for c, (io, s) in enumerate(couples):
        for t, template in enumerate(IOI_TEMPLATES):
            a, b = (io, s) if (c + c // len(IOI_TEMPLATES)) % 2 == 0 else (s, io)  # both orders per template
            clean, corrupted = template.format(A=a, B=b, S2=s), template.format(A=a, B=b, S2=io)
            length = model.to_tokens(clean).shape[1]
            if model.to_tokens(corrupted).shape[1] == length:
                candidates.append((t, c, length, clean, corrupted, io, s))
    by_length: dict[int, set[int]] = {}
    for t, _, length, *_ in candidates:
        by_length.setdefault(length, set()).add(t)
    length = max(by_length, key=lambda n: (len(by_length[n]), -abs(n - 15)))
    templates = sorted(by_length[length])
    # pair i: template i mod (templates), name couple i (a new couple each pair while there are enough)
    pools = {t: sorted((c for c in candidates if c[0] == t and c[2] == length), key=lambda c: c[1]) for t in templates}
    chosen = []
    for i in range(n_pairs):
        pool = pools[templates[i % len(templates)]]
        if not pool:
            break
        pick = next((c for c in pool if c[1] >= i), pool[0])
        pool.remove(pick)
        chosen.append(pick)
    chosen = [c[:1] + c[2:] for c in chosen]  # (template, length, clean, corrupted, IO, S)
    clean = model.to_tokens([c[2] for c in chosen])
    corrupted = model.to_tokens([c[3] for c in chosen])
    metric = metrics.logit_diff([" " + c[4] for c in chosen], [" " + c[5] for c in chosen])
    return clean, corrupted, metric, [(c[2], c[3]) for c in chosen]


# --- clocks -----------------------------------------------------------------------------------


def interleaved(
    variants: dict[str, Callable], repeats: int | dict[str, int], inference: bool = False
) -> dict[str, dict[str, list[float]]]:
    """{name: {"wall": [seconds], "cpu": [seconds]}} per call of each variant, over interleaved rounds
    after one warm-up round: `repeats` rounds (or repeats[name] for each variant), in
    torch.inference_mode when `inference`. CPU time (this process, all threads) is steadier than
    wall time on a shared machine."""
    counts = repeats if isinstance(repeats, dict) else dict.fromkeys(variants, repeats)
    times = {name: {"wall": [], "cpu": []} for name in variants}
    with torch.inference_mode() if inference else contextlib.nullcontext():
        for round_ in range(max(counts.values()) + 1):
            for name, run in variants.items():
                if round_ > counts[name]:
                    continue
                wall, cpu = time.perf_counter(), time.process_time()
                run()
                if round_:
                    times[name]["wall"].append(time.perf_counter() - wall)
                    times[name]["cpu"].append(time.process_time() - cpu)
    return times


def medians(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """The median of each clock of each variant timed by `interleaved`."""
    return {
        name: {clock: statistics.median(values) for clock, values in clocks.items()} for name, clocks in times.items()
    }


def best_of(run: Callable, repeats: int = 1):
    """(result, CPU seconds of this process, wall seconds), the fastest of `repeats` runs by CPU time."""
    best = None
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        result = run()
        this = (result, time.process_time() - cpu, time.perf_counter() - wall)
        best = this if best is None or this[1] < best[1] else best
    return best


# --- memory -----------------------------------------------------------------------------------


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), from /proc (Linux)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def reset_peak_rss() -> None:
    """Start VmHWM afresh from the current RSS, so that a peak measures what follows only."""
    Path("/proc/self/clear_refs").write_text("5")


def start_memory_peak(device: torch.device) -> float:
    """Free what can be freed, restart the peak counter, and return the memory now in use (MB)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS is what is in use
    reset_peak_rss()
    return rss_mb()


def memory_peak_mb(device: torch.device) -> float:
    """The peak memory since `start_memory_peak` (MB): CUDA allocations, or this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_mb("VmHWM")


# --- workers and results ----------------------------------------------------------------------


def in_subprocess(script: str, *args):
    """Run `script --worker ARGS...` in a fresh Python (so its peak RSS is its own); its last stdout line, as JSON."""
    done = subprocess.run([sys.executable, script, "--worker", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_results(bench: str, model: str | None, data: dict, indent: int = 1) -> Path:
    """Write `data`, with the machine it ran on (machine, threads, torch version), as JSON to
    benchmarks/results/bench_<bench>.json (bench_<bench>_<model name>.json with a --model); returns the path."""
    path = RESULTS / (f"bench_{bench}_{Path(model).name}.json" if model else f"bench_{bench}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    path.write_text(json.dumps({**machine, **data}, indent=indent))
    return path
