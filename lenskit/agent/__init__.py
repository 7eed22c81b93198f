"""The experiment agent: lenskit's experiments as MCP tools, an SQLite experiment log, and an agent loop.

lenskit mcp --workspace runs/            # serve the tools to any MCP client (stdio)
lenskit agent --base-url URL --model NAME --goal "..."   # or drive them with a chat model
lenskit log --db runs/experiments.db export --markdown write-up.md
"""

from lenskit.agent.log import ExperimentLog
from lenskit.agent.loop import AgentError, run_agent
from lenskit.agent.server import build_server, serve
from lenskit.agent.tools import TOOLS, Finding, Lab

__all__ = ["ExperimentLog", "Lab", "Finding", "TOOLS", "build_server", "serve", "run_agent", "AgentError"]
