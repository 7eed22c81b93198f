"""Benchmark lenskit.patch against transformer_lens.patching, and attribution patching against exact.

(a) Speed, on a GPT-2-small-shaped model (random weights, seeded), CPU. 8 prompt pairs of 15
    random tokens shaped like TransformerLens' IOI demo ("<bos> When John and Mary went to the shops,
    John gave the bag to"): the corrupted prompt is the clean one with the second subject mention (S2,
    position 10) replaced by the indirect object, so the runs differ at one position, as in that
    demo. Metric: logit(IO) - logit(S) at the last position, mean over prompts. Grids: resid_pre by
    (layer, pos) and head output z by (layer, head, pos); a third row repeats resid_pre with random
    corrupted prompts (every position differs: no cell can be left out, the worst case).
    lenskit computes the whole grid. transformer_lens.patching runs one full forward per cell; it is
    timed on a seeded sample of cells through its own code path (generic_activation_patch with the
    patch setter get_act_patch_resid_pre / get_act_patch_attn_head_out_by_pos use, and an index_df)
    and scaled to the grid, which is exact up to noise because its cost per cell does not depend on
    the cell (each sampled cell is timed on its own; the grid uses their median); its clean
    run_with_cache is added once. The sampled cells' values are compared with lenskit's. Times are this process's CPU time (the speed-up uses it: on a shared machine wall time
    mostly measures the neighbours) and wall time.
(b) Memory: z by (layer, head, pos) on 64-token prompts (8 pairs, every position differs), in a
    fresh subprocess: peak RSS. The grid is restricted to position 0 and two heads, which keeps the
    run short and still runs the largest batches (cells at position 0 recompute all 64 positions).
(c) Attribution patching against exact patching on the zoo model's IOI prompts (lenskit.zoo.data's
    held-out IOI examples whose names are single tokens, the most common length, corrupted by the
    same S2 -> IO replacement): per site, the Pearson correlation of the two grids and the speed-up
    (CPU time, fastest of 5 runs each).

    python benchmarks/bench_patching.py                      # full run
    python benchmarks/bench_patching.py --quick              # smoke run (2 layers, small batches)
    python benchmarks/bench_patching.py --zoo /tmp/zoo/A     # another zoo model (name or folder)

Prints tables and writes benchmarks/results/bench_patching.json.
"""

import argparse
import json
import platform
import statistics
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import transformer_lens.patching as tlp
from transformer_lens import HookedTransformer, HookedTransformerConfig

import lenskit
from lenskit import metrics
from lenskit.patching import attribution_patch, patch
from lenskit.tokens import token_id
from lenskit.zoo.data import ioi_dataset

from bench_cache import GPT2_SMALL, in_subprocess, reset_peak_rss, rss_mb

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")

RESULTS = Path(__file__).parent / "results" / "bench_patching.json"
IO_POS, S_POS, S2_POS = 4, 2, 10  # "<bos> When John and Mary went to the shops, John gave the bag to"
SPEED_GRIDS = [  # name, site, by, TransformerLens patch setter, TL index columns, corruption
    ("resid_pre by (layer, pos)", "resid_pre", "layer_pos", tlp.layer_pos_patch_setter, ("layer", "pos"), "S2"),
    ("z by (layer, head, pos)", "z", "layer_head_pos", tlp.layer_pos_head_vector_patch_setter, ("layer", "pos", "head"), "S2"),
    ("resid_pre, every position differs", "resid_pre", "layer_pos", tlp.layer_pos_patch_setter, ("layer", "pos"), "random"),
]
ATTRIBUTION_SITES = [("resid_pre", "layer_pos"), ("attn_out", "layer_pos"), ("mlp_out", "layer_pos"),
                     ("z", "layer_head_pos"), ("z", "layer_head"), ("q", "layer_head"), ("k", "layer_head"),
                     ("v", "layer_head"), ("pattern", "layer_head")]


def gpt2_small(n_layers: int | None = None) -> HookedTransformer:
    config = GPT2_SMALL | ({"n_layers": n_layers} if n_layers else {})
    return HookedTransformer(HookedTransformerConfig(**config)).eval()


def timed(run, repeats: int = 1):
    """(result, CPU seconds of this process, wall seconds), the fastest of `repeats` runs."""
    best = None
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        result = run()
        this = (result, time.process_time() - cpu, time.perf_counter() - wall)
        best = this if best is None or this[1] < best[1] else best
    return best


def ioi_shaped_pairs(d_vocab: int, batch: int, n_pos: int, corruption: str):
    """Random-token prompts with IOI's name positions; the S2 -> IO corruption, or random prompts."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, d_vocab, (batch, n_pos), generator=generator)
    clean[:, S2_POS] = clean[:, S_POS]
    if corruption == "random":
        corrupted = torch.randint(0, d_vocab, (batch, n_pos), generator=generator)
    else:
        corrupted = clean.clone()
        corrupted[:, S2_POS] = clean[:, IO_POS]
    metric = metrics.logit_diff(clean[:, IO_POS], clean[:, S_POS])
    return clean, corrupted, metric


# --- (a) speed against transformer_lens.patching ---------------------------------------------

def speed_row(model, name, site, by, setter, tl_axes, corruption, batch, n_pos, tl_cells) -> dict:
    clean, corrupted, metric = ioi_shaped_pairs(model.cfg.d_vocab, batch, n_pos, corruption)
    with torch.inference_mode():
        patch(model, clean, corrupted, metric, site=site, by=by, layers=[-1], progress=False)  # warm-up
        result, cpu, wall = timed(lambda: patch(model, clean, corrupted, metric, site=site, by=by, progress=False))
        (_, clean_cache), cache_cpu, cache_wall = timed(lambda: model.run_with_cache(clean))
        cells = result.to_frame().sample(tl_cells, random_state=0)
        index_df = cells[list(tl_axes)].reset_index(drop=True)
        bound = metric.bind(model)
        tl_runs = [timed(lambda: tlp.generic_activation_patch(
            model, corrupted, clean_cache, bound, setter, site, index_df=index_df.iloc[[i]])) for i in range(tl_cells)]
    tl_values = torch.cat([values for values, _, _ in tl_runs]).cpu()
    tl_cpu = statistics.median(cpu for _, cpu, _ in tl_runs)  # per cell; the median resists load spikes
    tl_wall = statistics.median(wall for _, _, wall in tl_runs)
    n_cells = result.tensor.numel()
    tl_cpu_grid, tl_wall_grid = cache_cpu + tl_cpu * n_cells, cache_wall + tl_wall * n_cells
    return {"grid": name, "site": site, "by": by, "corruption": corruption, "cells": n_cells,
            "lenskit_cpu_s": cpu, "lenskit_wall_s": wall, "tl_sampled_cells": tl_cells,
            "tl_cpu_s_per_cell": [cpu for _, cpu, _ in tl_runs], "tl_cpu_s_grid": tl_cpu_grid,
            "tl_wall_s_grid": tl_wall_grid, "speedup_cpu": tl_cpu_grid / cpu, "speedup_wall": tl_wall_grid / wall,
            "max_abs_diff": (torch.tensor(cells["value"].to_numpy()) - tl_values).abs().max().item()}


# --- (b) memory, in a fresh subprocess ------------------------------------------------------

def memory_worker(n_layers: int, batch: int, n_pos: int) -> dict:
    model = gpt2_small(n_layers)
    clean, corrupted, metric = ioi_shaped_pairs(model.cfg.d_vocab, batch, n_pos, "random")
    with_model = rss_mb()
    reset_peak_rss()
    with torch.inference_mode():
        _, cpu, wall = timed(lambda: patch(model, clean, corrupted, metric, site="z", by="layer_head_pos",
                                           heads=[0, 1], positions=[0], progress=False))
    return {"batch": batch, "pos": n_pos, "rss_with_model_mb": with_model, "peak_rss_mb": rss_mb("VmHWM"),
            "cpu_s": cpu, "wall_s": wall}


# --- (c) attribution patching on the zoo model ----------------------------------------------

def ioi_pairs(model: HookedTransformer, n_prompts: int):
    """Held-out IOI prompts with single-token names, of the most common length, and their S2 -> IO corruption."""
    unknown = model.tokenizer.unk_token_id

    def single(name: str) -> bool:
        try:
            return token_id(model, " " + name) != unknown
        except ValueError:
            return False

    examples = [e for e in ioi_dataset(400, seed=0) if single(e.io) and single(e.subject)]
    pairs = []
    for e in examples:
        head, s2 = e.prompt.rsplit(f" {e.subject} ", 1)  # the second subject mention
        pairs.append((e, f"{head} {e.io} {s2}"))
    length = Counter(len(model.to_tokens(e.prompt)[0]) for e, _ in pairs).most_common(1)[0][0]
    chosen = [(e, c) for e, c in pairs if len(model.to_tokens(e.prompt)[0]) == length][:n_prompts]
    clean = model.to_tokens([e.prompt for e, _ in chosen])
    corrupted = model.to_tokens([c for _, c in chosen])
    metric = metrics.logit_diff([" " + e.io for e, _ in chosen], [" " + e.subject for e, _ in chosen])
    return clean, corrupted, metric


def attribution_rows(model: HookedTransformer, n_prompts: int) -> tuple[list[dict], dict]:
    clean, corrupted, metric = ioi_pairs(model, n_prompts)
    patch(model, clean, corrupted, metric, layers=[-1], progress=False)  # warm-up
    rows = []
    for site, by in ATTRIBUTION_SITES:
        exact, exact_cpu, _ = timed(lambda: patch(model, clean, corrupted, metric, site=site, by=by, progress=False), 5)
        estimate, estimate_cpu, _ = timed(lambda: attribution_patch(model, clean, corrupted, metric, site=site, by=by), 5)
        r = torch.corrcoef(torch.stack([exact.tensor.flatten(), estimate.tensor.flatten()]))[0, 1].item()
        rows.append({"site": site, "by": by, "cells": exact.tensor.numel(), "pearson_r": r,
                     "exact_cpu_s": exact_cpu, "attribution_cpu_s": estimate_cpu, "speedup": exact_cpu / estimate_cpu})
    prompts = {"n_prompts": len(clean), "n_pos": clean.shape[1], "clean_logit_diff": exact.clean_value,
               "corrupted_logit_diff": exact.corrupted_value, "example": model.to_string(clean[0])}
    return rows, prompts


# --- main ---------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--zoo", default="lenskit/ioi-4l", help="zoo model for (c): a zoo name or a model folder")
    parser.add_argument("--tl-cells", type=int, help="cells of each grid timed with transformer_lens.patching")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(memory_worker(*args.worker)))
        return

    n_layers, batch, n_pos = (2, 4, 14) if args.quick else (None, 8, 15)
    tl_cells = args.tl_cells or (2 if args.quick else 6)
    model = gpt2_small(n_layers)
    speed = [speed_row(model, *grid, batch, n_pos, tl_cells) for grid in SPEED_GRIDS]
    del model
    memory = in_subprocess(__file__, n_layers or 0, *((2, 16) if args.quick else (8, 64)))
    try:
        zoo_model = lenskit.load(args.zoo)
    except (ValueError, FileNotFoundError, OSError) as error:
        attribution, prompts = [], {"skipped": f"zoo model {args.zoo!r} could not be loaded: {error}"}
    else:
        attribution, prompts = attribution_rows(zoo_model, 4 if args.quick else 8)

    layers = n_layers or GPT2_SMALL["n_layers"]
    print(f"GPT-2-small-shaped model ({layers} layers), random weights, CPU ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}")
    print(f"\n(a) {batch} prompt pairs x {n_pos} tokens; transformer_lens.patching timed on {tl_cells} sampled cells per grid")
    print(f"  {'grid':<36} {'cells':>6} {'lenskit CPU s':>14} {'TL CPU s':>10} {'speed-up':>9} "
          f"{'lenskit wall s':>15} {'TL wall s':>10} {'wall speed-up':>14} {'max |diff|':>11}")
    for row in speed:
        print(f"  {row['grid']:<36} {row['cells']:>6} {row['lenskit_cpu_s']:>14.1f} {row['tl_cpu_s_grid']:>10.1f} "
              f"{row['speedup_cpu']:>8.1f}x {row['lenskit_wall_s']:>15.1f} {row['tl_wall_s_grid']:>10.1f} "
              f"{row['speedup_wall']:>13.1f}x {row['max_abs_diff']:>11.1e}")
    print(f"\n(b) z by (layer, head, pos), {memory['batch']} pairs x {memory['pos']} tokens, position 0, heads 0-1: "
          f"peak RSS {memory['peak_rss_mb']:.0f} MB (model loaded: {memory['rss_with_model_mb']:.0f} MB)")
    print(f"\n(c) attribution vs exact patching, zoo model {args.zoo!r}")
    if not attribution:
        print(f"  {prompts['skipped']}")
    else:
        print(f"  {prompts['n_prompts']} IOI prompts x {prompts['n_pos']} tokens, e.g. {prompts['example']!r}; "
              f"logit diff clean {prompts['clean_logit_diff']:.2f}, corrupted {prompts['corrupted_logit_diff']:.2f}")
        print(f"  {'site':<9} {'by':<15} {'cells':>6} {'Pearson r':>10} {'exact CPU s':>12} {'attribution CPU s':>18} {'speed-up':>9}")
        for row in attribution:
            print(f"  {row['site']:<9} {row['by']:<15} {row['cells']:>6} {row['pearson_r']:>10.3f} "
                  f"{row['exact_cpu_s']:>12.2f} {row['attribution_cpu_s']:>18.2f} {row['speedup']:>8.1f}x")

    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "quick": args.quick, "machine": platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "n_layers": layers, "batch": batch, "pos": n_pos, "speed": speed,
        "memory": memory, "zoo": args.zoo, "attribution_prompts": prompts, "attribution": attribution,
    }, indent=1))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
