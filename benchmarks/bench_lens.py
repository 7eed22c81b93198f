"""Benchmark the logit lens on a GPT-2-small-shaped model with random weights (default) or any lenskit.load
model (--model smollm2-135m).

lenskit.logit_lens over every residual stream (13) and every position, keeping the top 5, against
the naive full-vocabulary lens (tests/reference/logit_lens.py): run_with_cache, the final norm
written out, W_U and b_U into [layer, batch, pos, vocab] logits, softmax, top-k. Both in the same process,
interleaved: median wall and CPU time over repeats (CPU time, this process's over all threads,
is steadier on a shared machine), peak memory above the starting point (CPU: peak RSS,
/proc VmHWM reset through clear_refs, which sees torch's allocations; CUDA: max_memory_allocated)
and the largest difference between their top-k probabilities. Each input length runs in a fresh
subprocess.

    python benchmarks/bench_lens.py            # 1 x 128 and 1 x 1024 tokens
    python benchmarks/bench_lens.py --model smollm2-135m --lengths 128 512
    python benchmarks/bench_lens.py --quick    # 1 x 16 and 1 x 64 tokens, one repeat

The naive lens holds [layers, pos, vocab] float32 logits twice (logits and probabilities): with
smollm2-135m's 31 streams and 49152 tokens that is 6 GB per copy at 1024 tokens, hence --lengths.
Prints a table and writes benchmarks/results/bench_lens.json (bench_lens_<model>.json with --model). Other benchmarks can call
`lens_benchmark(model, tokens)` directly.
"""

import argparse
import json
import statistics
import time

import torch
from common import (
    SHAPE,
    add_model_argument,
    add_threads_argument,
    in_subprocess,
    memory_peak_mb,
    prompt_tokens,
    set_threads,
    start_memory_peak,
    worker_flags,
    write_results,
)
from reference.logit_lens import naive_lens
from transformer_lens import HookedTransformer

import lenskit
from lenskit.lens import logit_lens


def lens_benchmark(model: HookedTransformer, tokens: torch.Tensor, top_k: int = 5, repeats: int = 1) -> list[dict]:
    """Time and peak memory of lenskit.logit_lens and of `naive_lens` on `tokens`, all layers and positions.

    Returns one dict per method: method, batch, pos, layers, top_k, seconds and cpu_seconds
    (medians over `repeats` rounds, the methods interleaved, after a warm-up on 8 tokens),
    peak_mb (the largest peak above the memory in use before a call), full_logits_mb (what
    [layer, batch, pos, vocab] float32 logits take) and max_prob_diff (largest |difference|
    between the two methods' top-k probabilities).
    """
    methods = {
        "lenskit logit_lens": lambda inputs: logit_lens(model, inputs, top_k=top_k, progress=False).top_probs,
        "naive full-vocabulary lens": lambda inputs: naive_lens(model, inputs, top_k).values.cpu(),
    }
    layers = model.cfg.n_layers + 1
    shape = {
        "batch": tokens.shape[0],
        "pos": tokens.shape[1],
        "layers": layers,
        "top_k": top_k,
        "full_logits_mb": layers * tokens.numel() * model.cfg.d_vocab_out * 4 / 2**20,
    }
    measured = {method: {"seconds": [], "cpu_seconds": [], "peak_mb": []} for method in methods}
    probs = {}
    with torch.inference_mode():
        for run in methods.values():
            run(tokens[:, :8])
        for _ in range(repeats):
            for method, run in methods.items():
                start = start_memory_peak(tokens.device)
                wall, cpu = time.perf_counter(), time.process_time()
                probs[method] = run(tokens)
                measured[method]["seconds"].append(time.perf_counter() - wall)
                measured[method]["cpu_seconds"].append(time.process_time() - cpu)
                measured[method]["peak_mb"].append(memory_peak_mb(tokens.device) - start)
    difference = (probs["lenskit logit_lens"] - probs["naive full-vocabulary lens"]).abs().max().item()
    return [
        {
            "method": method,
            **shape,
            "seconds": statistics.median(m["seconds"]),
            "cpu_seconds": statistics.median(m["cpu_seconds"]),
            "peak_mb": max(m["peak_mb"]),
            "max_prob_diff": difference,
        }
        for method, m in measured.items()
    ]


def worker(pos: int, repeats: int, device: str, model_name: str | None = None) -> list[dict]:
    model = lenskit.load(SHAPE, device=device) if model_name is None else lenskit.load(model_name, device=device).eval()
    tokens = prompt_tokens(model, pos, 0).to(device)
    return lens_benchmark(model, tokens, repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short inputs, one repeat")
    parser.add_argument("--device", default="cpu")
    add_model_argument(parser)
    parser.add_argument("--lengths", type=int, nargs="+", help="prompt lengths (default 128 1024; --quick: 16 64)")
    add_threads_argument(parser)
    parser.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.device, args.model)))
        return

    lengths = args.lengths or ([16, 64] if args.quick else [128, 1024])
    runs = [(pos, 1 if args.quick or pos > 512 else 3) for pos in lengths]
    rows = []
    for pos, repeats in runs:
        rows += in_subprocess(__file__, pos, repeats, "--device", args.device, *worker_flags(args))

    model_label = args.model or f"GPT-2-small-shaped model ({SHAPE.name}), random weights"
    print(
        f"logit lens, {model_label}, {args.device} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}; all layers and positions, top 5"
    )
    print(
        f"{'tokens':<8} {'method':<28} {'wall s':>8} {'CPU s':>8} {'peak MB':>8} {'[L,pos,vocab] MB':>17} "
        f"{'max |dp|':>9}"
    )
    for row in rows:
        print(
            f"{row['batch']}x{row['pos']:<6} {row['method']:<28} {row['seconds']:>8.2f} {row['cpu_seconds']:>8.2f} "
            f"{row['peak_mb']:>8.0f} {row['full_logits_mb']:>17.0f} {row['max_prob_diff']:>9.1e}"
        )
    ratios = []
    for lens, naive in zip(rows[::2], rows[1::2]):
        ratios.append(
            {
                "pos": lens["pos"],
                "wall_time_naive_over_lenskit": naive["seconds"] / lens["seconds"],
                "cpu_time_naive_over_lenskit": naive["cpu_seconds"] / lens["cpu_seconds"],
                "peak_memory_naive_over_lenskit": naive["peak_mb"] / lens["peak_mb"],
            }
        )
        print(
            f"1x{lens['pos']}: naive / lenskit  wall time {ratios[-1]['wall_time_naive_over_lenskit']:.2f}x, "
            f"CPU time {ratios[-1]['cpu_time_naive_over_lenskit']:.2f}x, "
            f"peak memory {ratios[-1]['peak_memory_naive_over_lenskit']:.1f}x"
        )

    results = write_results(
        "lens",
        args.model,
        {
            "quick": args.quick,
            "device": args.device,
            "model": args.model or json.loads(SHAPE.read_text()),
            "rows": rows,
            "ratios": ratios,
        },
    )
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
