"""Benchmark lenskit.patch against transformer_lens.patching, and attribution patching against exact.

(a) Speed, CPU, on 8 IOI prompt pairs of about 15 tokens. With --model (any lenskit.load name, e.g.
    smollm2-135m) the pairs are real: common.ioi_pairs builds them from four IOI templates with
    names that are single tokens for the model ("Then, Mary and John went to the office. John gave a
    letter to"), and the corrupted prompt swaps the second subject mention (S2) for the indirect object's
    name. By default (a GPT-2-small-shaped model with random weights and no tokenizer) they are random
    tokens shaped like TransformerLens' IOI demo ("<bos> When John and Mary went to the shops, John gave
    the bag to", 15 tokens, S2 at position 10) with the same S2 -> IO corruption. Either way the runs
    differ from S2 on. Metric: logit(IO) - logit(S) at the last position, mean over prompts. Grids:
    resid_pre by (layer, pos) (transformer_lens.patching.get_act_patch_resid_pre) and head output z by
    (layer, head, pos) (get_act_patch_attn_head_out_by_pos); a third row repeats resid_pre with random
    corrupted prompts (every position differs: no cell can be left out, the worst case).
    lenskit computes the whole grid. transformer_lens.patching runs one full forward per cell; it is
    timed on a seeded sample of cells through those two functions (with an index_df of the sampled
    cells) and extrapolated to the grid, which is exact up to noise because its cost per cell does not
    depend on the cell (each sampled cell is timed on its own; the grid uses their median); its clean
    run_with_cache is added once. The two are interleaved: in each of 3 rounds (1 for the worst-case
    row) lenskit computes the whole grid, then TransformerLens runs its share of the sampled cells;
    lenskit's time is the median over the rounds. The sampled cells' values are compared with
    lenskit's. Times are this process's CPU time (the speed-up uses it: on a shared machine wall
    time mostly measures the neighbours) and wall time. Target: lenskit at least 10x faster on the two IOI grids.
(b) Memory: z by (layer, head, pos) on 64-token prompts (8 pairs, every position differs), in a
    fresh subprocess (the model loaded first; the peak counts from then): peak RSS. The grid is
    restricted to position 0 and two heads, which keeps the run short and still runs the largest
    batches (cells at position 0 recompute all 64 positions; the batch size depends on the start
    position only). Target: under 4 GB.
(c) Attribution patching against exact patching on the zoo model's IOI prompts (lenskit.zoo.data's
    held-out IOI examples whose names are single tokens, the most common length, corrupted by the
    same S2 -> IO replacement): per site, the Pearson correlation of the two grids and the speed-up
    (CPU time, fastest of 5 runs each).

    python benchmarks/bench_patching.py                         # GPT-2-small shape, random weights
    python benchmarks/bench_patching.py --model smollm2-135m    # a real model, real IOI prompts
    python benchmarks/bench_patching.py --quick                 # smoke run (2 layers, small batches)
    python benchmarks/bench_patching.py --zoo /tmp/zoo/A        # another zoo model for (c) (name or folder)

Prints tables and writes benchmarks/results/bench_patching.json (bench_patching_<model>.json with --model).
"""

import argparse
import json
import statistics
from collections import Counter

import torch
import transformer_lens.patching as tlp
from common import (
    GPT2_SMALL,
    add_model_argument,
    add_threads_argument,
    best_of,
    describe,
    gpt2_small,
    in_subprocess,
    ioi_pairs,
    load_model,
    reset_peak_rss,
    rss_mb,
    set_threads,
    worker_flags,
    write_results,
)
from transformer_lens import HookedTransformer

import lenskit
from lenskit import metrics
from lenskit.patching import attribution_patch, patch
from lenskit.tokens import token_id
from lenskit.zoo.data import ioi_dataset

IO_POS, S_POS, S2_POS = 4, 2, 10  # "<bos> When John and Mary went to the shops, John gave the bag to"
SPEED_GRIDS = [  # name, site, by, transformer_lens.patching function, its index columns, corruption, target
    ("resid_pre by (layer, pos)", "resid_pre", "layer_pos", tlp.get_act_patch_resid_pre, ("layer", "pos"), "S2", 10),
    (
        "z by (layer, head, pos)",
        "z",
        "layer_head_pos",
        tlp.get_act_patch_attn_head_out_by_pos,
        ("layer", "pos", "head"),
        "S2",
        10,
    ),
    (
        "resid_pre, every position differs",
        "resid_pre",
        "layer_pos",
        tlp.get_act_patch_resid_pre,
        ("layer", "pos"),
        "random",
        None,
    ),
]
MEMORY_TARGET_MB = 4096
ATTRIBUTION_SITES = [
    ("resid_pre", "layer_pos"),
    ("attn_out", "layer_pos"),
    ("mlp_out", "layer_pos"),
    ("z", "layer_head_pos"),
    ("z", "layer_head"),
    ("q", "layer_head"),
    ("k", "layer_head"),
    ("v", "layer_head"),
    ("pattern", "layer_head"),
]


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


def speed_pairs(model, batch: int, n_pos: int, corruption: str):
    """(clean, corrupted, metric, what): real IOI pairs when the model has a tokenizer, else IOI-shaped random tokens.

    corruption "S2": S2 -> IO; "random": the clean prompts against random tokens (every position differs).
    """
    if model.tokenizer is not None:
        clean, corrupted, metric, examples = ioi_pairs(model, batch)
        what = f"real IOI pairs, e.g. {examples[0][0]!r} -> {examples[0][1]!r}"
        if corruption == "random":
            generator = torch.Generator().manual_seed(1)
            corrupted = torch.randint(0, model.cfg.d_vocab, clean.shape, generator=generator).to(clean.device)
        return clean, corrupted, metric, what
    clean, corrupted, metric = ioi_shaped_pairs(model.cfg.d_vocab, batch, n_pos, corruption)
    return clean, corrupted, metric, "IOI-shaped random tokens (S2 at position 10)"


def speed_row(model, name, site, by, tl_function, tl_axes, corruption, target, batch, n_pos, tl_cells, rounds) -> dict:
    """lenskit's whole grid and transformer_lens' sampled cells, timed interleaved: `rounds` rounds of
    (lenskit's grid, then tl_cells / rounds of TL's cells); lenskit's median over the rounds."""
    clean, corrupted, metric, what = speed_pairs(model, batch, n_pos, corruption)
    bound = metric.bind(model)
    runs, tl_runs = [], []
    with torch.inference_mode():
        patch(model, clean, corrupted, metric, site=site, by=by, layers=[-1], progress=False)  # warm-up
        (_, clean_cache), cache_cpu, cache_wall = best_of(lambda: model.run_with_cache(clean))
        for round_ in range(rounds):
            runs.append(best_of(lambda: patch(model, clean, corrupted, metric, site=site, by=by, progress=False)))
            if round_ == 0:
                cells = runs[0][0].to_frame().sample(tl_cells, random_state=0)
                index_df = cells[list(tl_axes)].reset_index(drop=True)
            for i in range(round_, tl_cells, rounds):
                tl_runs.append(
                    best_of(
                        lambda: tl_function(
                            model, corrupted, clean_cache, bound, index_axis_names=None, index_df=index_df.iloc[[i]]
                        )
                    )
                )
    order = [i for round_ in range(rounds) for i in range(round_, tl_cells, rounds)]
    tl_runs = [run for _, run in sorted(zip(order, tl_runs), key=lambda pair: pair[0])]
    result = runs[0][0]
    cpu = statistics.median(c for _, c, _ in runs)
    wall = statistics.median(w for _, _, w in runs)
    tl_values = torch.cat([values for values, _, _ in tl_runs]).cpu()
    tl_cpu = statistics.median(cpu for _, cpu, _ in tl_runs)  # per cell; the median resists load spikes
    tl_wall = statistics.median(wall for _, _, wall in tl_runs)
    n_cells = result.tensor.numel()
    tl_cpu_grid, tl_wall_grid = cache_cpu + tl_cpu * n_cells, cache_wall + tl_wall * n_cells
    speedup = tl_cpu_grid / cpu
    return {
        "grid": name,
        "site": site,
        "by": by,
        "corruption": corruption,
        "prompts": what,
        "batch": clean.shape[0],
        "pos": clean.shape[1],
        "cells": n_cells,
        "clean_value": result.clean_value,
        "corrupted_value": result.corrupted_value,
        "rounds": rounds,
        "lenskit_cpu_s_runs": [c for _, c, _ in runs],
        "lenskit_cpu_s": cpu,
        "lenskit_wall_s": wall,
        "tl_sampled_cells": tl_cells,
        "tl_function": next(f"transformer_lens.patching.{n}" for n in dir(tlp) if getattr(tlp, n) is tl_function),
        "tl_cpu_s_per_cell": [cpu for _, cpu, _ in tl_runs],
        "tl_cpu_s_grid": tl_cpu_grid,
        "tl_wall_s_grid": tl_wall_grid,
        "speedup_cpu": speedup,
        "speedup_wall": tl_wall_grid / wall,
        "target_speedup": target,
        "target_met": None if target is None else speedup >= target,
        "max_abs_diff": (torch.tensor(cells["value"].to_numpy()) - tl_values).abs().max().item(),
    }


# --- (b) memory, in a fresh subprocess ------------------------------------------------------


def memory_worker(model_name: str, n_layers: int, batch: int, n_pos: int) -> dict:
    """Peak RSS of the restricted z grid, counted from when the model is loaded."""
    model = load_model(model_name) if model_name else gpt2_small(n_layers or None)
    clean, corrupted, metric = ioi_shaped_pairs(model.cfg.d_vocab, batch, n_pos, "random")
    model_load_peak, with_model = rss_mb("VmHWM"), rss_mb()
    reset_peak_rss()
    with torch.inference_mode():
        _, cpu, wall = best_of(
            lambda: patch(
                model,
                clean,
                corrupted,
                metric,
                site="z",
                by="layer_head_pos",
                heads=[0, 1],
                positions=[0],
                progress=False,
            )
        )
    peak = rss_mb("VmHWM")
    return {
        "batch": batch,
        "pos": n_pos,
        "model_load_peak_rss_mb": model_load_peak,
        "rss_with_model_mb": with_model,
        "peak_rss_mb": peak,
        "target_mb": MEMORY_TARGET_MB,
        "target_met": peak < MEMORY_TARGET_MB,
        "cpu_s": cpu,
        "wall_s": wall,
    }


# --- (c) attribution patching on the zoo model ----------------------------------------------


def zoo_ioi_pairs(model: HookedTransformer, n_prompts: int):
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
    clean, corrupted, metric = zoo_ioi_pairs(model, n_prompts)
    patch(model, clean, corrupted, metric, layers=[-1], progress=False)  # warm-up
    rows = []
    for site, by in ATTRIBUTION_SITES:
        exact, exact_cpu, _ = best_of(
            lambda: patch(model, clean, corrupted, metric, site=site, by=by, progress=False), 5
        )
        estimate, estimate_cpu, _ = best_of(
            lambda: attribution_patch(model, clean, corrupted, metric, site=site, by=by), 5
        )
        r = torch.corrcoef(torch.stack([exact.tensor.flatten(), estimate.tensor.flatten()]))[0, 1].item()
        rows.append(
            {
                "site": site,
                "by": by,
                "cells": exact.tensor.numel(),
                "pearson_r": r,
                "exact_cpu_s": exact_cpu,
                "attribution_cpu_s": estimate_cpu,
                "speedup": exact_cpu / estimate_cpu,
            }
        )
    prompts = {
        "n_prompts": len(clean),
        "n_pos": clean.shape[1],
        "clean_logit_diff": exact.clean_value,
        "corrupted_logit_diff": exact.corrupted_value,
        "example": model.to_string(clean[0]),
    }
    return rows, prompts


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    add_model_argument(parser)
    parser.add_argument("--zoo", default="lenskit/ioi-4l", help="zoo model for (c): a zoo name or a model folder")
    parser.add_argument("--skip-attribution", action="store_true", help="leave out (c)")
    parser.add_argument("--tl-cells", type=int, help="cells of each grid timed with transformer_lens.patching")
    parser.add_argument("--rounds", type=int, help="interleaved rounds: lenskit's grid, then a share of TL's cells")
    add_threads_argument(parser)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args)
    if args.worker:
        name, *sizes = args.worker
        print(json.dumps(memory_worker(name if name != "-" else "", *map(int, sizes))))
        return

    n_layers, batch, n_pos = (2, 4, 14) if args.quick else (None, 8, 15)
    if args.model:
        n_layers = None  # a real model runs whole
    tl_cells = args.tl_cells or (2 if args.quick else 6)
    model = load_model(args.model) if args.model else gpt2_small(n_layers)
    label, layers = describe(model, args.model), model.cfg.n_layers
    rounds = args.rounds or (1 if args.quick else 3)
    # the row without a target (the worst case, every cell run) gets one round: at real scale it is the longest
    speed = [speed_row(model, *grid, batch, n_pos, tl_cells, rounds if grid[-1] else 1) for grid in SPEED_GRIDS]
    del model
    worker_args = worker_flags(args, model=False)
    memory = in_subprocess(
        __file__, args.model or "-", n_layers or 0, *((2, 16) if args.quick else (8, 64)), *worker_args
    )
    if args.skip_attribution:
        attribution, prompts = [], {"skipped": "--skip-attribution"}
    else:
        try:
            zoo_model = lenskit.load(args.zoo)
        except (ValueError, FileNotFoundError, OSError) as error:
            attribution, prompts = [], {"skipped": f"zoo model {args.zoo!r} could not be loaded: {error}"}
        else:
            attribution, prompts = attribution_rows(zoo_model, 4 if args.quick else 8)

    print(f"{label}; CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"\n(a) {speed[0]['batch']} prompt pairs x {speed[0]['pos']} tokens: {speed[0]['prompts']}")
    print(
        f"  metric logit(IO) - logit(S): clean {speed[0]['clean_value']:.2f}, corrupted {speed[0]['corrupted_value']:.2f}"
    )
    print(
        f"  transformer_lens.patching (get_act_patch_resid_pre, get_act_patch_attn_head_out_by_pos) timed on "
        f"{tl_cells} sampled cells per grid and extrapolated to the full grid (+ its clean run_with_cache); "
        f"interleaved with lenskit's full grid ({rounds} rounds, median; 1 for the last row)"
    )
    print(
        f"  {'grid':<36} {'cells':>6} {'lenskit CPU s':>14} {'TL CPU s':>10} {'speed-up':>9} "
        f"{'lenskit wall s':>15} {'TL wall s':>10} {'wall speed-up':>14} {'max |diff|':>11}  target"
    )
    for row in speed:
        target = (
            "-"
            if row["target_speedup"] is None
            else f">= {row['target_speedup']}x: {'met' if row['target_met'] else 'MISSED'}"
        )
        print(
            f"  {row['grid']:<36} {row['cells']:>6} {row['lenskit_cpu_s']:>14.1f} {row['tl_cpu_s_grid']:>10.1f} "
            f"{row['speedup_cpu']:>8.1f}x {row['lenskit_wall_s']:>15.1f} {row['tl_wall_s_grid']:>10.1f} "
            f"{row['speedup_wall']:>13.1f}x {row['max_abs_diff']:>11.1e}  {target}"
        )
    print(
        f"\n(b) z by (layer, head, pos), {memory['batch']} pairs x {memory['pos']} tokens, position 0, heads 0-1: "
        f"peak RSS {memory['peak_rss_mb']:.0f} MB (model loaded: {memory['rss_with_model_mb']:.0f} MB; loading peaked "
        f"at {memory['model_load_peak_rss_mb']:.0f} MB); target < {MEMORY_TARGET_MB} MB: "
        f"{'met' if memory['target_met'] else 'MISSED'}"
    )
    print(f"\n(c) attribution vs exact patching, zoo model {args.zoo!r}")
    if not attribution:
        print(f"  {prompts['skipped']}")
    else:
        print(
            f"  {prompts['n_prompts']} IOI prompts x {prompts['n_pos']} tokens, e.g. {prompts['example']!r}; "
            f"logit diff clean {prompts['clean_logit_diff']:.2f}, corrupted {prompts['corrupted_logit_diff']:.2f}"
        )
        print(
            f"  {'site':<9} {'by':<15} {'cells':>6} {'Pearson r':>10} {'exact CPU s':>12} {'attribution CPU s':>18} {'speed-up':>9}"
        )
        for row in attribution:
            print(
                f"  {row['site']:<9} {row['by']:<15} {row['cells']:>6} {row['pearson_r']:>10.3f} "
                f"{row['exact_cpu_s']:>12.2f} {row['attribution_cpu_s']:>18.2f} {row['speedup']:>8.1f}x"
            )

    results = write_results(
        "patching",
        args.model,
        {
            "quick": args.quick,
            "model": args.model or GPT2_SMALL,
            "model_description": label,
            "n_layers": layers,
            "batch": batch,
            "pos": n_pos,
            "speed": speed,
            "memory": memory,
            "zoo": args.zoo,
            "attribution_prompts": prompts,
            "attribution": attribution,
        },
    )
    print(f"\nwrote {results}")


if __name__ == "__main__":
    main()
