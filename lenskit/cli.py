"""The ``lenskit`` command: ``lenskit info MODEL``, ``lenskit cache MODEL ...``, ``lenskit report``, ``lenskit reproduce NAME``.

Bad input (an unknown model, a missing file, an unknown hook name: any `lenskit.errors.LenskitError`)
ends with a one-line ``lenskit: error: ...`` on stderr and exit status 2; anything else is a bug in
lenskit and keeps its traceback. Numeric options are checked by argparse (exit status 2 as well).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lenskit.errors import InputError, LenskitError, MissingFileError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except LenskitError as error:
        print(f"lenskit: error: {error}", file=sys.stderr)
        return 2
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenskit",
        description="Mechanistic interpretability of transformers, as TransformerLens hook functions.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser(
        "info",
        help="config, parameter count and hook names of a model",
        description="Print a model's configuration, parameter count and hook names grouped by layer.",
    )
    info.add_argument(
        "model",
        help="TransformerLens name, local Hugging Face folder, llama2.c .bin, "
        "lenskit folder, zoo name (lenskit/NAME) or config .json",
    )
    info.set_defaults(run=run_info)

    cache = commands.add_parser(
        "cache",
        help="stream activations over a text file to safetensors shards",
        description="Run MODEL over the lines of a text file and write the activations of the hooks "
        "matching PATTERN to safetensors shards in DIR (resumable: rerun to finish).",
    )
    cache.add_argument("model", help="as for `lenskit info`")
    cache.add_argument("--text-file", required=True, type=Path, help="UTF-8 text, one document per line")
    cache.add_argument(
        "--names", required=True, help="hook name or glob, e.g. 'blocks.*.hook_resid_post'; comma-separate several"
    )
    cache.add_argument("--out", required=True, type=Path, help="output folder (shards + manifest.json)")
    cache.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="stored dtype (default float16)")
    cache.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass (default 8)")
    cache.add_argument(
        "--max-len",
        type=positive_int,
        default=None,
        help="tokens per row (default: 128, or the model's context if shorter)",
    )
    cache.set_defaults(run=run_cache)

    report = commands.add_parser(
        "report",
        help="every analysis of one prompt, as a self-contained HTML page",
        description="Logit lens, attribution per layer and head, attention of the top heads, residual "
        "patching and the information-flow graph of one prompt, written to one offline HTML page. "
        "With no options: the zoo's default model on an IOI prompt.",
    )
    report.add_argument("--model", help="as for `lenskit info` (default: the zoo's default model)")
    report.add_argument("--prompt", help="the clean prompt")
    report.add_argument("--answer", help="the expected next token, e.g. ' Mary'")
    report.add_argument("--wrong", help="the competing token, e.g. ' John'")
    report.add_argument("--corrupted", help="a prompt with as many tokens, patched from the clean one")
    report.add_argument("--out", type=Path, default=Path("report.html"), help="output page (default report.html)")
    report.set_defaults(run=run_report)

    from lenskit.experiments import EXPERIMENTS

    reproduce = commands.add_parser(
        "reproduce",
        help="rerun a known experiment and print its table",
        description="Rerun a known experiment offline (on the zoo's default model unless --model is given) "
        "and print its table in the original experiment's terms.",
    )
    reproduce.add_argument("name", choices=list(EXPERIMENTS), help="the experiment")
    reproduce.add_argument("--model", help="any model `lenskit info` accepts, e.g. gpt2 (needs internet)")
    reproduce.add_argument("--html", type=Path, help="also write the table and pictures to this HTML file")
    reproduce.add_argument(
        "--json",
        type=Path,
        help="also write the numbers (title, rows, notes, further tables and named results) to this JSON file",
    )
    reproduce.set_defaults(run=run_reproduce)

    mcp = commands.add_parser(
        "mcp",
        help="serve lenskit's experiments as MCP tools over stdio",
        description="A Model Context Protocol server (stdio) whose tools run lenskit's experiments; every call "
        "is recorded in an SQLite experiment log. Tools read and write only inside the workspace "
        "and the model roots.",
    )
    _add_lab_arguments(mcp)
    mcp.add_argument(
        "--max-chars", type=positive_int, default=4000, help="longest tool result in characters (default 4000)"
    )
    mcp.set_defaults(run=run_mcp)

    log = commands.add_parser(
        "log",
        help="read an experiment log: list, show ID, export --markdown FILE",
        description="Read the experiment log written by `lenskit mcp` or `lenskit agent`.",
    )
    log.add_argument("--db", type=Path, default=Path("experiments.db"), help="the log (default experiments.db)")
    actions = log.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="one line per experiment and note")
    show = actions.add_parser("show", help="one experiment in full")
    show.add_argument("id", type=int)
    export = actions.add_parser("export", help="the write-up: experiments in order, notes between them")
    export.add_argument("--markdown", type=Path, required=True, help="output .md file")
    log.set_defaults(run=run_log)

    agent = commands.add_parser(
        "agent",
        help="let a chat model drive the experiments (OpenAI-compatible endpoint)",
        description="A minimal agent loop: the chat model at --base-url gets the MCP server's tools, runs "
        "experiments towards --goal, and ends with a written summary; everything lands in the log.",
    )
    agent.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1")
    agent.add_argument("--model", required=True, help="the chat model's name at that endpoint")
    agent.add_argument("--goal", required=True, help="what to find out")
    agent.add_argument("--max-steps", type=positive_int, default=10, help="chat turns before the summary (default 10)")
    agent.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY, else a placeholder")
    agent.add_argument(
        "--timeout", type=positive_float, default=120.0, help="seconds to wait for each reply (default 120)"
    )
    _add_lab_arguments(agent)
    agent.set_defaults(run=run_agent)
    return parser


def _add_lab_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workspace",
        type=Path,
        default=Path("."),
        help="folder for pictures and audio inputs (default: the current folder)",
    )
    parser.add_argument("--db", type=Path, default=None, help="experiment log (default WORKSPACE/experiments.db)")
    parser.add_argument(
        "--model-root",
        type=Path,
        action="append",
        default=[],
        help="a folder whose model files the tools may load (repeat for several)",
    )
    parser.add_argument("--max-models", type=positive_int, default=2, help="models kept in memory (default 2)")


def run_info(args: argparse.Namespace) -> None:
    from lenskit.models import describe, load

    print(describe(load(args.model), args.model))


def run_cache(args: argparse.Namespace) -> None:
    from lenskit.models import load
    from lenskit.shards import stream_cache

    if not args.text_file.is_file():
        raise MissingFileError(f"--text-file: text file not found: {args.text_file}")
    texts = [line for line in args.text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise InputError(f"--text-file: {args.text_file} holds no text")
    model = load(args.model)
    if model.tokenizer is None:
        raise InputError(f"model {args.model} has no tokenizer, so it cannot read text")
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    out = stream_cache(
        model,
        texts,
        names,
        args.out,
        dtype=DTYPES[args.dtype],
        batch_size=args.batch_size,
        max_len=args.max_len or min(128, model.cfg.n_ctx),
    )
    print(f"wrote activations of {', '.join(names)} to {out}")


def run_report(args: argparse.Namespace) -> None:
    from lenskit.report import main as report_main

    report_main(
        args.model, args.out, prompt=args.prompt, answer=args.answer, wrong=args.wrong, corrupted=args.corrupted
    )


def run_reproduce(args: argparse.Namespace) -> None:
    from lenskit import experiments

    result = experiments.run(args.name, args.model)
    print(result)
    if args.html:
        from lenskit.viz import Figure

        Figure(result._repr_html_(), result.title).save(args.html)
        print(f"wrote {args.html}")
    if args.json:
        import json

        args.json.write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


def run_mcp(args: argparse.Namespace) -> None:
    from lenskit.agent.server import serve

    serve(args.workspace, args.db, args.model_root, max_models=args.max_models, max_chars=args.max_chars)


def run_log(args: argparse.Namespace) -> None:
    from lenskit.agent.log import ExperimentLog

    if not args.db.is_file():
        raise MissingFileError(f"--db: no experiment log at {args.db}")
    log = ExperimentLog(args.db)
    if args.action == "list":
        for e in log.experiments():
            print(
                f"{e.id:4d}  {e.time[:19]}  {e.tool:<15} {e.model or '-':<22} {e.duration_s:7.2f} s"
                f"{'  ERROR' if e.error else ''}  {e.summary.splitlines()[0][:60] if e.summary else ''}"
            )
        for n in log.notes():
            print(f"note {n.id}  {n.time[:19]}  on {list(n.experiments)}: {n.hypothesis[:70]}")
    elif args.action == "show":
        e = log.experiment(args.id)
        print(f"experiment {e.id}: {e.tool} at {e.time}, {e.duration_s:.2f} s, model {e.model}")
        print(f"arguments: {e.arguments}")
        print(e.summary)
        if e.picture:
            print(f"picture: {e.picture}")
    else:
        print(f"wrote {log.export_markdown(args.markdown)}")


def run_agent(args: argparse.Namespace) -> None:
    import os

    from lenskit.agent import ExperimentLog, Lab, build_server
    from lenskit.agent import run_agent as agent_loop

    lab = Lab(args.workspace, args.model_root, max_models=args.max_models)
    log = ExperimentLog(args.db or lab.workspace / "experiments.db")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"
    summary = agent_loop(
        args.goal,
        build_server(lab, log),
        log,
        base_url=args.base_url,
        model=args.model,
        max_steps=args.max_steps,
        api_key=api_key,
        timeout=args.timeout,
    )
    print(summary)
    print(f"log: {log.path} (lenskit log --db {log.path} export --markdown write-up.md)")


if __name__ == "__main__":
    sys.exit(main())
