"""Benchmark HookedWhisper on a whisper-tiny-shaped model with random weights, on the CPU.

(a) Forward pass (encoder on one 30 s spectrogram + decoder on the 4-token prompt), no hooks
    attached: HookedWhisper against Hugging Face's WhisperForConditionalGeneration (eager
    attention) on the same weights. Target: overhead at most 10%.
(b) Greedy decoding of 50 tokens from the same encoded audio (end-of-text suppressed so all 50
    are sampled): lenskit's cached decoder against openai-whisper's own ``decode`` on the same
    weights, in tokens/s. Target: at least 1.0x. Needs openai-whisper.

With ``--model faster-whisper-tiny.en`` (or the path of any CTranslate2 Whisper folder) only (b)
runs, on that real model and espeak-ng speech (noise without espeak-ng): HookedWhisper (read by
lenskit from the folder), openai-whisper's decoder given the same weights, and ctranslate2 itself
on the folder (compute_type float32, its own encoding of the same audio; needs ctranslate2), whose
ratio is reported too.

Variants are timed interleaved in one run (common.interleaved): median wall-clock and process-CPU
seconds of the repeats, after a warm-up round (use --threads 1 for CPU times that measure work on a shared machine).

    python benchmarks/bench_whisper.py            # 7 repeats
    python benchmarks/bench_whisper.py --quick    # smoke run: 2 repeats, 10 tokens
    python benchmarks/bench_whisper.py --model faster-whisper-tiny.en --threads 1

Prints a table and writes benchmarks/results/bench_whisper.json (bench_whisper_<model>.json with --model).
"""

import argparse
import sys
from pathlib import Path

import torch
from common import interleaved, medians, write_results
from transformers import WhisperConfig as HFWhisperConfig
from transformers import WhisperForConditionalGeneration

from lenskit.whisper import WhisperConfig, from_hf, from_openai, get_tokenizer
from lenskit.whisper.decoding import blank_tokens, greedy_decode, suppressed_tokens

TINY = WhisperConfig.tiny()


def hf_tiny() -> WhisperForConditionalGeneration:
    cfg = HFWhisperConfig(
        num_mel_bins=TINY.n_mels,
        max_source_positions=TINY.n_audio_ctx,
        d_model=TINY.n_audio_state,
        encoder_attention_heads=TINY.n_audio_head,
        encoder_layers=TINY.n_audio_layer,
        encoder_ffn_dim=4 * TINY.n_audio_state,
        vocab_size=TINY.n_vocab,
        max_target_positions=TINY.n_text_ctx,
        decoder_attention_heads=TINY.n_text_head,
        decoder_layers=TINY.n_text_layer,
        decoder_ffn_dim=4 * TINY.n_text_state,
        attn_implementation="eager",
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


@torch.inference_mode()
def bench_forward(repeats: int) -> dict:
    hf = hf_tiny()
    model = from_hf(hf)
    mel = torch.randn(1, TINY.n_mels, TINY.n_frames, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([[50258, 50259, 50359, 50363]])
    return medians(
        interleaved(
            {
                "HF eager forward": lambda: hf(input_features=mel, decoder_input_ids=prompt, use_cache=False),
                "HookedWhisper forward": lambda: model(mel, prompt),
            },
            repeats,
        )
    )


def bench_decoding(repeats: int, n_tokens: int) -> dict:
    reference = openai_tiny()
    model = from_openai(reference)  # loaded outside inference mode, as a user would
    mel = torch.randn(1, TINY.n_mels, TINY.n_frames, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return _bench_decoding(model, reference, mel, repeats, n_tokens)


def real_model(name: str):
    """The CTranslate2 folder `name` (a packaged name such as faster-whisper-tiny.en, or a path), as a
    HookedWhisper and as openai-whisper's model with the same weights."""
    from whisper.model import ModelDimensions, Whisper

    from lenskit.packaged import packaged
    from lenskit.whisper.convert import from_ctranslate2
    from lenskit.whisper.ctranslate2 import read_whisper

    shipped = packaged(name)
    folder = shipped.path() if shipped is not None else Path(name)
    read = read_whisper(folder)
    reference = Whisper(ModelDimensions(**read.dims)).eval()
    reference.load_state_dict(read.state, strict=True)
    return folder, from_ctranslate2(folder), reference


def speech_mel(n_mels: int) -> torch.Tensor:
    """The log-mel of an espeak-ng sentence (noise when espeak-ng is absent), [1, n_mels, 3000]."""
    import shutil
    import subprocess
    import tempfile

    from lenskit.whisper import model_input

    if shutil.which("espeak-ng") is None:
        print("    (espeak-ng not found: decoding noise)", file=sys.stderr)
        return torch.randn(1, n_mels, 3000, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(
            [
                "espeak-ng",
                "-w",
                str(wav),
                "please call stella and ask her to bring these things with her from the store",
            ],
            check=True,
            capture_output=True,
        )
        return model_input(wav, n_mels)


def bench_decoding_real(name: str, repeats: int, n_tokens: int, threads: int) -> dict:
    folder, model, reference = real_model(name)  # loaded outside inference mode, as a user would
    mel = speech_mel(model.cfg.n_mels)
    with torch.inference_mode():
        return _bench_decoding(model, reference, mel, repeats, n_tokens, folder, threads)


def _bench_decoding(model, reference, mel, repeats: int, n_tokens: int, folder=None, threads: int = 1) -> dict:
    """Greedy decoding of `n_tokens` from `mel` encoded once: lenskit against openai-whisper on the same
    weights, and against ctranslate2 float32 on `folder` when there is one (a CTranslate2 folder)."""
    import whisper

    audio = reference.encoder(mel)
    tokenizer = get_tokenizer(model)
    options = whisper.DecodingOptions(
        language="en", without_timestamps=True, fp16=False, sample_len=n_tokens, suppress_tokens=[-1, tokenizer.eot]
    )
    suppressed = sorted(set(suppressed_tokens(tokenizer)) | {tokenizer.eot})
    blank = blank_tokens(tokenizer)
    prompt = list(tokenizer.sot_sequence_including_notimestamps)
    outputs = {}
    variants = {
        "openai-whisper decode": lambda: outputs.update(openai=whisper.decode(reference, audio, options)[0].tokens),
        "lenskit greedy_decode": lambda: outputs.update(
            lenskit=greedy_decode(model, audio, prompt, tokenizer.eot, n_tokens, suppressed, blank, progress=False)
        ),
    }
    try:
        import ctranslate2
    except ImportError:
        print("    (ctranslate2 not installed: no ctranslate2 column)", file=sys.stderr)
        folder = None
    if folder is not None:
        ct2 = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32", intra_threads=threads)
        encoded = ct2.encode(ctranslate2.StorageView.from_array(mel.numpy()), to_cpu=True)  # decoding only is timed
        variants["ctranslate2 generate"] = lambda: outputs.update(
            ctranslate2=ct2.generate(
                encoded, [prompt], beam_size=1, max_length=2 * n_tokens, suppress_tokens=[-1, tokenizer.eot]
            )[0].sequences_ids[0]
        )
    times = medians(interleaved(variants, repeats))
    assert len(outputs["lenskit"]) == n_tokens, outputs
    rates = {name: {kind: n_tokens / seconds for kind, seconds in t.items()} for name, t in times.items()}
    same = {other: outputs[other] == outputs["lenskit"] for other in outputs if other != "lenskit"}
    return {"tokens/s": rates, "same tokens": same, "text": tokenizer.decode(outputs["lenskit"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, 10 tokens")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument(
        "--model",
        default=None,
        help="a CTranslate2 Whisper folder or a packaged name "
        "(faster-whisper-tiny.en): benchmark decoding on it (default: random whisper-tiny shape)",
    )
    args = parser.parse_args()
    repeats, n_tokens = (2, 10) if args.quick else (args.repeats, 50)
    torch.set_num_threads(args.threads)
    if args.model is not None:
        return main_real(args, repeats, n_tokens)

    forward = bench_forward(repeats)
    overhead = {
        kind: forward["HookedWhisper forward"][kind] / forward["HF eager forward"][kind] - 1 for kind in ("wall", "cpu")
    }
    print(f"(a) forward, whisper-tiny shape, one 30 s input, {args.threads} threads, median of {repeats}")
    print(f"    {'variant':<28}{'wall s':>10}{'CPU s':>10}")
    for name, seconds in forward.items():
        print(f"    {name:<28}{seconds['wall']:>10.3f}{seconds['cpu']:>10.3f}")
    print(
        f"    HookedWhisper overhead vs HF eager: wall {overhead['wall']:+.1%}, CPU {overhead['cpu']:+.1%} (target <= +10%)"
    )
    results = {"forward_seconds": forward, "forward_overhead": overhead}

    try:
        decoding = bench_decoding(repeats, n_tokens)
    except ImportError:
        print("(b) skipped: openai-whisper is not installed (pip install 'lenskit[whisper]')", file=sys.stderr)
    else:
        rates = decoding["tokens/s"]
        speedup = {
            kind: rates["lenskit greedy_decode"][kind] / rates["openai-whisper decode"][kind]
            for kind in ("wall", "cpu")
        }
        print(f"(b) greedy decoding of {n_tokens} tokens from encoded audio, median of {repeats}")
        print(f"    {'variant':<28}{'tokens/s':>10}{'per CPU s':>10}")
        for name, rate in rates.items():
            print(f"    {name:<28}{rate['wall']:>10.1f}{rate['cpu']:>10.1f}")
        print(
            f"    lenskit / openai-whisper: wall {speedup['wall']:.2f}x, CPU {speedup['cpu']:.2f}x (target >= 1.0x); "
            f"same tokens: {decoding['same tokens']}"
        )
        results |= {"decoding_tokens_per_s": rates, "decoding_speedup": speedup, "same_tokens": decoding["same tokens"]}

    path = write_results(
        "whisper",
        None,
        results
        | {
            "quick": args.quick,
            "repeats": repeats,
            "threads": args.threads,
            "tokens": n_tokens,
        },
        indent=2,
    )
    print(f"wrote {path}")


def main_real(args, repeats: int, n_tokens: int) -> None:
    decoding = bench_decoding_real(args.model, repeats, n_tokens, args.threads)
    rates = decoding["tokens/s"]
    ours = rates["lenskit greedy_decode"]
    print(
        f"(b) {args.model}: greedy decoding of {n_tokens} tokens from encoded speech, {args.threads} threads, "
        f"median of {repeats}"
    )
    print(f"    {'variant':<28}{'tokens/s':>10}{'per CPU s':>10}{'lenskit/this (wall)':>22}")
    for name, rate in rates.items():
        print(f"    {name:<28}{rate['wall']:>10.1f}{rate['cpu']:>10.1f}{ours['wall'] / rate['wall']:>21.2f}x")
    ratios = {
        name: {kind: ours[kind] / rate[kind] for kind in ("wall", "cpu")}
        for name, rate in rates.items()
        if name != "lenskit greedy_decode"
    }
    print(
        f"    lenskit / openai-whisper: wall {ratios['openai-whisper decode']['wall']:.2f}x, "
        f"CPU {ratios['openai-whisper decode']['cpu']:.2f}x (target >= 1.0x); same tokens: {decoding['same tokens']}"
    )
    if "ctranslate2 generate" in ratios:
        print(
            f"    lenskit / ctranslate2 float32: wall {ratios['ctranslate2 generate']['wall']:.2f}x, "
            f"CPU {ratios['ctranslate2 generate']['cpu']:.2f}x (reported, no target)"
        )
    print(f"    text: {decoding['text'][:100]!r}")
    out = write_results(
        "whisper",
        args.model,
        {
            "model": args.model,
            "decoding_tokens_per_s": rates,
            "lenskit_ratio": ratios,
            "same_tokens": decoding["same tokens"],
            "quick": args.quick,
            "repeats": repeats,
            "threads": args.threads,
            "tokens": n_tokens,
        },
        indent=2,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
