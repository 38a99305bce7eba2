"""Layers point one way: the evaluation layer imports neither the workers nor the search, and the
workers do not import the search (read from the modules' own import statements)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "evomerge"


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` in ``path`` names (at any depth of the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("layer, forbidden", [("evaluate", ("evomerge.search", "evomerge.workers")),
                                              ("workers", ("evomerge.search",))])
def test_a_layer_does_not_import_the_ones_above(layer, forbidden):
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for mod in imported_modules(path):
            if mod.startswith(forbidden):
                bad.append(f"{path.relative_to(PKG.parent)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from evomerge.search.space import load_space\n")
    assert "evomerge.search.space" in imported_modules(f)
