"""Benchmark lenskit.path_patch against the IOI paper's two-runs-per-sender recipe, on the CPU.

Every head as a sender, on 8 IOI prompt pairs (common.ioi_pairs), to two kinds of receiver:
the logits, and the queries of three late heads. lenskit computes the whole [layer, head] grid;
the reference (tests/reference/path_patching.py: two full runs per sender with every other
component frozen; the clean and corrupted caches made once) is timed on `--sample` senders and
extrapolated to the grid (caches + per-sender time x senders; its cost does not depend on which
sender it is). Both are checked to agree on the sampled senders. Target: at least 10x.

    python benchmarks/bench_path_patching.py                       # SmolLM2-135M (needs its wheel)
    python benchmarks/bench_path_patching.py --model path/to.gguf --sample 4

Prints a table and writes benchmarks/results/bench_path_patching.json.
"""

import argparse
import time

import torch
from common import add_threads_argument, describe, ioi_pairs, load_model, set_threads, write_results
from reference.path_patching import caches, path_patch_two_runs

import lenskit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="any lenskit.load name (default smollm2-135m)")
    parser.add_argument("--sample", type=int, default=6, help="senders the reference is timed on (default 6)")
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args)
    model = load_model(args.model)
    clean, corrupted, metric, _ = ioi_pairs(model, 8)
    cfg = model.cfg
    late = cfg.n_layers - 3
    receivers = {"logits": "logits", "queries": [(late, 0, "q"), (late + 1, 1, "q"), (late + 2, 2, "q")]}
    senders = [(layer, head) for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    step = max(1, len(senders) // args.sample)
    sample = senders[::step][: args.sample]
    bound = metric.bind(model)
    rows = []
    for kind, target in receivers.items():
        start = time.perf_counter()
        result = lenskit.path_patch(model, clean, corrupted, metric, receivers=target, progress=False)
        ours = time.perf_counter() - start
        reaching = [s for s in senders if target == "logits" or any(r[0] > s[0] for r in target)]
        sampled = [s for s in sample if s in reaching]
        start = time.perf_counter()
        runs = caches(model, clean, corrupted)
        cache_time = time.perf_counter() - start
        start = time.perf_counter()
        reference = [path_patch_two_runs(model, clean, corrupted, bound, s, target, runs) for s in sampled]
        per_sender = (time.perf_counter() - start) / len(sampled)
        gap = max(abs(result.tensor[s].item() - value) for s, value in zip(sampled, reference))
        extrapolated = cache_time + per_sender * len(reaching)
        rows.append(
            {
                "receivers": kind,
                "senders": len(reaching),
                "lenskit_s": ours,
                "reference_s_per_sender": per_sender,
                "reference_s_extrapolated": extrapolated,
                "speedup": extrapolated / ours,
                "max_abs_difference": gap,
                "target_met": extrapolated / ours >= 10,
            }
        )
    print(describe(model, args.model))
    print(
        f"{clean.shape[0]} IOI pairs of {clean.shape[1]} tokens; torch threads {torch.get_num_threads()}; "
        f"reference timed on {len(sample)} senders and extrapolated"
    )
    print(
        f"{'receivers':<10} {'senders':>7} {'lenskit s':>10} {'reference s':>12} {'speedup':>8} {'max |diff|':>11} target >=10x"
    )
    for row in rows:
        print(
            f"{row['receivers']:<10} {row['senders']:>7} {row['lenskit_s']:>10.2f} {row['reference_s_extrapolated']:>12.1f} "
            f"{row['speedup']:>7.1f}x {row['max_abs_difference']:>11.2e} {'met' if row['target_met'] else 'MISSED'}"
        )
    write_results("path_patching", None, {"model": args.model, "pairs": list(clean.shape), "rows": rows}, indent=2)


if __name__ == "__main__":
    main()
