"""Layers point one way: import-linter (``lint-imports``, the contracts in ``.importlinter``) checks
every import of the package, those inside functions included, and a broken contract fails here with
the tool's own report (which import, along which chain)."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / ".importlinter"


def lint_imports(cwd: Path, config: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.is_file():
        exe = Path(shutil.which("lint-imports") or exe)
    if not exe.is_file():
        pytest.fail("lint-imports is not installed: pip install -e '.[test]' (it brings import-linter)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([str(exe), "--no-cache", "--no-logo", str(config)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    run = lint_imports(REPO, CONFIG)
    assert run.returncode == 0, f"lint-imports found broken contracts:\n{run.stdout}\n{run.stderr}"
    assert "0 broken" in run.stdout


def _layer_modules() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    layers = parser["importlinter:contract:layers"]["layers"]
    return {name.strip() for line in layers.splitlines() for name in line.replace(":", "|").split("|") if name.strip()}


def test_every_top_level_module_has_a_layer():
    """A module outside the layers contract is not checked at all: each one must be placed."""
    modules = {f"evomerge.{p.stem}" for p in (REPO / "evomerge").glob("*.py") if p.stem != "__init__"}
    modules |= {f"evomerge.{p.parent.name}" for p in (REPO / "evomerge").glob("*/__init__.py")}
    missing = sorted(modules - _layer_modules())
    assert not missing, (f"place these modules in the layers of {CONFIG.name} (below every module that "
                         f"imports them, above every module they import): {', '.join(missing)}")


def test_an_upward_import_inside_a_function_breaks_the_contract(tmp_path):
    """The check can fail: a lower layer importing a higher one, even lazily, is reported."""
    pkg = tmp_path / "toy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "high.py").write_text("from toy import low\n")
    (pkg / "low.py").write_text("def f():\n    from toy.high import low  # noqa\n")
    config = tmp_path / "contracts.ini"
    config.write_text("[importlinter]\nroot_package = toy\n\n[importlinter:contract:one]\nname = toy layers\n"
                      "type = layers\nlayers =\n    toy.high\n    toy.low\n")
    run = lint_imports(tmp_path, config)
    assert run.returncode != 0 and "BROKEN" in run.stdout, run.stdout + run.stderr
    assert "toy.low -> toy.high" in run.stdout
