"""The experiment agent: the MCP server through the SDK's own client over stdio, the log, the agent loop.

The agent-loop tests talk to a small chat-completions server on 127.0.0.1 that replays a fixed
sequence of replies. It stands in for a real model: these tests check the loop, the HTTP client,
timeouts, malformed tool calls and the log, not intelligence.
"""

import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import pytest
import torch
from mcp import Client
from mcp.client.stdio import StdioServerParameters

import lenskit
from lenskit import metrics
from lenskit.agent import AgentError, ExperimentLog, Lab, build_server, run_agent
from lenskit.cli import main as cli_main

MODEL = "lenskit/ioi-4l"
PROMPT = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def text_of(result) -> str:
    return "\n".join(block.text for block in result.content)


async def mcp_session(workspace, calls, max_chars=4000, max_models=2):
    """Start `lenskit mcp` as a subprocess, list its tools and make `calls` [(name, args)]; returns both."""
    params = StdioServerParameters(
        command=sys.executable,
        args=[
            "-m",
            "lenskit.cli",
            "mcp",
            "--workspace",
            str(workspace),
            "--max-chars",
            str(max_chars),
            "--max-models",
            str(max_models),
        ],
    )
    async with Client(params, read_timeout_seconds=300) as client:
        tools = await client.list_tools()
        results = [await client.call_tool(name, arguments) for name, arguments in calls]
    return tools, results


def logit_diff(model, prompt: str) -> float:
    """logit(' Mary') - logit(' John') at the last position, by hand."""
    with torch.no_grad():
        logits = model(prompt)[0, -1]
    return (logits[model.to_single_token(" Mary")] - logits[model.to_single_token(" John")]).item()


@pytest.fixture(scope="module")
def ioi_model():
    return lenskit.load(MODEL)


def test_mcp_server_serves_every_text_tool_with_lenskit_numbers(tmp_path, ioi_model):
    calls = [
        ("list_models", {}),
        ("model_info", {"model": MODEL}),
        ("generate", {"model": MODEL, "prompt": PROMPT, "max_new_tokens": 3}),
        ("logit_lens", {"model": MODEL, "prompt": PROMPT, "targets": [" Mary", " John"]}),
        ("attribute", {"model": MODEL, "prompt": PROMPT, "answer": " Mary", "wrong": " John", "by": "layer"}),
        ("patch", {"model": MODEL, "prompt": PROMPT, "corrupted": CORRUPTED, "answer": " Mary", "wrong": " John"}),
        ("surgery", {"model": MODEL, "prompt": PROMPT, "blocks": [0, 1, 3], "generate_tokens": 4}),
        (
            "path_patch",
            {
                "model": MODEL,
                "prompt": PROMPT,
                "corrupted": CORRUPTED,
                "answer": " Mary",
                "wrong": " John",
                "receivers": [[3, 0, "q"], [3, 1, "q"]],
            },
        ),
        ("flow_summary", {"model": MODEL, "prompt": PROMPT, "top": 3}),
        ("head_detectors", {"model": MODEL, "prompt": "a b c d e f g a b c d e f g", "kind": "induction"}),
        ("list_models", {}),
        (
            "note",
            {
                "hypothesis": "late MLPs write the name",
                "observation": "mlp 2 and 3 carry most",
                "next_step": "patch them",
                "experiments": [5, 6],
            },
        ),
    ]
    tools, results = anyio.run(mcp_session, tmp_path, calls)
    names = {tool.name for tool in tools.tools}
    assert names == {
        "list_models",
        "model_info",
        "generate",
        "logit_lens",
        "attribute",
        "patch",
        "path_patch",
        "surgery",
        "flow_summary",
        "head_detectors",
        "transcribe",
        "layer_removal",
        "note",
    }
    schema = next(tool for tool in tools.tools if tool.name == "patch").input_schema
    assert set(schema["required"]) == {"model", "prompt", "corrupted", "answer", "wrong"}
    assert schema["properties"]["site"]["enum"] == ["resid_pre", "attn_out", "mlp_out", "z"]
    assert not any(result.is_error for result in results), [text_of(r) for r in results if r.is_error]
    texts = [text_of(result) for result in results]
    assert all(text.startswith(f"[experiment {i + 1}]") for i, text in enumerate(texts[:-1]))

    assert "lenskit/ioi-4l" in texts[0] and "in memory" not in texts[0]
    assert "in memory: lenskit/ioi-4l" in texts[10]  # loaded once by the first analysis, kept
    assert "4 layers" in texts[1] and "blocks.L.attn.hook_q/k/v/z" in texts[1]
    expected = ioi_model.generate(PROMPT, max_new_tokens=3, do_sample=False, verbose=False)[len(PROMPT) :]
    assert f"continuation: {expected!r}" in texts[2]
    assert f"= {logit_diff(ioi_model, PROMPT):.3f}" in texts[4]
    assert f"clean {logit_diff(ioi_model, PROMPT):.3f}, corrupted {logit_diff(ioi_model, CORRUPTED):.3f}" in texts[5]
    assert "blocks [0, 1, 3]" in texts[6] and "more likely" in texts[6]
    grid = (
        lenskit.path_patch(
            ioi_model,
            PROMPT,
            CORRUPTED,
            metrics.logit_diff(" Mary", " John"),
            receivers=[(3, 0, "q"), (3, 1, "q")],
            progress=False,
        )
        .normalised()
        .to_frame()
        .dropna(subset=["value"])
    )
    strongest = grid.loc[grid.value.abs().idxmax()]
    table = texts[7].split("largest |value| first:\n")[1].splitlines()
    assert table[1].split() == [str(int(strongest["layer"])), str(int(strongest["head"])), f"{strongest['value']:.3f}"]
    assert "path patching heads -> L3H0.q, L3H1.q" in texts[7]
    for i, tool in ((3, "logit_lens"), (5, "patch"), (7, "path_patch"), (8, "flow"), (9, "head_detectors")):
        picture = texts[i].rsplit("picture: ", 1)[1].strip()
        assert picture.startswith(str(tmp_path.resolve())) and picture.endswith(f"-{tool}.html")
        assert "<html" in open(picture).read().lower()
    assert texts[11].startswith("[note 1]")

    log = ExperimentLog(tmp_path / "experiments.db")
    experiments = log.experiments()
    assert [e.tool for e in experiments] == [name for name, _ in calls[:-1]]
    assert experiments[4].arguments["by"] == "layer" and experiments[4].model == MODEL
    assert all(e.duration_s > 0 and not e.error for e in experiments)
    assert log.notes()[0].experiments == (5, 6)


def test_mcp_server_survives_bad_arguments_and_truncates(tmp_path):
    calls = [
        ("attribute", {"model": MODEL, "prompt": PROMPT, "answer": " Mary", "wrong": " John", "by": "bogus"}),
        ("generate", {"model": MODEL, "prompt": PROMPT, "max_new_tokens": 5000}),
        ("model_info", {"model": "lenskit/no-such-model"}),
        ("model_info", {"model": "../../etc"}),
        ("patch", {"model": MODEL, "prompt": PROMPT, "corrupted": "Mary", "answer": " Mary", "wrong": " John"}),
        ("surgery", {"model": MODEL, "prompt": PROMPT, "blocks": [0, 9]}),
        ("transcribe", {"model": "lenskit/speech-3l", "audio": "/etc/passwd"}),
        ("note", {"hypothesis": "h", "observation": "o", "next_step": "n", "experiments": [99]}),
        ("logit_lens", {"model": MODEL, "prompt": PROMPT, "top_k": 0}),
        (
            "path_patch",
            {
                "model": MODEL,
                "prompt": PROMPT,
                "corrupted": CORRUPTED,
                "answer": " Mary",
                "wrong": " John",
                "receivers": [[0, 0, "q"]],
            },
        ),
        ("flow_summary", {"model": MODEL, "prompt": PROMPT, "top": 500}),
        ("head_detectors", {"model": MODEL, "prompt": PROMPT, "kind": "name_mover"}),
        ("layer_removal", {"model": "lenskit/speech-3l", "audio": "missing.wav", "reference": "two cups"}),
        (
            "attribute",
            {"model": MODEL, "prompt": PROMPT, "answer": " Mary", "wrong": " John", "by": "neuron", "top": 50},
        ),
        ("model_info", {"model": MODEL}),
    ]
    _, results = anyio.run(mcp_session, tmp_path, calls, 600)
    texts = [text_of(result) for result in results]
    assert [result.is_error for result in results] == [True] * 13 + [False, False]
    assert "by" in texts[0]  # the SDK's schema check names the argument
    assert "max_new_tokens=5000 is out of range: 1..200" in texts[1]
    assert "no zoo checkpoint lenskit/no-such-model" in texts[2]
    assert "outside the folders this server may read" in texts[3]
    assert "as many tokens" in texts[4] or "tokens" in texts[4]
    assert "9" in texts[5]
    assert "outside the folders this server may read" in texts[6]
    assert "experiments [99] are not in the log" in texts[7]
    assert "top_k=0 is out of range: 1..10" in texts[8]
    assert "is in layer 0: no sender comes before it" in texts[9]
    assert "top=500 is out of range: 1..50" in texts[10]
    assert "kind" in texts[11]  # the schema's enum names the argument
    assert "'missing.wav' does not exist" in texts[12]
    assert "[truncated:" in texts[13] and len(texts[13]) < 800
    assert texts[14].startswith("[experiment")  # still serving
    errors = [e for e in ExperimentLog(tmp_path / "experiments.db").experiments() if e.error]
    assert [e.tool for e in errors] == [
        "generate",
        "model_info",
        "model_info",
        "patch",
        "surgery",
        "transcribe",
        "logit_lens",
        "path_patch",
        "flow_summary",
        "layer_removal",
    ]


def test_lab_keeps_at_most_max_models_least_recently_used_dropped(tmp_path, ioi_model):
    folder = tmp_path / "models" / "copy"
    lenskit.models.save(ioi_model, folder)
    lab = Lab(tmp_path / "workspace", [tmp_path / "models"], max_models=1)
    first = lab.model(MODEL)
    assert lab.model(MODEL) is first
    lab.model(str(folder))
    assert lab.loaded() == [str(folder.resolve())]
    assert lab.model(MODEL) is not first  # dropped, so loaded again
    with pytest.raises(ValueError, match="outside the folders"):
        lab.model(str(tmp_path))
    with pytest.raises(ValueError, match="max_models must be at least 1"):
        Lab(tmp_path, max_models=0)


def test_mcp_server_serves_the_speech_tools(tmp_path):
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng is not installed")
    subprocess.run([espeak, "-w", str(tmp_path / "speech.wav"), "two red cups"], check=True)
    calls = [
        ("transcribe", {"model": "lenskit/speech-3l", "audio": "speech.wav"}),
        (
            "layer_removal",
            {"model": "lenskit/speech-3l", "audio": "speech.wav", "reference": "two red cups", "part": "encoder"},
        ),
    ]
    _, (transcript, removal) = anyio.run(mcp_session, tmp_path, calls)
    from lenskit import whisper

    model = whisper.load("lenskit/speech-3l")
    expected = whisper.transcribe(model, tmp_path / "speech.wav", progress=False).text
    assert text_of(transcript) == f"[experiment 1] transcript: {expected!r}"
    table = whisper.layer_removal(model, tmp_path / "speech.wav", "two red cups", part="encoder", progress=False)
    assert text_of(removal) == f"[experiment 2] {table.to_string(index=False, float_format='%.3f')}"
    assert list(table.removed) == [0, 1, 2, 3]


# --- the log on its own --------------------------------------------------------------------------------


def test_log_records_orders_and_exports(tmp_path):
    log = ExperimentLog(tmp_path / "log.db")
    first = log.record(
        "patch",
        {"model": MODEL, "site": "z"},
        model=MODEL,
        summary="grid",
        duration_s=1.5,
        picture="pictures/1-patch.html",
    )
    note = log.note("z carries the name", "layer 3 restores 0.9", "path patch", [first])
    second = log.record("attribute", {"model": MODEL}, model=MODEL, summary="error: bad", duration_s=0.1, error=True)
    assert (first, second, note) == (1, 2, 1)
    with pytest.raises(ValueError, match=r"experiments \[7\] are not in the log; valid ids: 1..2"):
        log.note("h", "o", "n", [7])
    with pytest.raises(ValueError, match="experiment 5 is not in"):
        log.experiment(5)
    rows = sqlite3.connect(tmp_path / "log.db").execute("SELECT tool, model, error FROM experiments").fetchall()
    assert rows == [("patch", MODEL, 0), ("attribute", MODEL, 1)]
    markdown = log.export_markdown(tmp_path / "write-up.md").read_text()
    assert (
        markdown.index("Experiment 1: patch")
        < markdown.index("Note 1")
        < markdown.index("Experiment 2: attribute (error)")
    )
    assert "[pictures/1-patch.html](pictures/1-patch.html)" in markdown and "Next step: path patch" in markdown


def test_log_cli(tmp_path, capsys):
    log = ExperimentLog(tmp_path / "log.db")
    log.record("generate", {"prompt": "hi"}, model=MODEL, summary="continuation: 'x'", duration_s=0.25)
    log.note("h", "o", "n", [1])
    db = str(tmp_path / "log.db")
    assert cli_main(["log", "--db", db, "list"]) == 0
    listing = capsys.readouterr().out
    assert "generate" in listing and "note 1" in listing
    assert cli_main(["log", "--db", db, "show", "1"]) == 0
    assert "continuation: 'x'" in capsys.readouterr().out
    assert cli_main(["log", "--db", db, "export", "--markdown", str(tmp_path / "w.md")]) == 0
    assert "Experiment 1: generate" in (tmp_path / "w.md").read_text()
    assert cli_main(["log", "--db", db, "show", "3"]) == 2
    assert "experiment 3 is not in" in capsys.readouterr().err
    assert cli_main(["log", "--db", str(tmp_path / "none.db"), "list"]) == 2


# --- the agent loop against a replaying chat-completions server on 127.0.0.1 --------------------------


class ReplayServer:
    """A chat-completions endpoint on 127.0.0.1 replaying `replies` (message dicts) in order; stands in
    for a real model. Records every request body; `delay` seconds before each answer."""

    def __init__(self, replies: list[dict], delay: float = 0.0):
        self.replies, self.requests, self.delay = list(replies), [], delay
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                time.sleep(outer.delay)
                message = outer.replies.pop(0) if outer.replies else {"role": "assistant", "content": "done"}
                payload = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    }
                ).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def tool_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_agent_loop_runs_tools_reports_errors_and_logs(tmp_path):
    replies = [
        {"role": "assistant", "content": None, "tool_calls": [tool_call("c1", "list_models", "{}")]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                tool_call(
                    "c2",
                    "attribute",
                    '{"model": "lenskit/ioi-4l", "prompt": "' + PROMPT + '", "answer": " Mary", '
                    '"wrong": " John", "by": "layer"}',
                ),
                tool_call("c3", "attribute", '{"model": "lenskit/ioi-4l", "prompt": '),  # malformed JSON
                tool_call("c4", "no_such_tool", "{}"),
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                tool_call(
                    "c5",
                    "note",
                    '{"hypothesis": "MLPs", "observation": "mlp 2 largest", "next_step": "stop", "experiments": [2]}',
                )
            ],
        },
        {"role": "assistant", "content": "The late MLPs write the answer (experiment 2)."},
    ]
    server = ReplayServer(replies)
    log = ExperimentLog(tmp_path / "log.db")
    try:
        summary = run_agent(
            "Which layers write Mary?",
            build_server(Lab(tmp_path), log),
            log,
            base_url=server.url,
            model="stand-in",
            max_steps=6,
            timeout=30,
        )
    finally:
        server.close()
    assert summary == "The late MLPs write the answer (experiment 2)."
    assert len(server.requests) == 4
    first = server.requests[0]
    assert first["model"] == "stand-in" and first["messages"][1]["content"] == "Which layers write Mary?"
    assert {tool["function"]["name"] for tool in first["tools"]} >= {"patch", "surgery", "note"}
    tool_messages = {m["tool_call_id"]: m["content"] for m in server.requests[2]["messages"] if m["role"] == "tool"}
    assert tool_messages["c2"].startswith("[experiment 2]") and "logit(' Mary') - logit(' John')" in tool_messages["c2"]
    assert tool_messages["c3"].startswith("error: the arguments of attribute are not valid JSON")
    assert tool_messages["c4"].startswith("error:") and "no_such_tool" in tool_messages["c4"]
    assert [e.tool for e in log.experiments()] == ["list_models", "attribute"]
    notes = log.notes()
    assert notes[0].experiments == (2,) and notes[-1].observation == f"final summary: {summary}"
    assert "final summary" in log.export_markdown(tmp_path / "w.md").read_text()


def test_agent_loop_asks_for_a_summary_after_max_steps(tmp_path):
    looping = [
        {"role": "assistant", "content": None, "tool_calls": [tool_call(f"c{i}", "list_models", "{}")]}
        for i in range(2)
    ]
    server = ReplayServer(looping + [{"role": "assistant", "content": "Out of steps: nothing found."}])
    log = ExperimentLog(tmp_path / "log.db")
    try:
        summary = run_agent("goal", build_server(Lab(tmp_path), log), log, base_url=server.url, model="m", max_steps=2)
    finally:
        server.close()
    assert summary == "Out of steps: nothing found."
    assert len(server.requests) == 3 and server.requests[-1]["tool_choice"] == "none"
    assert server.requests[-1]["messages"][-1]["content"].startswith("Stop experimenting now")


def test_agent_loop_times_out_with_a_clear_error(tmp_path):
    server = ReplayServer([], delay=3.0)
    log = ExperimentLog(tmp_path / "log.db")
    try:
        with pytest.raises(AgentError, match=r"did not answer within 0.5 s"):
            run_agent("goal", build_server(Lab(tmp_path), log), log, base_url=server.url, model="m", timeout=0.5)
    finally:
        server.close()
    assert len(server.requests) == 2  # one retry, then the error


def test_agent_cli_unreachable_endpoint_is_one_line(tmp_path, capsys):
    status = cli_main(
        [
            "agent",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--model",
            "m",
            "--goal",
            "g",
            "--workspace",
            str(tmp_path),
            "--timeout",
            "2",
        ]
    )
    assert status == 2
    assert capsys.readouterr().err.startswith("lenskit: error: cannot reach the chat endpoint at http://127.0.0.1:9/v1")
