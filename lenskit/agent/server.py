"""``lenskit mcp``: lenskit's experiments as Model Context Protocol tools (the official ``mcp`` SDK, stdio).

    lenskit mcp --workspace runs/ --db runs/experiments.db --model-root ~/models

Every tool of `lenskit.agent.tools`, plus ``note``, with the JSON schema the SDK derives from its
signature and its docstring as the description. Each call is recorded in the `ExperimentLog`
(arguments, model, result summary, duration, picture) and its text starts with its experiment id,
so notes can cite it. Results longer than `max_chars` are cut, with a line saying so.

Bad arguments (a lenskit input error, a path outside the allowed folders, a schema mismatch)
come back as tool errors carrying lenskit's message; the server keeps serving. Calls run one at a
time (hooks on a shared model must not interleave).
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from pathlib import Path
from typing import Callable

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from lenskit.agent.log import ExperimentLog
from lenskit.agent.tools import TOOLS, Finding, Lab
from lenskit.errors import LenskitError

INSTRUCTIONS = (
    "lenskit runs mechanistic-interpretability experiments on transformer language models (and Whisper). "
    "Start with list_models and model_info; then run experiments (logit_lens, attribute, patch, surgery, "
    "flow_summary, head_detectors, generate; transcribe and layer_removal for speech models). Each result "
    "starts with [experiment N]. After each experiment, call note with your hypothesis, what you observed "
    "and your next step, citing the experiment ids."
)
DEFAULT_MAX_CHARS = 4000


def build_server(lab: Lab, log: ExperimentLog, max_chars: int = DEFAULT_MAX_CHARS) -> MCPServer:
    """An MCPServer whose tools run on `lab` and are recorded in `log`."""
    server = MCPServer(name="lenskit", instructions=INSTRUCTIONS, log_level="WARNING")
    lock = threading.Lock()
    for tool in TOOLS:
        server.add_tool(
            _recorded(tool, lab, log, lock, max_chars),
            name=tool.__name__,
            description=inspect.getdoc(tool),
            structured_output=False,
        )

    def note(hypothesis: str, observation: str, next_step: str, experiments: list[int] = []) -> str:  # noqa: B006
        try:
            with lock:
                note_id = log.note(hypothesis, observation, next_step, experiments)
        except ValueError as error:
            raise ToolError(str(error)) from None
        return f"[note {note_id}] recorded, linked to experiments {sorted(set(experiments))}"

    server.add_tool(
        note,
        name="note",
        structured_output=False,
        description=(
            "Record your reasoning: the hypothesis you are testing, what the experiments showed, and the next "
            "step, linked to the experiment ids (the N of [experiment N]) it discusses."
        ),
    )
    return server


def bounded(text: str, max_chars: int) -> str:
    """`text`, or its first `max_chars` characters and a line saying how much was cut."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}\n[truncated: {len(text) - max_chars} more characters; ask for fewer rows]"


def _recorded(
    tool: Callable[..., Finding], lab: Lab, log: ExperimentLog, lock: threading.Lock, max_chars: int
) -> Callable[..., str]:
    """`tool` bound to `lab`, serialised by `lock`, recorded in `log`, with the signature the SDK reads."""

    @functools.wraps(tool)
    def call(**arguments) -> str:
        with lock:
            start = time.perf_counter()
            try:
                finding = tool(lab, **arguments)
            except Exception as error:
                user_error = isinstance(error, LenskitError)
                summary = f"error: {error}" if user_error else f"crash: {type(error).__name__}: {error}"
                log.record(
                    tool.__name__,
                    arguments,
                    model=arguments.get("model"),
                    summary=summary,
                    duration_s=time.perf_counter() - start,
                    error=True,
                )
                if user_error:
                    raise ToolError(str(error)) from None
                raise
            picture = str(Path(finding.picture).relative_to(lab.workspace)) if finding.picture else None
            text = bounded(finding.text, max_chars) + (f"\npicture: {finding.picture}" if picture else "")
            experiment = log.record(
                tool.__name__,
                arguments,
                model=finding.model,
                summary=text,
                duration_s=time.perf_counter() - start,
                picture=picture,
            )
            return f"[experiment {experiment}] {text}"

    signature = inspect.signature(tool, eval_str=True)
    call.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:], return_annotation=str)
    return call


def serve(
    workspace: str | Path,
    db: str | Path | None = None,
    model_roots: list[str | Path] = (),
    max_models: int = 2,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> None:
    """Serve over stdio until the client closes the connection (``lenskit mcp``)."""
    lab = Lab(workspace, model_roots, max_models=max_models)
    log = ExperimentLog(db if db is not None else lab.workspace / "experiments.db")
    try:
        build_server(lab, log, max_chars).run("stdio")
    finally:
        log.close()
