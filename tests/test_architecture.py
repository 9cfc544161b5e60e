"""The house rules that a reviewer would otherwise have to check by eye: imports flow one way along
the pipeline (the import-linter contract in pyproject.toml), nothing switches a global setting at
import, and no module grows past a reader's sitting without saying why."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "crossmodalnet"


def _lint(root: Path, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", str(config)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_imports_flow_down_the_pipeline():
    result = _lint(REPO, REPO / "pyproject.toml")
    assert result.returncode == 0, result.stdout[-2000:]
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, upward", [
    ("data/io.py", "crossmodalnet.train.engine"),  # a lower stage reaching up
    ("train/losses.py", "crossmodalnet.infer"),  # the old infer <-> train cycle
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    copy = tmp_path / "crossmodalnet"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    # Inside a function, as the old code hid them: the contract sees those too.
    target.write_text(target.read_text() + f"\n\ndef _sneaky():\n    import {upward}  # noqa\n")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    result = _lint(tmp_path, tmp_path / "pyproject.toml")
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and upward in result.stdout


def test_no_backend_switch_or_umask_at_import_or_in_library_calls():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = getattr(node.func.value, "id", "")
                if (owner, node.func.attr) in {("matplotlib", "use"), ("os", "umask"), ("plt", "switch_backend")}:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_function_local_imports_of_the_package_are_only_the_clis_lazy_commands():
    # A function-local import of our own modules hides a dependency from the contract's reader; the
    # CLI's are deliberate (each command loads its stage on use, so `--help` answers without torch).
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("crossmodalnet"):
                        found.append(str(path.relative_to(PACKAGE)))
    assert set(found) <= {"cli.py"}, sorted(set(found))


def test_files_stay_readable_in_one_sitting():
    long = []
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]:
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > 420 and "one idea" not in doc.lower():
            long.append(f"{path.relative_to(REPO)} ({text.count(chr(10))} lines)")
    assert long == []
