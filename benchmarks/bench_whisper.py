"""Benchmark HookedWhisper on a whisper-tiny-shaped model with random weights, on the CPU.

(a) Forward pass (encoder on one 30 s spectrogram + decoder on the 4-token prompt), no hooks
    attached: HookedWhisper against Hugging Face's WhisperForConditionalGeneration (eager
    attention) on the same weights. Target: overhead at most 10%.
(b) Greedy decoding of 50 tokens from the same encoded audio (end-of-text suppressed so all 50
    are sampled): lenskit's cached decoder against openai-whisper's own ``decode`` on the same
    weights, in tokens/s. Target: at least 1.0x. Needs openai-whisper.

Variants are timed interleaved in one run: median wall-clock and process-CPU seconds of the
repeats, after a warm-up round (use --threads 1 for CPU times that measure work on a shared machine).

    python benchmarks/bench_whisper.py            # 7 repeats
    python benchmarks/bench_whisper.py --quick    # smoke run: 2 repeats, 10 tokens

Prints a table and writes benchmarks/results/bench_whisper.json.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import WhisperConfig as HFWhisperConfig, WhisperForConditionalGeneration

from lenskit.whisper import WhisperConfig, from_hf, from_openai, get_tokenizer
from lenskit.whisper.decoding import blank_tokens, greedy_decode, suppressed_tokens

RESULTS = Path(__file__).parent / "results" / "bench_whisper.json"
TINY = WhisperConfig.tiny()


def hf_tiny() -> WhisperForConditionalGeneration:
    cfg = HFWhisperConfig(
        num_mel_bins=TINY.n_mels, max_source_positions=TINY.n_audio_ctx, d_model=TINY.n_audio_state,
        encoder_attention_heads=TINY.n_audio_head, encoder_layers=TINY.n_audio_layer, encoder_ffn_dim=4 * TINY.n_audio_state,
        vocab_size=TINY.n_vocab, max_target_positions=TINY.n_text_ctx, decoder_attention_heads=TINY.n_text_head,
        decoder_layers=TINY.n_text_layer, decoder_ffn_dim=4 * TINY.n_text_state, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(cfg).eval()


def openai_tiny():
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    model = Whisper(ModelDimensions(**TINY.to_dict())).eval()
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(0, 0.02)  # created empty by openai-whisper
    return model


def interleaved(variants: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall-clock and process-CPU seconds per call of each variant, over `repeats`
    interleaved rounds after one warm-up round (CPU time is the steadier measure on a shared machine)."""
    times = {name: {"wall": [], "cpu": []} for name in variants}
    for repeat in range(repeats + 1):
        for name, run in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            if repeat:
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.process_time() - cpu)
    return {name: {kind: statistics.median(values) for kind, values in t.items()} for name, t in times.items()}


@torch.inference_mode()
def bench_forward(repeats: int) -> dict:
    hf = hf_tiny()
    model = from_hf(hf)
    mel = torch.randn(1, TINY.n_mels, TINY.n_frames, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([[50258, 50259, 50359, 50363]])
    return interleaved({
        "HF eager forward": lambda: hf(input_features=mel, decoder_input_ids=prompt, use_cache=False),
        "HookedWhisper forward": lambda: model(mel, prompt),
    }, repeats)


@torch.inference_mode()
def bench_decoding(repeats: int, n_tokens: int) -> dict:
    import whisper

    reference = openai_tiny()
    model = from_openai(reference)
    mel = torch.randn(1, TINY.n_mels, TINY.n_frames, generator=torch.Generator().manual_seed(0))
    audio = reference.encoder(mel)
    tokenizer = get_tokenizer(model)
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, sample_len=n_tokens,
                                      suppress_tokens=[-1, tokenizer.eot])
    suppressed = sorted(set(suppressed_tokens(tokenizer)) | {tokenizer.eot})
    blank = blank_tokens(tokenizer)
    prompt = list(tokenizer.sot_sequence_including_notimestamps)
    outputs = {}

    def openai_decode():
        outputs["openai"] = whisper.decode(reference, audio, options)[0].tokens

    def lenskit_decode():
        outputs["lenskit"] = greedy_decode(model, audio, prompt, tokenizer.eot, n_tokens, suppressed, blank,
                                           progress=False)

    times = interleaved({"openai-whisper decode": openai_decode, "lenskit greedy_decode": lenskit_decode}, repeats)
    assert len(outputs["lenskit"]) == n_tokens, outputs
    rates = {name: {kind: n_tokens / seconds for kind, seconds in t.items()} for name, t in times.items()}
    return {"tokens/s": rates, "same tokens": outputs["openai"] == outputs["lenskit"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, 10 tokens")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    repeats, n_tokens = (2, 10) if args.quick else (args.repeats, 50)
    torch.set_num_threads(args.threads)

    forward = bench_forward(repeats)
    overhead = {kind: forward["HookedWhisper forward"][kind] / forward["HF eager forward"][kind] - 1 for kind in ("wall", "cpu")}
    print(f"(a) forward, whisper-tiny shape, one 30 s input, {args.threads} threads, median of {repeats}")
    print(f"    {'variant':<28}{'wall s':>10}{'CPU s':>10}")
    for name, seconds in forward.items():
        print(f"    {name:<28}{seconds['wall']:>10.3f}{seconds['cpu']:>10.3f}")
    print(f"    HookedWhisper overhead vs HF eager: wall {overhead['wall']:+.1%}, CPU {overhead['cpu']:+.1%} (target <= +10%)")
    results = {"forward_seconds": forward, "forward_overhead": overhead}

    try:
        decoding = bench_decoding(repeats, n_tokens)
    except ImportError:
        print("(b) skipped: openai-whisper is not installed (pip install 'lenskit[whisper]')", file=sys.stderr)
    else:
        rates = decoding["tokens/s"]
        speedup = {kind: rates["lenskit greedy_decode"][kind] / rates["openai-whisper decode"][kind] for kind in ("wall", "cpu")}
        print(f"(b) greedy decoding of {n_tokens} tokens from encoded audio, median of {repeats}")
        print(f"    {'variant':<28}{'tokens/s':>10}{'per CPU s':>10}")
        for name, rate in rates.items():
            print(f"    {name:<28}{rate['wall']:>10.1f}{rate['cpu']:>10.1f}")
        print(f"    lenskit / openai-whisper: wall {speedup['wall']:.2f}x, CPU {speedup['cpu']:.2f}x (target >= 1.0x); "
              f"same tokens: {decoding['same tokens']}")
        results |= {"decoding_tokens_per_s": rates, "decoding_speedup": speedup, "same_tokens": decoding["same tokens"]}

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results | {"quick": args.quick, "repeats": repeats, "threads": args.threads,
                                             "tokens": n_tokens, "torch": torch.__version__,
                                             "machine": platform.processor() or platform.machine()}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
