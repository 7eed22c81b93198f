"""Benchmark lenskit.flow against the reference method, CPU: a GPT-2-small-shaped model with random weights
(default) or any lenskit.load model (--model smollm2-135m: prompts are English text, not random tokens).

lenskit.flow builds the full graph (every layer, every target position) and its DataFrame. It is
timed against one forward pass with a full cache (TransformerLens run_with_cache) and against
the reference method: the LM Transparency Tool's own code path (facebookresearch/llm-transparency-tool:
models/tlens_model.py decomposed_attn, routes/contributions.py, routes/graph.py build_full_graph
and build_paths_to_predictions for every token), re-implemented in tests/reference/flow.py because
the tool cannot be installed offline. The reference method is kept as the tool has it, including
what lenskit does differently: it adds b_V to hook_v, which holds it already, drops b_O, and
materialises the [pos, pos, head, d_model] parts of each layer.

All in one process, interleaved: median wall and CPU time over repeats (CPU time, over all
threads, is steadier on a shared machine), and ratios to the forward pass. Target: the full
graph at 128 tokens within 2x the forward pass with cache (CPU time). Then, each in a fresh
subprocess, peak memory above the forward pass's (peak RSS, /proc VmHWM reset through clear_refs)
for growing lengths: lenskit's should grow no faster than T^2 * heads per layer. Last, accuracy:
how far each method's attention parts are from summing to resid_mid, and the largest difference
between lenskit's shares and the dense float64 definition.

    python benchmarks/bench_flow.py            # 64 and 128 tokens; memory at 128, 256, 512 (the tool's: 64, 128)
    python benchmarks/bench_flow.py --model smollm2-135m --threads 1
    python benchmarks/bench_flow.py --quick    # 16 and 32 tokens, one repeat

Prints a table and writes benchmarks/results/bench_flow.json (bench_flow_<model>.json with --model).
"""

import argparse
import json

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
    medians,
    prompt_tokens,
    reset_peak_rss,
    rss_mb,
    set_threads,
    worker_flags,
    write_results,
)
from reference.flow import proximity, tool_decomposed_attn, tool_graph
from transformer_lens import HookedTransformer

from lenskit.flow import flow

THRESHOLD = 0.04
TARGET_RATIO, TARGET_POS = 2.0, 128


# --- the model and accuracy --------------------------------------------------------------------


def get_model(name: str | None) -> HookedTransformer:
    return load_model(name) if name else random_biases(gpt2_small())


def random_biases(model: HookedTransformer) -> HookedTransformer:
    """`model` with random biases (TransformerLens starts them at 0), so that what each method does with
    b_V and b_O shows in the accuracy table."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return model


def accuracy(model: HookedTransformer, tokens: torch.Tensor) -> dict[str, float]:
    """Parts-sum errors of both methods, and lenskit's shares against the dense float64 definition."""
    graph = flow(model, tokens, threshold=0.0, renormalize=False, progress=False)
    _, cache = model.run_with_cache(tokens)
    last = tokens.shape[1] - 1
    lenskit_error = max(
        (graph.decompose(layer, pos, "resid_mid").parts.tensor.sum(0) - cache[f"blocks.{layer}.hook_resid_mid"][0, pos])
        .abs()
        .max()
        .item()
        for layer in range(model.cfg.n_layers)
        for pos in (0, last)
    )
    tool_error = max(
        (
            tool_decomposed_attn(model, cache, 0, layer).sum((1, 2))
            + cache[f"blocks.{layer}.hook_resid_pre"][0]
            - cache[f"blocks.{layer}.hook_resid_mid"][0]
        )
        .abs()
        .max()
        .item()
        for layer in range(model.cfg.n_layers)
    )
    share_error = 0.0
    for layer in (0, model.cfg.n_layers // 2, model.cfg.n_layers - 1):
        parts = graph.decompose(layer, last, "resid_mid")
        dense = parts.parts.tensor.double()
        whole = cache[f"blocks.{layer}.hook_resid_mid"][0, last].double()
        prox = proximity(dense, whole)
        expected = (prox / prox.sum())[1:].reshape(last + 1, -1)
        share_error = max(
            share_error, (graph.head_shares[layer, last, : last + 1].double() - expected).abs().max().item()
        )
    return {
        "lenskit_parts_sum_error": lenskit_error,
        "tool_parts_sum_error": tool_error,
        "lenskit_share_error_vs_float64": share_error,
    }


# --- memory, in fresh subprocesses ----------------------------------------------------------------


def memory_worker(method: str, n_pos: int, model_name: str | None) -> dict:
    """Peak RSS of one flow (or reference) run above that of a forward pass with full cache."""
    model = get_model(model_name)
    tokens = prompt_tokens(model, n_pos, 0)
    peaks = {}
    with torch.inference_mode():
        model.run_with_cache(tokens)  # warm-up
        for name, run in (
            ("forward_with_cache", lambda: model.run_with_cache(tokens)),
            (
                method,
                lambda: (
                    flow(model, tokens, progress=False).edges
                    if method == "lenskit"
                    else tool_graph(model, tokens, THRESHOLD)
                ),
            ),
        ):
            reset_peak_rss()
            start = rss_mb()
            run()
            peaks[name] = rss_mb("VmHWM") - start
    return {
        "method": method,
        "pos": n_pos,
        "forward_with_cache_peak_above_start_mb": peaks["forward_with_cache"],
        "peak_above_start_mb": peaks[method],
    }


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    add_model_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args)
    if args.worker:
        method, n_pos, name = args.worker
        print(json.dumps(memory_worker(method, int(n_pos), None if name == "-" else name)))
        return

    lengths, repeats = ((16, 32), 1) if args.quick else ((64, 128), 5)
    memory_lengths = (16, 32, 64) if args.quick else (128, 256, 512)
    model = get_model(args.model)
    label = describe(model, args.model)
    cfg = {
        key: getattr(model.cfg, key)
        for key in ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp", "d_vocab")
    }
    rows = []
    for n_pos in lengths:
        tokens = prompt_tokens(model, n_pos, n_pos)
        times = interleaved(
            {
                "forward with cache (TL run_with_cache)": lambda: model.run_with_cache(tokens),
                "lenskit.flow, full graph + edges": lambda: flow(model, tokens, progress=False).edges,
                "reference method (the tool's code)": lambda: tool_graph(model, tokens, THRESHOLD),
            },
            {
                "forward with cache (TL run_with_cache)": repeats,
                "lenskit.flow, full graph + edges": repeats,
                "reference method (the tool's code)": max(1, repeats // 2),
            },
            inference=True,
        )
        middle = medians(times)
        forward = middle["forward with cache (TL run_with_cache)"]
        rows.append(
            {
                "pos": n_pos,
                "times": times,
                "medians": middle,
                "ratios": {name: {clock: m[clock] / forward[clock] for clock in m} for name, m in middle.items()},
                "accuracy": accuracy(model, tokens),
            }
        )
    model = None  # free it before the memory workers (the lambdas above are done with it)
    worker = [args.model or "-", *worker_flags(args, model=False)]
    memory = [in_subprocess(__file__, "lenskit", n_pos, *worker) for n_pos in memory_lengths]
    memory += [
        in_subprocess(__file__, "reference", n_pos, *worker) for n_pos in lengths
    ]  # [pos, pos, head, d_model] per layer

    print(f"{label}; CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print("prompts: " + ("random token ids" if args.model is None else "English text (common.TEXT)"))
    print(
        f"\n(a) time, 1 prompt, threshold {THRESHOLD}, median of interleaved repeats; ratio = time / forward with cache"
    )
    print(f"  {'tokens':>6}  {'method':<40} {'wall s':>8} {'ratio':>6} {'cpu s':>8} {'ratio':>6}")
    for row in rows:
        for name, median in row["medians"].items():
            ratio = row["ratios"][name]
            print(
                f"  {row['pos']:>6}  {name:<40} {median['wall']:>8.3f} {ratio['wall']:>6.2f} {median['cpu']:>8.3f} {ratio['cpu']:>6.2f}"
            )
        if row["pos"] == TARGET_POS:
            ratio = row["ratios"]["lenskit.flow, full graph + edges"]["cpu"]
            row["target"] = {"ratio_cpu": ratio, "max_ratio": TARGET_RATIO, "met": ratio <= TARGET_RATIO}
            print(
                f"  target: lenskit.flow at {TARGET_POS} tokens within {TARGET_RATIO:g}x the forward with cache (CPU): "
                f"{ratio:.2f}x, {'met' if ratio <= TARGET_RATIO else 'MISSED'}"
            )
    print(
        "\n(b) peak memory above the starting point (MB), fresh subprocess each; scale = T^2 * heads * layers * 4 bytes"
    )
    scale = lambda n: n * n * cfg["n_heads"] * cfg["n_layers"] * 4 / 2**20  # noqa: E731
    print(
        f"  {'method':<9} {'tokens':>6} {'peak MB':>8} {'fwd+cache MB':>13} {'scale MB':>9} {'peak / scale':>12} "
        f"{'T^2*heads*d_model*4B MB':>24}"
    )
    for m in memory:
        print(
            f"  {m['method']:<9} {m['pos']:>6} {m['peak_above_start_mb']:>8.1f} {m['forward_with_cache_peak_above_start_mb']:>13.1f}"
            f" {scale(m['pos']):>9.1f} {m['peak_above_start_mb'] / scale(m['pos']):>12.2f}"
            f" {scale(m['pos']) / cfg['n_layers'] * cfg['d_model']:>24.1f}"
        )
    print("  (peak / scale flat or falling with T: memory grows no faster than T^2 * heads per layer)")
    print("\n(c) accuracy: max |sum of attention parts + resid_pre - resid_mid| (exact: float32 rounding only)")
    for row in rows:
        acc = row["accuracy"]
        print(
            f"  {row['pos']:>6} tokens: lenskit {acc['lenskit_parts_sum_error']:.2e}, reference method "
            f"{acc['tool_parts_sum_error']:.2e} (b_V twice, no b_O); lenskit shares vs float64 definition "
            f"{acc['lenskit_share_error_vs_float64']:.2e}"
        )

    results = write_results(
        "flow",
        args.model,
        {
            "quick": args.quick,
            "model": args.model or GPT2_SMALL,
            "model_description": label,
            "shape": cfg,
            "threshold": THRESHOLD,
            "repeats": repeats,
            "timing": rows,
            "memory": memory,
        },
    )
    print(f"\nwrote {results}")


if __name__ == "__main__":
    main()
