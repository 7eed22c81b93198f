"""Benchmark lenskit.attribute against the TransformerLens way, CPU: a GPT-2-small-shaped model with random
weights (default) or any lenskit.load model (--model smollm2-135m, on English text).

(a) Per-neuron decomposition of a logit difference for all layers at one position of 1 x 128 tokens:
    lenskit.attribute(by="neuron") against TransformerLens' way (tests/reference/attribution.py):
    ActivationCache.stack_neuron_results (every layer, pos_slice=pos), then logit_attrs: apply_ln_to_stack
    (the final norm's scale) and the dot product with the logit-difference direction
    (model.tokens_to_residual_directions), timed interleaved in one run
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

import torch
from bench_lens import lens_benchmark
from common import (
    GPT2_SMALL,
    add_model_argument,
    add_threads_argument,
    describe,
    gpt2_small,
    interleaved,
    load_model,
    medians,
    prompt_tokens,
    set_threads,
    write_results,
)
from reference.attribution import transformer_lens_neurons
from transformer_lens import HookedTransformer

from lenskit.attribution import attribute

ANSWER, WRONG, POS = 1000, 2000, -1  # token ids (" Mary" and " John" for a model with a tokenizer)
TARGET_SPEEDUP = 5.0


def lenskit_neurons(model: HookedTransformer, tokens: torch.Tensor, cache=None):
    return attribute(model, tokens, ANSWER, WRONG, by="neuron", pos=POS, cache=cache)


def check_same_numbers(model: HookedTransformer, tokens: torch.Tensor) -> float:
    """Largest |difference| between the two ways over every neuron."""
    reference = transformer_lens_neurons(model, tokens, ANSWER, WRONG, POS)
    neurons = lenskit_neurons(model, tokens).query("component == 'neuron'")
    return max(abs(row.value - reference[f"L{row.layer}N{row.neuron}"]) for row in neurons.itertuples())


def time_interleaved(functions: dict, repeats: int) -> dict[str, float]:
    """Median CPU seconds (this process, all threads: steadier than wall time on a shared machine) per call
    of each function, and its median wall seconds under "<name> wall", interleaved over `repeats` rounds
    after a warm-up."""
    middle = medians(interleaved(functions, repeats))
    return {
        **{name: clocks["cpu"] for name, clocks in middle.items()},
        **{f"{name} wall": clocks["wall"] for name, clocks in middle.items()},
    }


def main() -> None:
    global ANSWER, WRONG
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a 2-layer model (default model only)")
    add_model_argument(parser)
    add_threads_argument(parser)
    args = parser.parse_args()
    set_threads(args)
    torch.set_grad_enabled(False)
    if args.model:
        model = load_model(args.model)
        config = {key: getattr(model.cfg, key) for key in ("n_layers", "d_model", "n_heads", "d_mlp", "d_vocab")}
        if model.tokenizer is not None:
            ANSWER, WRONG = model.to_single_token(" Mary"), model.to_single_token(" John")
    else:
        config = GPT2_SMALL | ({"n_layers": 2} if args.quick else {})
        model = gpt2_small(config["n_layers"])
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=False)
    tokens = prompt_tokens(model, 128, 0)
    label = describe(model, args.model)

    max_difference = check_same_numbers(model, tokens)
    _, cache = model.run_with_cache(tokens)
    repeats = 2 if args.quick else 5
    seconds = {
        "from a cache": time_interleaved(
            {
                "transformer_lens": lambda: transformer_lens_neurons(model, tokens, ANSWER, WRONG, POS, cache),
                "lenskit": lambda: lenskit_neurons(model, tokens, cache),
            },
            repeats,
        ),
        "end to end": time_interleaved(
            {
                "transformer_lens": lambda: transformer_lens_neurons(model, tokens, ANSWER, WRONG, POS),
                "lenskit": lambda: lenskit_neurons(model, tokens),
            },
            repeats,
        ),
    }
    cache = None  # free it (the lambdas above are done with it)
    lens_rows = lens_benchmark(model, tokens)

    print(f"{label}; CPU, {torch.get_num_threads()} threads")
    print(
        f"per-neuron logit-difference decomposition, {config['n_layers']} layers x {config['d_mlp']} neurons, "
        f"1 x 128 tokens ({'random ids' if model.tokenizer is None else 'English text'}), "
        f"answer {ANSWER} vs {WRONG}; median of {repeats} interleaved repeats"
    )
    print("TransformerLens: stack_neuron_results + apply_ln_to_stack + logit-difference direction")
    print(
        f"{'':<14}{'TL CPU s':>10}{'lenskit CPU s':>15}{'speed-up':>10}{'TL wall s':>11}{'lenskit wall s':>16}"
        f"{'wall speed-up':>15}  target (CPU)"
    )
    for case, times in seconds.items():
        times["speedup"] = times["transformer_lens"] / times["lenskit"]
        times["speedup_wall"] = times["transformer_lens wall"] / times["lenskit wall"]
        times["target_met"] = times["speedup"] >= TARGET_SPEEDUP
        print(
            f"{case:<14}{times['transformer_lens']:>10.4f}{times['lenskit']:>15.4f}{times['speedup']:>9.1f}x"
            f"{times['transformer_lens wall']:>11.4f}{times['lenskit wall']:>16.4f}{times['speedup_wall']:>14.1f}x"
            f"  >= {TARGET_SPEEDUP:g}x: {'met' if times['target_met'] else 'MISSED'}"
        )
    print(f"max |lenskit - TL| over neurons: {max_difference:.2e}")
    print("\nlogit lens over all layers and positions")
    print(json.dumps(lens_rows, indent=1))

    results = write_results(
        "attribution",
        args.model,
        {
            "machine": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "model": args.model,
            "model_description": label,
            "config": config,
            "answer": ANSWER,
            "wrong": WRONG,
            "neuron_decomposition_seconds": seconds,
            "max_abs_difference": max_difference,
            "target_speedup": TARGET_SPEEDUP,
            "logit_lens": lens_rows,
        },
    )
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
