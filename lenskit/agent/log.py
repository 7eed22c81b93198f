"""The experiment log: every tool call and every note of an agent session, in one SQLite file.

    >>> log = ExperimentLog("experiments.db")
    >>> run_id = log.record("patch", {"model": "lenskit/ioi-4l", ...}, model="lenskit/ioi-4l",
    ...                     summary="...", duration_s=0.8, picture="pictures/3-patch.html")
    >>> log.note("L3 heads move names", "patching L3 restores 90%", "path-patch L3 to logits", [run_id])
    >>> log.export_markdown("write-up.md")   # experiments in order, the notes between them

Tables: ``experiments`` (id, time, tool, arguments as JSON, model, summary, duration_s, picture,
error) and ``notes`` (id, time, hypothesis, observation, next_step), linked by ``note_experiments``.
Experiments and notes share one sequence of times, which orders the write-up.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lenskit.errors import InputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    tool TEXT NOT NULL,
    arguments TEXT NOT NULL,
    model TEXT,
    summary TEXT NOT NULL,
    duration_s REAL NOT NULL,
    picture TEXT,
    error INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    hypothesis TEXT NOT NULL,
    observation TEXT NOT NULL,
    next_step TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS note_experiments (
    note_id INTEGER NOT NULL REFERENCES notes(id),
    experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    PRIMARY KEY (note_id, experiment_id)
);
"""


@dataclass(frozen=True)
class Experiment:
    id: int
    time: str
    tool: str
    arguments: dict[str, Any]
    model: str | None
    summary: str
    duration_s: float
    picture: str | None
    error: bool


@dataclass(frozen=True)
class Note:
    id: int
    time: str
    hypothesis: str
    observation: str
    next_step: str
    experiments: tuple[int, ...]


class ExperimentLog:
    """An SQLite experiment log at `path` (created with its tables if missing)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.path, check_same_thread=False
        )  # the server's worker threads; calls are serialised
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def record(
        self,
        tool: str,
        arguments: dict[str, Any],
        *,
        model: str | None,
        summary: str,
        duration_s: float,
        picture: str | None = None,
        error: bool = False,
    ) -> int:
        """Add one tool call; returns its experiment id."""
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO experiments (time, tool, arguments, model, summary, duration_s, picture, error) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _now(),
                    tool,
                    json.dumps(arguments, sort_keys=True, default=str),
                    model,
                    summary,
                    duration_s,
                    picture,
                    int(error),
                ),
            )
        return cursor.lastrowid

    def note(self, hypothesis: str, observation: str, next_step: str, experiments: list[int] = ()) -> int:
        """Add a note linked to `experiments` (ids that must exist); returns the note's id."""
        unknown = sorted(set(experiments) - {row[0] for row in self._db.execute("SELECT id FROM experiments")})
        if unknown:
            raise InputError(
                f"note: experiments {unknown} are not in the log; valid ids: 1..{self.last_experiment_id()}"
            )
        with self._db:
            cursor = self._db.execute(
                "INSERT INTO notes (time, hypothesis, observation, next_step) VALUES (?, ?, ?, ?)",
                (_now(), hypothesis, observation, next_step),
            )
            self._db.executemany(
                "INSERT INTO note_experiments VALUES (?, ?)",
                [(cursor.lastrowid, experiment) for experiment in sorted(set(experiments))],
            )
        return cursor.lastrowid

    def last_experiment_id(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(id), 0) FROM experiments").fetchone()[0]

    def experiments(self) -> list[Experiment]:
        rows = self._db.execute(
            "SELECT id, time, tool, arguments, model, summary, duration_s, picture, error FROM experiments ORDER BY id"
        )
        return [Experiment(*row[:3], json.loads(row[3]), *row[4:8], bool(row[8])) for row in rows]

    def experiment(self, experiment_id: int) -> Experiment:
        found = [e for e in self.experiments() if e.id == experiment_id]
        if not found:
            raise InputError(
                f"experiment {experiment_id} is not in {self.path}; valid ids: 1..{self.last_experiment_id()}"
            )
        return found[0]

    def notes(self) -> list[Note]:
        links: dict[int, list[int]] = {}
        for note_id, experiment_id in self._db.execute("SELECT note_id, experiment_id FROM note_experiments"):
            links.setdefault(note_id, []).append(experiment_id)
        rows = self._db.execute("SELECT id, time, hypothesis, observation, next_step FROM notes ORDER BY id")
        return [Note(*row, tuple(sorted(links.get(row[0], [])))) for row in rows]

    def export_markdown(self, path: str | os.PathLike) -> Path:
        """The write-up: every experiment in order (tool, arguments, result), each note where it was written."""
        entries = [(e.time, 0, e.id, e) for e in self.experiments()] + [(n.time, 1, n.id, n) for n in self.notes()]
        lines = [f"# Experiment log ({self.path.name})", ""]
        for _, _, _, entry in sorted(entries, key=lambda item: item[:3]):
            lines += _experiment_markdown(entry) if isinstance(entry, Experiment) else _note_markdown(entry)
        path = Path(path)
        path.write_text("\n".join(lines))
        return path


def _experiment_markdown(e: Experiment) -> list[str]:
    status = " (error)" if e.error else ""
    lines = [
        f"## Experiment {e.id}: {e.tool}{status}",
        "",
        f"{e.time} · {e.duration_s:.2f} s" + (f" · model `{e.model}`" if e.model else ""),
        "",
        "Arguments: `" + json.dumps(e.arguments, sort_keys=True) + "`",
        "",
        "```",
        e.summary,
        "```",
        "",
    ]
    if e.picture:
        lines += [f"Picture: [{e.picture}]({e.picture})", ""]
    return lines


def _note_markdown(n: Note) -> list[str]:
    about = ", ".join(f"experiment {i}" for i in n.experiments) or "no experiment"
    return [
        f"> **Note {n.id}** (on {about})",
        ">",
        f"> - Hypothesis: {n.hypothesis}",
        f"> - Observation: {n.observation}",
        f"> - Next step: {n.next_step}",
        "",
    ]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
