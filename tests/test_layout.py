"""The one-home rules, checked on the source: no import cycle, one module turns input into tokens,
few modules read the unembedding, long modules say why. (Layers are import-linter's job, in CI.)"""

import ast
from pathlib import Path

import grimp
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lenskit"
LOADERS = {
    "models.py",
    "gguf.py",
    "llama2c.py",
    "packaged.py",
    "whisper/convert.py",
    "whisper/ctranslate2.py",
    "whisper/model.py",
}
"""Modules that build models from files (they write W_U; whisper/model.py defines the tied W_U)."""


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "checkpoints" not in p.parts)


def relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def attribute_uses(path: Path, names: set[str]) -> list[int]:
    """Lines where code (not a docstring) reads an attribute in `names`."""
    tree = ast.parse(path.read_text())
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr in names]


def test_no_import_cycle():
    graph = grimp.build_graph("lenskit")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and not imported.startswith(module + ".") and not module.startswith(imported + "."):
                back = graph.find_shortest_chain(importer=imported, imported=module)
                if back:
                    cycles.append((module, *back))
    assert not cycles, cycles[:5]


def test_user_input_becomes_tokens_in_one_module():
    """``to_tokens`` (TransformerLens' tokenizer entry) is called in tokens.py only; the zoo's own
    training and evaluation scripts tokenize their generated datasets themselves."""
    calls = {relative(p): attribute_uses(p, {"to_tokens"}) for p in modules()}
    outside = {
        name: lines for name, lines in calls.items() if lines and name != "tokens.py" and not name.startswith("zoo/")
    }
    assert not outside, outside


def test_the_unembedding_is_read_by_at_most_three_modules_outside_the_loaders():
    readers = {relative(p) for p in modules() if attribute_uses(p, {"W_U", "b_U", "unembed"})} - LOADERS
    assert len(readers) <= 3, readers
    assert "readout.py" in readers


@pytest.mark.parametrize("path", modules(), ids=relative)
def test_a_long_module_says_why_at_its_top(path):
    text = path.read_text()
    lines = len(text.splitlines())
    if lines > 500:
        docstring = (ast.get_docstring(ast.parse(text)) or "").lower()
        assert "long because" in docstring, f"{relative(path)} has {lines} lines and no reason in its docstring"
