"""Benchmark lenskit.cache on a GPT-2-small-shaped model with random weights (default) or any lenskit.load
model (--model smollm2-135m), on the CPU.

(a) Forward pass with every residual stream cached (hooks.cache, residual_stream) against the
    plain forward, timed interleaved in the same run: median of several repeats, and ratios.
(b) stream_cache of all blocks.*.hook_resid_post in float16 over two dataset sizes of random
    tokens, each in a fresh subprocess: tokens/s and peak RSS, which should not grow with the
    dataset; then a pass over the written shards through load_cache (memory-mapped).

    python benchmarks/bench_cache.py            # 8 x 128 tokens; 50k and 200k streamed tokens
    python benchmarks/bench_cache.py --model smollm2-135m --stream-tokens 8000 32000
    python benchmarks/bench_cache.py --quick    # smoke run

Prints a table and writes benchmarks/results/bench_cache.json (bench_cache_<model>.json with --model).

The other benchmarks share this module's helpers: --model (add_model_argument, load_model, describe),
prompts (prompt_tokens: English text or random ids; ioi_pairs: real IOI prompt pairs), and fresh
subprocesses with their peak RSS (in_subprocess, reset_peak_rss, rss_mb).
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lenskit import hooks
from lenskit.cache import load_cache, residual_stream, stream_cache

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")

RESULTS = Path(__file__).parent / "results" / "bench_cache.json"
GPT2_SMALL = json.loads((Path(__file__).parent / "gpt2_small_shape.json").read_text())
STREAMED = "blocks.*.hook_resid_post"


def gpt2_small() -> HookedTransformer:
    return HookedTransformer(HookedTransformerConfig(**GPT2_SMALL)).eval()


# --- models: the default shape, or any lenskit.load name (--model) ----------------------------

def add_model_argument(parser: argparse.ArgumentParser, default: str = "a GPT-2-small-shaped model with random weights") -> None:
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
    return (f"{label}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads{kv}, d_head {cfg.d_head}, "
            f"d_mlp {cfg.d_mlp}, vocabulary {cfg.d_vocab}")


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


# --- real IOI prompt pairs ------------------------------------------------------------------

IOI_TEMPLATES = (  # {A} {B}: the two names of the first clause; {S2}: the second subject mention
    "Then, {A} and {B} went to the office. {S2} gave a letter to",
    "While {A} and {B} were working at the house, {S2} gave a key to",
    "After the lesson, {A} and {B} went home. {S2} gave a book to",
    "Friends {A} and {B} found a bone at the garden. {S2} gave it to",
)
IOI_NAMES = ("Mary", "John", "Tom", "James", "Sarah", "David", "Anna", "Paul", "Emma", "Mark", "Lisa", "Peter",
             "Kate", "Michael", "Alice", "Daniel")


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


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), from /proc (Linux)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def reset_peak_rss() -> None:
    """Start VmHWM afresh from the current RSS, so that a peak measures what follows only."""
    Path("/proc/self/clear_refs").write_text("5")


# --- (a) forward overhead -------------------------------------------------------------------

def time_forward_variants(model: HookedTransformer, tokens: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, over `repeats` interleaved rounds after one warm-up round."""
    every_resid = hooks.cache("blocks.*.hook_resid_*")
    n_layers = model.cfg.n_layers

    def with_lenskit_cache():
        with every_resid.on(model):
            return model(tokens)

    variants = {
        "forward (logits)": lambda: model(tokens),
        "forward + hooks.cache(every resid)": with_lenskit_cache,
        "TL run_with_cache(every resid)": lambda: model.run_with_cache(tokens, names_filter=lambda n: "hook_resid" in n),
        f"forward to final resid (stop_at_layer={n_layers})": lambda: model(tokens, stop_at_layer=n_layers),
        "residual_stream(kind='all')": lambda: residual_stream(model, tokens, "all"),
    }
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for repeat in range(repeats + 1):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                if repeat:
                    times[name].append(time.perf_counter() - start)
    return times


# --- (b) streaming, in fresh subprocesses ------------------------------------------------------

def random_batches(n_rows: int, batch: int, pos: int, d_vocab: int):
    """n_rows random token rows in batches [batch, pos], made lazily (the dataset is never held)."""
    generator = torch.Generator().manual_seed(0)
    for start in range(0, n_rows, batch):
        yield torch.randint(0, d_vocab, (min(batch, n_rows - start), pos), generator=generator)


def stream_worker(n_rows: int, pos: int, out_dir: str, shard_tokens: int, model_name: str | None = None) -> dict:
    """Stream n_rows x pos random tokens; peak RSS counted from when the model is built."""
    model = load_model(model_name) if model_name else gpt2_small()
    model_build_peak, with_model = rss_mb("VmHWM"), rss_mb()
    reset_peak_rss()
    start = time.perf_counter()
    with torch.inference_mode():
        stream_cache(model, random_batches(n_rows, 8, pos, model.cfg.d_vocab), STREAMED, out_dir,
                     shard_tokens=shard_tokens, batch_size=8, progress=False)
    seconds = time.perf_counter() - start
    return {"tokens": n_rows * pos, "seconds": seconds, "tokens_per_s": n_rows * pos / seconds,
            "model_build_peak_rss_mb": model_build_peak, "rss_with_model_mb": with_model,
            "peak_rss_mb": rss_mb("VmHWM")}


def load_worker(out_dir: str) -> dict:
    """One pass over every shard (mean of every hook), memory-mapped, one shard at a time."""
    reset_peak_rss()
    cache = load_cache(out_dir)
    start = time.perf_counter()
    means = [sum(shard[name].float().mean().item() for name in cache.names) for shard in cache.iter_shards()]
    size_mb = sum(path.stat().st_size for path in Path(out_dir).glob("shard_*.safetensors")) / 2**20
    return {"shards": len(means), "cache_mb": size_mb, "seconds": time.perf_counter() - start,
            "peak_rss_mb": rss_mb("VmHWM")}


def in_subprocess(script: str, *args) -> dict:
    """Run `script --worker ARGS...` in a fresh Python (so its peak RSS is its own); its last stdout line, as JSON."""
    done = subprocess.run([sys.executable, script, "--worker", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- main ---------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    add_model_argument(parser)
    parser.add_argument("--stream-tokens", type=int, nargs=2, help="the two streamed dataset sizes (default 50000 200000)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        if args.worker[0] == "stream":
            _, n_rows, pos, out_dir, shard_tokens = args.worker
            print(json.dumps(stream_worker(int(n_rows), int(pos), out_dir, int(shard_tokens), args.model)))
        else:
            print(json.dumps(load_worker(args.worker[1])))
        return

    batch, pos, repeats = (2, 32, 2) if args.quick else (8, 128, 5)
    stream_tokens = args.stream_tokens or ((2_000, 8_000) if args.quick else (50_000, 200_000))
    shard_tokens = 1024 if args.quick else 2**14

    model = load_model(args.model) if args.model else gpt2_small()
    label = describe(model, args.model)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(0))
    times = time_forward_variants(model, tokens, repeats)
    medians = {name: statistics.median(runs) for name, runs in times.items()}
    names = list(medians)
    ratios = {
        "hooks.cache(every resid) / forward": medians[names[1]] / medians[names[0]],
        "TL run_with_cache(every resid) / forward": medians[names[2]] / medians[names[0]],
        "residual_stream(all) / forward to final resid": medians[names[4]] / medians[names[3]],
        "residual_stream(all) / forward (logits)": medians[names[4]] / medians[names[0]],
    }
    del model

    worker = [*(["--model", args.model] if args.model else []), *(["--threads", str(args.threads)] if args.threads else [])]
    streams = []
    for n_tokens in stream_tokens:
        with tempfile.TemporaryDirectory() as out_dir:
            stream = in_subprocess(__file__, "stream", round(n_tokens / pos), pos, out_dir, shard_tokens, *worker)
            stream["load"] = in_subprocess(__file__, "load", out_dir)
        streams.append(stream)
    rss_growth = streams[1]["peak_rss_mb"] / streams[0]["peak_rss_mb"] - 1

    print(f"{label}; CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"\n(a) forward on {batch} x {pos} tokens, inference_mode, median of {repeats} interleaved repeats")
    for name, median in medians.items():
        print(f"  {name:<52} {median * 1000:9.1f} ms")
    for name, ratio in ratios.items():
        print(f"  ratio {name:<46} {ratio:9.3f}")
    print(f"\n(b) stream_cache({STREAMED!r}, float16, shard_tokens={shard_tokens}), fresh subprocess each")
    print(f"  {'tokens':>8} {'tok/s':>7} {'RSS model MB':>13} {'peak RSS streaming MB':>22} {'cache MB':>9} "
          f"{'load pass s':>12} {'peak RSS load MB':>17}")
    for s in streams:
        print(f"  {s['tokens']:>8} {s['tokens_per_s']:>7.0f} {s['rss_with_model_mb']:>13.0f} {s['peak_rss_mb']:>22.0f} "
              f"{s['load']['cache_mb']:>9.0f} {s['load']['seconds']:>12.2f} {s['load']['peak_rss_mb']:>17.0f}")
    print(f"  peak RSS growth while streaming, {streams[0]['tokens']} -> {streams[1]['tokens']} tokens: {rss_growth:+.1%}"
          f" (building the model peaks at {streams[0]['model_build_peak_rss_mb']:.0f} MB)")

    results = RESULTS.with_name(f"bench_cache_{Path(args.model).name}.json") if args.model else RESULTS
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({
        "quick": args.quick, "machine": platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model": args.model or GPT2_SMALL, "model_description": label, "batch": batch, "pos": pos, "repeats": repeats,
        "forward_seconds": times, "forward_median_seconds": medians, "ratios": ratios,
        "stream": streams, "stream_peak_rss_growth": rss_growth,
    }, indent=1))
    print(f"\nwrote {results}")


if __name__ == "__main__":
    main()
