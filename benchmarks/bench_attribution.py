"""Benchmark lenskit.attribute against the TransformerLens way, on a GPT-2-small-shaped model (random weights, CPU).

(a) Per-neuron decomposition of a logit difference for all layers at one position of 1 x 128 tokens:
    lenskit.attribute(by="neuron") against ActivationCache.get_full_resid_decomposition(expand_neurons=True,
    pos_slice=pos) + logit_attrs, timed interleaved in one run (median of repeats), after checking both give
    the same numbers (on weight-processed weights, where TL's logit_attrs is exact). Two rows: from an
    ActivationCache already at hand (the decomposition itself), and end to end from tokens (TL's
    run_with_cache against lenskit's own forward pass, which caches only what it reads and unembeds only
    the two answer columns at the one position).
(b) The logit lens over all layers and positions against a naive full-vocabulary projection
    (benchmarks/bench_lens.py's lens_benchmark: time and peak memory).

    python benchmarks/bench_attribution.py            # 1 x 128 tokens
    python benchmarks/bench_attribution.py --quick    # smoke run

Prints a table and writes benchmarks/results/bench_attribution.json.
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
from bench_lens import lens_benchmark  # noqa: E402

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")

RESULTS = Path(__file__).parent / "results" / "bench_attribution.json"
GPT2_SMALL = json.loads((Path(__file__).parent / "gpt2_small_shape.json").read_text())
ANSWER, WRONG, POS = 1000, 2000, -1


def transformer_lens_neurons(model: HookedTransformer, tokens: torch.Tensor, cache=None) -> dict[str, float]:
    """The TransformerLens way: full residual decomposition with neurons expanded, then logit_attrs."""
    if cache is None:
        _, cache = model.run_with_cache(tokens)
    stack, labels = cache.get_full_resid_decomposition(expand_neurons=True, pos_slice=POS, return_labels=True)
    attrs = cache.logit_attrs(stack, tokens=ANSWER, incorrect_tokens=WRONG, pos_slice=POS)[:, 0]
    return dict(zip(labels, attrs.tolist()))


def lenskit_neurons(model: HookedTransformer, tokens: torch.Tensor, cache=None):
    return attribute(model, tokens, ANSWER, WRONG, by="neuron", pos=POS, cache=cache)


def check_same_numbers(model: HookedTransformer, tokens: torch.Tensor) -> float:
    """Largest |difference| between the two ways over every neuron."""
    reference = transformer_lens_neurons(model, tokens)
    neurons = lenskit_neurons(model, tokens).query("component == 'neuron'")
    return max(abs(row.value - reference[f"L{row.layer}N{row.neuron}"]) for row in neurons.itertuples())


def time_interleaved(functions: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, interleaved over `repeats` rounds after a warm-up."""
    times = {name: [] for name in functions}
    for round_ in range(repeats + 1):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a 2-layer model")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    config = GPT2_SMALL | ({"n_layers": 2} if args.quick else {})
    model = HookedTransformer(HookedTransformerConfig(**config)).eval()
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=False)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 128), generator=torch.Generator().manual_seed(0))

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
    lens_rows = lens_benchmark(model, tokens)

    print(f"per-neuron logit-difference decomposition, {config['n_layers']} layers x {config['d_mlp']} neurons, "
          f"1 x 128 tokens, CPU, {torch.get_num_threads()} threads")
    print(f"{'':<14}{'TransformerLens s':>19}{'lenskit s':>11}{'speed-up':>10}")
    for case, times in seconds.items():
        times["speedup"] = times["transformer_lens"] / times["lenskit"]
        print(f"{case:<14}{times['transformer_lens']:>19.4f}{times['lenskit']:>11.4f}{times['speedup']:>9.1f}x")
    print(f"max |lenskit - TL| over neurons: {max_difference:.2e}")
    print("\nlogit lens over all layers and positions")
    print(json.dumps(lens_rows, indent=1))

    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": platform.platform(), "torch_threads": torch.get_num_threads(), "config": config,
        "neuron_decomposition_seconds": seconds, "max_abs_difference": max_difference,
        "logit_lens": lens_rows,
    }, indent=1))


if __name__ == "__main__":
    main()
