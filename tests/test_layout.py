"""The package's layout: no import cycle, and the few rules that keep its layers apart (see ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "street2shop"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _under_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (inside functions too; not under TYPE_CHECKING)."""
    tree = ast.parse(MODULES[name].read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    is_package = MODULES[name].name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if _under_type_checking(node, parents):
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import module`` imports the module; ``from pkg import name`` the package.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target.startswith("street2shop") and target != name:
                found.add(target)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_cycle_it_is_shown():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None
    assert "street2shop.contract" in GRAPH["street2shop.serving.client"]  # it reads real imports


def test_no_import_cycle():
    # A package's __init__ re-exports its modules; a module reaching back to its own package's face is
    # how Python loads it, not a cycle of design, so those edges are left out.
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in GRAPH.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


@pytest.mark.parametrize(
    "lower, higher",
    [
        ("street2shop.contract", "street2shop."),  # the contract names things; it uses nothing but errors and fileio
        ("street2shop.index", "street2shop.model"),  # the index knows nothing of models
        ("street2shop.index", "street2shop.embedders"),
        ("street2shop.index", "street2shop.serving"),
        ("street2shop.serving", "street2shop.export"),  # serving knows nothing of export
        ("street2shop.data", "street2shop.model"),  # data knows nothing of models or training
        ("street2shop.data", "street2shop.train"),
        ("street2shop.embedders", "street2shop.index"),
        ("street2shop.index", "street2shop.service"),
        ("street2shop.search", "street2shop.service"),
        ("street2shop.embed", "street2shop.service"),
        ("street2shop.evaluate", "street2shop.service"),
    ],
)
def test_layers_keep_apart(lower, higher):
    allowed = {"street2shop.errors", "street2shop.fileio", "street2shop"} if lower == "street2shop.contract" else set()
    offending = {
        (name, target)
        for name, targets in GRAPH.items()
        if name == lower or name.startswith(lower + ".")
        for target in targets
        if target.startswith(higher) and target not in allowed and not target.startswith(lower)
    }
    assert not offending, offending


def test_the_contract_imports_no_tensorflow():
    code = "import sys, street2shop.contract; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
