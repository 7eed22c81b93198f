"""``lenskit agent``: a minimal experiment loop for any OpenAI-compatible chat-completions endpoint.

    lenskit agent --base-url http://127.0.0.1:8080/v1 --model qwen2.5-7b-instruct \\
        --goal "Find the heads that move the indirect object's name in lenskit/ioi-4l" --max-steps 12

The model gets the MCP server's tools (`lenskit.agent.server.build_server`, the same schemas and
the same log) as function tools. Each step sends the conversation; every tool call in the reply
runs and its result goes back as a tool message; a reply without tool calls is the final
summary. After `max_steps` steps the model is asked for the summary with tools switched off. The
summary is recorded as the session's last note, so ``lenskit log export`` ends with it.

A tool call with malformed JSON arguments, an unknown tool or bad arguments gets an error
message back (the model can correct itself); the loop goes on. The endpoint not answering within
`timeout` seconds (after one retry) ends the session with `AgentError`; what ran is in the log.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from lenskit.agent.log import ExperimentLog
from lenskit.errors import InputError, LenskitError

SYSTEM_PROMPT = (
    "You are an interpretability researcher with lenskit's experiment tools. Work towards the goal "
    "step by step: state a hypothesis, run an experiment, read the result, and call the note tool with the "
    "hypothesis, observation and next step (citing experiment ids). When you are done, answer without "
    "tool calls with a short written summary of what you found, citing experiment ids."
)
SUMMARY_REQUEST = "Stop experimenting now and write your final summary (no more tool calls)."


class AgentError(LenskitError, ConnectionError):
    """The chat endpoint failed (unreachable, timed out, or answered with an error)."""


def run_agent(
    goal: str,
    server: MCPServer,
    log: ExperimentLog,
    *,
    base_url: str,
    model: str,
    max_steps: int = 10,
    api_key: str = "not-needed",
    timeout: float = 120.0,
) -> str:
    """Drive `server`'s tools with the chat model `model` at `base_url` until it answers; returns its summary."""
    import openai

    if max_steps < 1:
        raise InputError(f"max_steps must be at least 1, not {max_steps}")
    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=1)
    tools = [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
        }
        for t in anyio.run(server.list_tools)
    ]
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": goal}]
    summary = None
    for _ in range(max_steps):
        reply = _complete(client, base_url, model=model, messages=messages, tools=tools)
        messages.append(reply.model_dump(exclude_none=True))
        if not reply.tool_calls:
            summary = reply.content or ""
            break
        for call in reply.tool_calls:
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call.id,
                    "content": call_tool(server, call.function.name, call.function.arguments),
                }
            )
    if summary is None:
        messages.append({"role": "user", "content": SUMMARY_REQUEST})
        summary = (
            _complete(client, base_url, model=model, messages=messages, tools=tools, tool_choice="none").content or ""
        )
    log.note(hypothesis=f"goal: {goal}", observation=f"final summary: {summary}", next_step="(end of session)")
    return summary


def call_tool(server: MCPServer, name: str, arguments_json: str) -> str:
    """Run one tool call from the model; an error becomes a message the model can read."""
    try:
        arguments = json.loads(arguments_json or "{}")
    except json.JSONDecodeError as error:
        return f"error: the arguments of {name} are not valid JSON ({error}); send a JSON object"
    if not isinstance(arguments, dict):
        return f"error: the arguments of {name} must be a JSON object, not {type(arguments).__name__}"
    try:
        result = anyio.run(server.call_tool, name, arguments)
    except ToolError as error:
        return f"error: {error}"
    return "\n".join(block.text for block in result.content if getattr(block, "text", None) is not None)


def _complete(client, base_url: str, **request):
    import openai

    try:
        return client.chat.completions.create(**request).choices[0].message
    except openai.APITimeoutError:
        raise AgentError(f"the chat endpoint at {base_url} did not answer within {client.timeout} s") from None
    except openai.APIConnectionError as error:
        raise AgentError(f"cannot reach the chat endpoint at {base_url}: {error}") from None
    except openai.APIStatusError as error:
        raise AgentError(f"the chat endpoint at {base_url} answered {error.status_code}: {error.message}") from None
