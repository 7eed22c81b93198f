"""Benchmark lenskit.flow against the reference method, CPU: a GPT-2-small-shaped model with random weights
(default) or any lenskit.load model (--model smollm2-135m: prompts are English text, not random tokens).

lenskit.flow builds the full graph (every layer, every target position) and its DataFrame. It is
timed against one forward pass with a full cache (TransformerLens run_with_cache) and against
the reference method: the LM Transparency Tool's own code path (facebookresearch/llm-transparency-tool:
models/tlens_model.py decomposed_attn, routes/contributions.py, routes/graph.py build_full_graph
and build_paths_to_predictions for every token), re-implemented below because the tool cannot be
installed offline. The reference method is kept as the tool has it, including what lenskit does
differently: it adds b_V to hook_v, which holds it already, drops b_O, and materialises the
[pos, pos, head, d_model] parts of each layer.

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
import platform
import statistics
import time
import warnings
from pathlib import Path

import networkx as nx
import torch
from transformer_lens import ActivationCache, HookedTransformer, HookedTransformerConfig

from bench_cache import GPT2_SMALL, add_model_argument, describe, in_subprocess, load_model, prompt_tokens, reset_peak_rss, \
    rss_mb
from lenskit.flow import flow

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")

RESULTS = Path(__file__).parent / "results" / "bench_flow.json"
THRESHOLD = 0.04
TARGET_RATIO, TARGET_POS = 2.0, 128


# --- the reference method: the LM Transparency Tool's code path -------------------------------------


def reference_decomposed_attn(model: HookedTransformer, cache: ActivationCache, batch_i: int, layer: int) -> torch.Tensor:
    """[pos, key_pos, head, d_model] as the tool's decomposed_attn: hook_v + b_V (b_V twice), no b_O."""
    hook_v = cache[f"blocks.{layer}.attn.hook_v"][batch_i]
    b_v = model.blocks[layer].attn.b_V
    hook_v = hook_v.repeat_interleave(b_v.shape[-2] // hook_v.shape[-2], dim=-2)
    v = hook_v + b_v
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][batch_i].to(v.dtype)
    z = torch.einsum("khd,hqk->qkhd", v, pattern)
    return torch.einsum("qkhd,hdm->qkhm", z, model.blocks[layer].attn.W_O)


def reference_contributions(parts: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The tool's get_contributions: proximity clipped at 1e-5 (not 0), normalised over the part dims."""
    k = parts.ndim - whole.ndim
    distance = torch.nn.functional.pairwise_distance(parts, whole.expand(parts.shape), p=1)
    distance = (whole.norm(p=1, dim=-1) - distance).clip(min=1e-5)
    return distance / distance.sum(dim=tuple(range(k)), keepdim=True)


def reference_threshold(threshold: float, c_blocks: torch.Tensor, c_residual: torch.Tensor):
    """The tool's apply_threshold_and_renormalize: per head and source part, before summing heads."""
    c_blocks = c_blocks * (c_blocks > threshold)
    c_residual = c_residual * (c_residual > threshold)
    denom = c_residual + c_blocks.sum(dim=tuple(range(c_residual.ndim, c_blocks.ndim)))
    return c_blocks / denom.reshape(denom.shape + (1,) * (c_blocks.ndim - c_residual.ndim)), c_residual / denom


def reference_graph(model: HookedTransformer, tokens: torch.Tensor, threshold: float = THRESHOLD) -> list[nx.DiGraph]:
    """The tool's run, build_full_graph and build_paths_to_predictions (every token), batch index 0."""
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(tokens)
    finally:
        model.set_use_attn_result(False)
    n_layers, n_tokens = model.cfg.n_layers, tokens.shape[1]
    graph = nx.DiGraph()

    def add(u, v, w):  # the tool sums the self-attention and residual edges into one
        if graph.has_edge(u, v):
            graph[u][v]["weight"] += w
        else:
            graph.add_edge(u, v, weight=w)

    for layer in range(n_layers):
        resid_pre, resid_mid = cache[f"blocks.{layer}.hook_resid_pre"][0], cache[f"blocks.{layer}.hook_resid_mid"][0]
        parts = reference_decomposed_attn(model, cache, 0, layer).permute(1, 2, 0, 3)  # [key_pos, head, pos, d]
        flat = torch.cat([parts.flatten(0, 1), resid_pre[None]])
        contributions = reference_contributions(flat, resid_mid)
        c_attn = contributions[:-1].unflatten(0, parts.shape[:2]).permute(2, 0, 1)[None]  # [1, pos, key_pos, head]
        c_attn, c_resid = reference_threshold(threshold, c_attn, contributions[-1][None])
        source = (lambda t: f"I{layer - 1}_{t}") if layer else (lambda t: f"X0_{t}")
        for token_from in range(n_tokens):
            for token_to in range(n_tokens):
                add(source(token_from), f"A{layer}_{token_to}", c_attn[0, token_to, token_from].sum().item())
        for token in range(n_tokens):
            add(source(token), f"A{layer}_{token}", c_resid[0, token].item())
        mlp_out, resid_post = cache[f"blocks.{layer}.hook_mlp_out"][0], cache[f"blocks.{layer}.hook_resid_post"][0]
        c_ffn, c_resid_ffn = reference_contributions(torch.stack((mlp_out, resid_mid)), resid_post)
        c_ffn, c_resid_ffn = reference_threshold(threshold, c_ffn[None], c_resid_ffn[None])
        for token in range(n_tokens):
            add(f"A{layer}_{token}", f"M{layer}_{token}", c_ffn[0, token].item())
            add(f"M{layer}_{token}", f"I{layer}_{token}", c_ffn[0, token].item())
            add(f"A{layer}_{token}", f"I{layer}_{token}", c_resid_ffn[0, token].item())
    reverse = graph.reverse()
    search = nx.subgraph_view(reverse, filter_edge=lambda u, v: reverse[u][v]["weight"] > threshold)
    return [search.edge_subgraph(nx.edge_dfs(search, source=f"I{n_layers - 1}_{start}")).reverse()
            for start in range(n_tokens)]


# --- timing ------------------------------------------------------------------------------------


def get_model(name: str | None) -> HookedTransformer:
    return load_model(name) if name else gpt2_small()


def gpt2_small() -> HookedTransformer:
    """GPT-2-small shape, random weights; biases random too (TransformerLens starts them at 0),
    so that what each method does with b_V and b_O shows in the accuracy table."""
    model = HookedTransformer(HookedTransformerConfig(**GPT2_SMALL)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return model


def time_variants(variants: dict, repeats: dict) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per call of each variant, interleaved, after one warm-up call each."""
    times = {name: {"wall": [], "cpu": []} for name in variants}
    with torch.inference_mode():
        for round_ in range(max(repeats.values()) + 1):
            for name, run in variants.items():
                if round_ > repeats[name]:
                    continue
                wall, cpu = time.perf_counter(), time.process_time()
                run()
                if round_:
                    times[name]["wall"].append(time.perf_counter() - wall)
                    times[name]["cpu"].append(time.process_time() - cpu)
    return times


def accuracy(model: HookedTransformer, tokens: torch.Tensor) -> dict[str, float]:
    """Parts-sum errors of both methods, and lenskit's shares against the dense float64 definition."""
    graph = flow(model, tokens, threshold=0.0, renormalize=False, progress=False)
    _, cache = model.run_with_cache(tokens)
    last = tokens.shape[1] - 1
    lenskit_error = max((graph.decompose(layer, pos, "resid_mid").parts.tensor.sum(0)
                         - cache[f"blocks.{layer}.hook_resid_mid"][0, pos]).abs().max().item()
                        for layer in range(model.cfg.n_layers) for pos in (0, last))
    tool_error = max((reference_decomposed_attn(model, cache, 0, layer).sum((1, 2)) + cache[f"blocks.{layer}.hook_resid_pre"][0]
                      - cache[f"blocks.{layer}.hook_resid_mid"][0]).abs().max().item() for layer in range(model.cfg.n_layers))
    share_error = 0.0
    for layer in (0, model.cfg.n_layers // 2, model.cfg.n_layers - 1):
        parts = graph.decompose(layer, last, "resid_mid")
        dense = parts.parts.tensor.double()
        whole = cache[f"blocks.{layer}.hook_resid_mid"][0, last].double()
        prox = (whole.abs().sum() - (whole - dense).abs().sum(-1)).clamp(min=0)
        expected = (prox / prox.sum())[1:].reshape(last + 1, -1)
        share_error = max(share_error, (graph.head_shares[layer, last, :last + 1].double() - expected).abs().max().item())
    return {"lenskit_parts_sum_error": lenskit_error, "tool_parts_sum_error": tool_error,
            "lenskit_share_error_vs_float64": share_error}


# --- memory, in fresh subprocesses ----------------------------------------------------------------


def memory_worker(method: str, n_pos: int, model_name: str | None) -> dict:
    """Peak RSS of one flow (or reference) run above that of a forward pass with full cache."""
    model = get_model(model_name)
    tokens = prompt_tokens(model, n_pos, 0)
    peaks = {}
    with torch.inference_mode():
        model.run_with_cache(tokens)  # warm-up
        for name, run in (("forward_with_cache", lambda: model.run_with_cache(tokens)),
                          (method, lambda: flow(model, tokens, progress=False).edges if method == "lenskit"
                           else reference_graph(model, tokens))):
            reset_peak_rss()
            start = rss_mb()
            run()
            peaks[name] = rss_mb("VmHWM") - start
    return {"method": method, "pos": n_pos, "forward_with_cache_peak_above_start_mb": peaks["forward_with_cache"],
            "peak_above_start_mb": peaks[method]}


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    add_model_argument(parser)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        method, n_pos, name = args.worker
        print(json.dumps(memory_worker(method, int(n_pos), None if name == "-" else name)))
        return

    lengths, repeats = ((16, 32), 1) if args.quick else ((64, 128), 5)
    memory_lengths = (16, 32, 64) if args.quick else (128, 256, 512)
    model = get_model(args.model)
    label = describe(model, args.model)
    cfg = {key: getattr(model.cfg, key) for key in ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp", "d_vocab")}
    rows = []
    for n_pos in lengths:
        tokens = prompt_tokens(model, n_pos, n_pos)
        times = time_variants({
            "forward with cache (TL run_with_cache)": lambda: model.run_with_cache(tokens),
            "lenskit.flow, full graph + edges": lambda: flow(model, tokens, progress=False).edges,
            "reference method (the tool's code)": lambda: reference_graph(model, tokens),
        }, {"forward with cache (TL run_with_cache)": repeats, "lenskit.flow, full graph + edges": repeats,
            "reference method (the tool's code)": max(1, repeats // 2)})
        medians = {name: {clock: statistics.median(values) for clock, values in runs.items()} for name, runs in times.items()}
        forward = medians["forward with cache (TL run_with_cache)"]
        rows.append({"pos": n_pos, "times": times, "medians": medians,
                     "ratios": {name: {clock: m[clock] / forward[clock] for clock in m} for name, m in medians.items()},
                     "accuracy": accuracy(model, tokens)})
    del model
    worker = [args.model or "-", *(["--threads", str(args.threads)] if args.threads else [])]
    memory = [in_subprocess(__file__, "lenskit", n_pos, *worker) for n_pos in memory_lengths]
    memory += [in_subprocess(__file__, "reference", n_pos, *worker) for n_pos in lengths]  # [pos, pos, head, d_model] per layer

    print(f"{label}; CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print("prompts: " + ("random token ids" if args.model is None else "English text (bench_cache.TEXT)"))
    print(f"\n(a) time, 1 prompt, threshold {THRESHOLD}, median of interleaved repeats; ratio = time / forward with cache")
    print(f"  {'tokens':>6}  {'method':<40} {'wall s':>8} {'ratio':>6} {'cpu s':>8} {'ratio':>6}")
    for row in rows:
        for name, median in row["medians"].items():
            ratio = row["ratios"][name]
            print(f"  {row['pos']:>6}  {name:<40} {median['wall']:>8.3f} {ratio['wall']:>6.2f} {median['cpu']:>8.3f} {ratio['cpu']:>6.2f}")
        if row["pos"] == TARGET_POS:
            ratio = row["ratios"]["lenskit.flow, full graph + edges"]["cpu"]
            row["target"] = {"ratio_cpu": ratio, "max_ratio": TARGET_RATIO, "met": ratio <= TARGET_RATIO}
            print(f"  target: lenskit.flow at {TARGET_POS} tokens within {TARGET_RATIO:g}x the forward with cache (CPU): "
                  f"{ratio:.2f}x, {'met' if ratio <= TARGET_RATIO else 'MISSED'}")
    print("\n(b) peak memory above the starting point (MB), fresh subprocess each; scale = T^2 * heads * layers * 4 bytes")
    scale = lambda n: n * n * cfg["n_heads"] * cfg["n_layers"] * 4 / 2**20  # noqa: E731
    print(f"  {'method':<9} {'tokens':>6} {'peak MB':>8} {'fwd+cache MB':>13} {'scale MB':>9} {'peak / scale':>12} "
          f"{'T^2*heads*d_model*4B MB':>24}")
    for m in memory:
        print(f"  {m['method']:<9} {m['pos']:>6} {m['peak_above_start_mb']:>8.1f} {m['forward_with_cache_peak_above_start_mb']:>13.1f}"
              f" {scale(m['pos']):>9.1f} {m['peak_above_start_mb'] / scale(m['pos']):>12.2f}"
              f" {scale(m['pos']) / cfg['n_layers'] * cfg['d_model']:>24.1f}")
    print("  (peak / scale flat or falling with T: memory grows no faster than T^2 * heads per layer)")
    print("\n(c) accuracy: max |sum of attention parts + resid_pre - resid_mid| (exact: float32 rounding only)")
    for row in rows:
        acc = row["accuracy"]
        print(f"  {row['pos']:>6} tokens: lenskit {acc['lenskit_parts_sum_error']:.2e}, reference method "
              f"{acc['tool_parts_sum_error']:.2e} (b_V twice, no b_O); lenskit shares vs float64 definition "
              f"{acc['lenskit_share_error_vs_float64']:.2e}")

    results = RESULTS.with_name(f"bench_flow_{Path(args.model).name}.json") if args.model else RESULTS
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({
        "quick": args.quick, "machine": platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model": args.model or GPT2_SMALL, "model_description": label, "shape": cfg,
        "threshold": THRESHOLD, "repeats": repeats, "timing": rows, "memory": memory,
    }, indent=1))
    print(f"\nwrote {results}")


if __name__ == "__main__":
    main()
