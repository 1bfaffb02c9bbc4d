"""Imports flow downward: spec <- kernel <- registry <- select <- graph_pass; backends never
import graph_pass (they write nodes with emit.py)."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "qlinear_pass"

#: module -> package modules it must not import (directly, at any level)
FORBIDDEN = {
    "spec": {"kernel", "registry", "select", "graph_pass", "patterns", "emit", "compile", "report"},
    "kernel": {"registry", "select", "graph_pass", "patterns", "compile", "report"},
    "registry": {"select", "graph_pass", "patterns", "emit", "compile", "report"},
    "select": {"graph_pass", "patterns", "emit", "compile", "report"},
    "emit": {"graph_pass", "select", "registry", "compile", "report"},
}


def _nodes(tree):
    """Every node but those inside a module-level ``__getattr__`` (registry.py's lazy old import paths)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            continue
        yield from ast.walk(node)


def _imports(path: pathlib.Path) -> set:
    found = set()
    for node in _nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            parts = (node.module or "").split(".")
            if parts[0]:
                found.add(parts[0])
            else:
                found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlinear_pass."):
            found.add(node.module.split(".")[1])
    return found


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_core_modules_import_downward(module):
    assert not (_imports(PKG / f"{module}.py") & FORBIDDEN[module])


@pytest.mark.parametrize("path", sorted((PKG / "backends").glob("*.py")), ids=lambda p: p.name)
def test_backends_do_not_import_the_pass(path):
    assert not (_imports(path) & {"graph_pass", "compile", "report", "patterns"})
