"""The package's layout: the import-linter contracts in pyproject.toml hold, and they fail when broken (ARCHITECTURE.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"

pytest.importorskip("importlinter")


def lint_imports(package_root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with this repository's contracts, on the package found under ``package_root``."""
    return subprocess.run([sys.executable, "-c", LINT, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=package_root,
                          env={"PYTHONPATH": str(package_root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)


def test_the_layout_keeps_its_contracts():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in result.stdout and len(CONTRACTS) == len(BREAKS)


# An import each rule forbids, written inside a function (where heavy imports live), in a copy of the package.
BREAKS = {
    "no import cycle": ("errors.py", "from street2shop import cli"),
    "the contract names things": ("contract.py", "import tensorflow"),
    "the index knows nothing of models": ("index/base.py", "from street2shop.model import tower"),
    "serving knows nothing of export": ("serving/codec.py", "from street2shop import export"),
    "data knows nothing of models or training": ("data/records.py", "from street2shop import train"),
    "embedders know nothing of the index": ("embedders.py", "from street2shop.index import ranking"),
    "nothing but the service itself and the command line imports the service": ("search.py", "from street2shop.service import app"),
}


@pytest.fixture(scope="module")
def broken_copies(tmp_path_factory):
    """Two copies of the package: one with a circle (errors → cli), one breaking each of the other rules once."""
    copies = {}
    for name, rules in (("circle", ["no import cycle"]), ("upward", [r for r in BREAKS if r != "no import cycle"])):
        root = tmp_path_factory.mktemp(name)
        shutil.copytree(ROOT / "street2shop", root / "street2shop", ignore=shutil.ignore_patterns("__pycache__", "static"))
        for i, rule in enumerate(rules):
            path, line = BREAKS[rule]
            with open(root / "street2shop" / path, "a") as f:
                f.write(f"\n\ndef _breaks_a_rule_{i}():\n    {line}  # noqa: F401\n")
        copies[name] = lint_imports(root)
    return copies


@pytest.mark.parametrize("rule", list(BREAKS))
def test_each_contract_fails_when_broken(broken_copies, rule):
    result = broken_copies["circle" if rule == "no import cycle" else "upward"]
    assert result.returncode != 0
    (name,) = [c["name"] for c in CONTRACTS if c["name"].startswith(rule)]
    assert f"{name} BROKEN" in " ".join(result.stdout.split()), result.stdout
    if rule != "no import cycle":  # the report names the import that broke it
        path, line = BREAKS[rule]
        module = "street2shop." + path.removesuffix(".py").replace("/", ".")
        assert f"{module} -> " in result.stdout, result.stdout


def test_the_contract_imports_no_tensorflow():
    code = "import sys, street2shop.contract; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
