"""The ``lenskit`` command: ``lenskit info MODEL``, ``lenskit cache MODEL ...``, ``lenskit report``, ``lenskit reproduce NAME``.

Bad input (an unknown model, a missing file, an unknown hook name) ends with a one-line
``lenskit: error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"lenskit: error: {message}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenskit",
        description="Mechanistic interpretability of transformers, as TransformerLens hook functions.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser(
        "info", help="config, parameter count and hook names of a model",
        description="Print a model's configuration, parameter count and hook names grouped by layer.")
    info.add_argument("model", help="TransformerLens name, local Hugging Face folder, llama2.c .bin, "
                                    "lenskit folder, zoo name (lenskit/NAME) or config .json")
    info.set_defaults(run=run_info)

    cache = commands.add_parser(
        "cache", help="stream activations over a text file to safetensors shards",
        description="Run MODEL over the lines of a text file and write the activations of the hooks "
                    "matching PATTERN to safetensors shards in DIR (resumable: rerun to finish).")
    cache.add_argument("model", help="as for `lenskit info`")
    cache.add_argument("--text-file", required=True, type=Path, help="UTF-8 text, one document per line")
    cache.add_argument("--names", required=True,
                       help="hook name or glob, e.g. 'blocks.*.hook_resid_post'; comma-separate several")
    cache.add_argument("--out", required=True, type=Path, help="output folder (shards + manifest.json)")
    cache.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="stored dtype (default float16)")
    cache.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    cache.add_argument("--max-len", type=int, default=None,
                       help="tokens per row (default: 128, or the model's context if shorter)")
    cache.set_defaults(run=run_cache)

    report = commands.add_parser(
        "report", help="every analysis of one prompt, as a self-contained HTML page",
        description="Logit lens, attribution per layer and head, attention of the top heads, residual "
                    "patching and the information-flow graph of one prompt, written to one offline HTML page. "
                    "With no options: the zoo's default model on an IOI prompt.")
    report.add_argument("--model", help="as for `lenskit info` (default: the zoo's default model)")
    report.add_argument("--prompt", help="the clean prompt")
    report.add_argument("--answer", help="the expected next token, e.g. ' Mary'")
    report.add_argument("--wrong", help="the competing token, e.g. ' John'")
    report.add_argument("--corrupted", help="a prompt with as many tokens, patched from the clean one")
    report.add_argument("--out", type=Path, default=Path("report.html"), help="output page (default report.html)")
    report.set_defaults(run=run_report)

    from lenskit.experiments import EXPERIMENTS

    reproduce = commands.add_parser(
        "reproduce", help="rerun a known experiment and print its table",
        description="Rerun a known experiment offline (on the zoo's default model unless --model is given) "
                    "and print its table in the original experiment's terms.")
    reproduce.add_argument("name", choices=list(EXPERIMENTS), help="the experiment")
    reproduce.add_argument("--model", help="any model `lenskit info` accepts, e.g. gpt2 (needs internet)")
    reproduce.add_argument("--html", type=Path, help="also write the table and pictures to this HTML file")
    reproduce.set_defaults(run=run_reproduce)
    return parser


def run_info(args: argparse.Namespace) -> None:
    from lenskit.models import load

    model = load(args.model)
    print(describe_model(args.model, model))


def describe_model(name: str, model) -> str:
    """Config summary, parameter count, and hook names grouped by layer."""
    cfg = model.cfg
    heads = f"{cfg.n_heads} heads x d_head {cfg.d_head}"
    if getattr(cfg, "n_key_value_heads", None):
        heads += f" ({cfg.n_key_value_heads} key/value heads)"
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"model        {name}  ({type(model).__name__}, architecture {cfg.original_architecture or 'n/a'})",
        f"shape        {cfg.n_layers} layers, d_model {cfg.d_model}, {heads}, d_mlp {cfg.d_mlp}, "
        f"vocab {cfg.d_vocab}, context {cfg.n_ctx}",
        f"components   norm {cfg.normalization_type}, positions {cfg.positional_embedding_type}, "
        f"activation {cfg.act_fn}{', gated MLP' if cfg.gated_mlp else ''}"
        f"{', parallel attn+MLP' if cfg.parallel_attn_mlp else ''}",
        f"parameters   {n_params:,}",
        f"tokenizer    {type(model.tokenizer).__name__ if model.tokenizer is not None else 'none'}",
        "hooks",
    ]
    for group, leaves in group_hook_names(list(model.hook_dict)).items():
        lines.append(f"  {group}: {' '.join(leaves)}")
    return "\n".join(lines)


def group_hook_names(names: list[str]) -> dict[str, list[str]]:
    """{"blocks.0": ["hook_resid_pre", "attn.hook_q", ...], "global": [...]} in model order."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        match = re.match(r"^(.*?blocks\.\d+)\.(.+)$", name)
        group, leaf = (match.group(1), match.group(2)) if match else ("global", name)
        groups[group].append(leaf)
    return dict(groups)


def run_cache(args: argparse.Namespace) -> None:
    from lenskit.cache import stream_cache
    from lenskit.models import load

    if not args.text_file.is_file():
        raise FileNotFoundError(f"text file not found: {args.text_file}")
    texts = [line for line in args.text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"text file {args.text_file} holds no text")
    model = load(args.model)
    if model.tokenizer is None:
        raise ValueError(f"model {args.model} has no tokenizer, so it cannot read text")
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    out = stream_cache(model, texts, names, args.out, dtype=DTYPES[args.dtype],
                       batch_size=args.batch_size, max_len=args.max_len or min(128, model.cfg.n_ctx))
    print(f"wrote activations of {', '.join(names)} to {out}")


def run_report(args: argparse.Namespace) -> None:
    from lenskit.report import main as report_main

    report_main(args.model, args.out, prompt=args.prompt, answer=args.answer, wrong=args.wrong, corrupted=args.corrupted)


def run_reproduce(args: argparse.Namespace) -> None:
    from lenskit import experiments

    result = experiments.run(args.name, args.model)
    print(result)
    if args.html:
        from lenskit.viz import Figure

        Figure(result._repr_html_(), result.title).save(args.html)
        print(f"wrote {args.html}")


if __name__ == "__main__":
    sys.exit(main())
