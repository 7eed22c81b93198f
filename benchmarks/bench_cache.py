"""Benchmark lenskit.cache and lenskit.shards on a GPT-2-small-shaped model with random weights (default) or any lenskit.load
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
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import (
    GPT2_SMALL,
    add_model_argument,
    add_threads_argument,
    describe,
    gpt2_small,
    in_subprocess,
    interleaved,
    load_model,
    reset_peak_rss,
    rss_mb,
    set_threads,
    worker_flags,
    write_results,
)
from transformer_lens import HookedTransformer

from lenskit import hooks
from lenskit.cache import residual_stream
from lenskit.shards import load_cache, stream_cache

STREAMED = "blocks.*.hook_resid_post"


# --- (a) forward overhead -------------------------------------------------------------------


def time_forward_variants(model: HookedTransformer, tokens: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Wall seconds per call of each variant, over `repeats` interleaved rounds after one warm-up round."""
    every_resid = hooks.cache("blocks.*.hook_resid_*")
    n_layers = model.cfg.n_layers

    def with_lenskit_cache():
        with every_resid.on(model):
            return model(tokens)

    variants = {
        "forward (logits)": lambda: model(tokens),
        "forward + hooks.cache(every resid)": with_lenskit_cache,
        "TL run_with_cache(every resid)": lambda: model.run_with_cache(
            tokens, names_filter=lambda n: "hook_resid" in n
        ),
        f"forward to final resid (stop_at_layer={n_layers})": lambda: model(tokens, stop_at_layer=n_layers),
        "residual_stream(kind='all')": lambda: residual_stream(model, tokens, "all"),
    }
    return {name: clocks["wall"] for name, clocks in interleaved(variants, repeats, inference=True).items()}


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
        stream_cache(
            model,
            random_batches(n_rows, 8, pos, model.cfg.d_vocab),
            STREAMED,
            out_dir,
            shard_tokens=shard_tokens,
            batch_size=8,
            progress=False,
        )
    seconds = time.perf_counter() - start
    return {
        "tokens": n_rows * pos,
        "seconds": seconds,
        "tokens_per_s": n_rows * pos / seconds,
        "model_build_peak_rss_mb": model_build_peak,
        "rss_with_model_mb": with_model,
        "peak_rss_mb": rss_mb("VmHWM"),
    }


def load_worker(out_dir: str) -> dict:
    """One pass over every shard (mean of every hook), memory-mapped, one shard at a time."""
    reset_peak_rss()
    cache = load_cache(out_dir)
    start = time.perf_counter()
    means = [sum(shard[name].float().mean().item() for name in cache.names) for shard in cache.iter_shards()]
    size_mb = sum(path.stat().st_size for path in Path(out_dir).glob("shard_*.safetensors")) / 2**20
    return {
        "shards": len(means),
        "cache_mb": size_mb,
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": rss_mb("VmHWM"),
    }


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    add_model_argument(parser)
    parser.add_argument(
        "--stream-tokens", type=int, nargs=2, help="the two streamed dataset sizes (default 50000 200000)"
    )
    add_threads_argument(parser)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args)
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

    worker = worker_flags(args)
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
    print(
        f"  {'tokens':>8} {'tok/s':>7} {'RSS model MB':>13} {'peak RSS streaming MB':>22} {'cache MB':>9} "
        f"{'load pass s':>12} {'peak RSS load MB':>17}"
    )
    for s in streams:
        print(
            f"  {s['tokens']:>8} {s['tokens_per_s']:>7.0f} {s['rss_with_model_mb']:>13.0f} {s['peak_rss_mb']:>22.0f} "
            f"{s['load']['cache_mb']:>9.0f} {s['load']['seconds']:>12.2f} {s['load']['peak_rss_mb']:>17.0f}"
        )
    print(
        f"  peak RSS growth while streaming, {streams[0]['tokens']} -> {streams[1]['tokens']} tokens: {rss_growth:+.1%}"
        f" (building the model peaks at {streams[0]['model_build_peak_rss_mb']:.0f} MB)"
    )

    results = write_results(
        "cache",
        args.model,
        {
            "quick": args.quick,
            "model": args.model or GPT2_SMALL,
            "model_description": label,
            "batch": batch,
            "pos": pos,
            "repeats": repeats,
            "forward_seconds": times,
            "forward_median_seconds": medians,
            "ratios": ratios,
            "stream": streams,
            "stream_peak_rss_growth": rss_growth,
        },
    )
    print(f"\nwrote {results}")


if __name__ == "__main__":
    main()
