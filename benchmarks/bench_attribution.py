"""Benchmark lenskit.attribute against the TransformerLens way, CPU: a GPT-2-small-shaped model with random
weights (default) or any lenskit.load model (--model smollm2-135m, on English text).

(a) Per-neuron decomposition of a logit difference for all layers at one position of 1 x 128 tokens:
    lenskit.attribute(by="neuron") against TransformerLens' way: ActivationCache.stack_neuron_results
    (every layer, pos_slice=pos), apply_ln_to_stack (the final norm's scale) and the dot product with
    the logit-difference direction (model.tokens_to_residual_directions), timed interleaved in one run
    (median of repeats), after checking both give the same numbers (on weight-processed weights, where
    apply_ln_to_stack is exact; lenskit.load's real models come processed). Two rows: from an
    ActivationCache already at hand (the decomposition itself), and end to end from tokens (TL's
    run_with_cache against lenskit's own forward pass, which caches only what it reads and unembeds only
    the two answer columns at the one position). Target: lenskit at least 5x faster. End to end, both
    sides run the model over every position (the answer position's attention reads them all), so the
    ratio there cannot pass (forward + unembedding + TL's decomposition) / forward: about 2x on
    smollm2-135m and 2.6x on the GPT-2 shape at 128 tokens.
(b) The logit lens over all layers and positions against a naive full-vocabulary projection
    (benchmarks/bench_lens.py's lens_benchmark: time and peak memory).

    python benchmarks/bench_attribution.py                       # 1 x 128 tokens
    python benchmarks/bench_attribution.py --model smollm2-135m  # a real model
    python benchmarks/bench_attribution.py --quick               # smoke run

Prints a table and writes benchmarks/results/bench_attribution.json (bench_attribution_<model>.json with --model).
"""

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lenskit.attribution import attribute

sys.path.insert(0, str(Path(__file__).parent))
from bench_cache import add_model_argument, describe, load_model, prompt_tokens  # noqa: E402
from bench_lens import lens_benchmark  # noqa: E402

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")

RESULTS = Path(__file__).parent / "results" / "bench_attribution.json"
GPT2_SMALL = json.loads((Path(__file__).parent / "gpt2_small_shape.json").read_text())
ANSWER, WRONG, POS = 1000, 2000, -1  # token ids (" Mary" and " John" for a model with a tokenizer)
TARGET_SPEEDUP = 5.0


def transformer_lens_neurons(model: HookedTransformer, tokens: torch.Tensor, cache=None) -> dict[str, float]:
    """The TransformerLens way: every neuron's output at POS (stack_neuron_results), scaled by the final norm
    (apply_ln_to_stack), dotted with the logit-difference direction."""
    if cache is None:
        _, cache = model.run_with_cache(tokens)
    stack, labels = cache.stack_neuron_results(model.cfg.n_layers, pos_slice=POS, return_labels=True)
    stack = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=POS)
    direction = model.tokens_to_residual_directions(ANSWER) - model.tokens_to_residual_directions(WRONG)
    attrs = (stack * direction).sum(-1)[:, 0]
    return dict(zip(labels, attrs.tolist()))


def lenskit_neurons(model: HookedTransformer, tokens: torch.Tensor, cache=None):
    return attribute(model, tokens, ANSWER, WRONG, by="neuron", pos=POS, cache=cache)


def check_same_numbers(model: HookedTransformer, tokens: torch.Tensor) -> float:
    """Largest |difference| between the two ways over every neuron."""
    reference = transformer_lens_neurons(model, tokens)
    neurons = lenskit_neurons(model, tokens).query("component == 'neuron'")
    return max(abs(row.value - reference[f"L{row.layer}N{row.neuron}"]) for row in neurons.itertuples())


def time_interleaved(functions: dict, repeats: int) -> dict[str, float]:
    """Median CPU seconds (this process, all threads: steadier than wall time on a shared machine) per call
    of each function, and its median wall seconds under "<name> wall", interleaved over `repeats` rounds
    after a warm-up."""
    times = {name: [] for name in functions}
    walls = {name: [] for name in functions}
    for round_ in range(repeats + 1):
        for name, function in functions.items():
            cpu, wall = time.process_time(), time.perf_counter()
            function()
            if round_:
                times[name].append(time.process_time() - cpu)
                walls[name].append(time.perf_counter() - wall)
    return {**{name: statistics.median(values) for name, values in times.items()},
            **{f"{name} wall": statistics.median(values) for name, values in walls.items()}}


def main() -> None:
    global ANSWER, WRONG
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a 2-layer model (default model only)")
    add_model_argument(parser)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.model:
        model = load_model(args.model)
        config = {key: getattr(model.cfg, key) for key in ("n_layers", "d_model", "n_heads", "d_mlp", "d_vocab")}
        if model.tokenizer is not None:
            ANSWER, WRONG = model.to_single_token(" Mary"), model.to_single_token(" John")
    else:
        config = GPT2_SMALL | ({"n_layers": 2} if args.quick else {})
        model = HookedTransformer(HookedTransformerConfig(**config)).eval()
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=False)
    tokens = prompt_tokens(model, 128, 0)
    label = describe(model, args.model)

    max_difference = check_same_numbers(model, tokens)
    _, cache = model.run_with_cache(tokens)
    repeats = 2 if args.quick else 5
    seconds = {
        "from a cache": time_interleaved({
            "transformer_lens": lambda: transformer_lens_neurons(model, tokens, cache),
            "lenskit": lambda: lenskit_neurons(model, tokens, cache),
        }, repeats),
        "end to end": time_interleaved({
            "transformer_lens": lambda: transformer_lens_neurons(model, tokens),
            "lenskit": lambda: lenskit_neurons(model, tokens),
        }, repeats),
    }
    del cache
    lens_rows = lens_benchmark(model, tokens)

    print(f"{label}; CPU, {torch.get_num_threads()} threads")
    print(f"per-neuron logit-difference decomposition, {config['n_layers']} layers x {config['d_mlp']} neurons, "
          f"1 x 128 tokens ({'random ids' if model.tokenizer is None else 'English text'}), "
          f"answer {ANSWER} vs {WRONG}; median of {repeats} interleaved repeats")
    print("TransformerLens: stack_neuron_results + apply_ln_to_stack + logit-difference direction")
    print(f"{'':<14}{'TL CPU s':>10}{'lenskit CPU s':>15}{'speed-up':>10}{'TL wall s':>11}{'lenskit wall s':>16}"
          f"{'wall speed-up':>15}  target (CPU)")
    for case, times in seconds.items():
        times["speedup"] = times["transformer_lens"] / times["lenskit"]
        times["speedup_wall"] = times["transformer_lens wall"] / times["lenskit wall"]
        times["target_met"] = times["speedup"] >= TARGET_SPEEDUP
        print(f"{case:<14}{times['transformer_lens']:>10.4f}{times['lenskit']:>15.4f}{times['speedup']:>9.1f}x"
              f"{times['transformer_lens wall']:>11.4f}{times['lenskit wall']:>16.4f}{times['speedup_wall']:>14.1f}x"
              f"  >= {TARGET_SPEEDUP:g}x: {'met' if times['target_met'] else 'MISSED'}")
    print(f"max |lenskit - TL| over neurons: {max_difference:.2e}")
    print("\nlogit lens over all layers and positions")
    print(json.dumps(lens_rows, indent=1))

    results = RESULTS.with_name(f"bench_attribution_{Path(args.model).name}.json") if args.model else RESULTS
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({
        "machine": platform.platform(), "torch_threads": torch.get_num_threads(), "model": args.model,
        "model_description": label, "config": config, "answer": ANSWER, "wrong": WRONG,
        "neuron_decomposition_seconds": seconds, "max_abs_difference": max_difference,
        "target_speedup": TARGET_SPEEDUP, "logit_lens": lens_rows,
    }, indent=1))
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
