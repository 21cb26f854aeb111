"""The architecture is enforced, not only described: import-linter's contracts (pyproject.toml,
run by `tox -e lint`) hold on this tree, fail on a tree with an import against the flow, and the
package has no import cycle."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
grimp = pytest.importorskip("grimp", reason="import-linter (pip install import-linter) is absent")


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """import-linter's command on the package under `tree` (what `tox -e lint` runs)."""
    command = Path(sys.executable).with_name("lint-imports")
    if not command.exists():
        pytest.skip(f"import-linter's lint-imports is not beside {sys.executable}")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(command), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
                          cwd=tree, env=env, capture_output=True, text=True)


def _copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "fuzz", tmp_path / "fuzz",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_contracts_hold_on_this_tree(tmp_path):
    result = _lint_imports(_copy_of_the_package(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "forbidden"), [
    ("fuzz/verdict.py", "fuzz.cli"),  # the records at the bottom import a command
    ("fuzz/session.py", "fuzz.corpus"),  # running a model imports the store
    ("fuzz/search/misses.py", "fuzz.report"),  # the search imports the report
    ("fuzz/engine/upstream/engine.py", "fuzz.engine.transformers.engine"),
])
def test_an_import_against_the_flow_breaks_a_contract(tmp_path, module, forbidden):
    tree = _copy_of_the_package(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\nimport {forbidden}  # noqa: E402, F401\n")
    result = _lint_imports(tree)
    assert result.returncode != 0
    importer = module.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> {forbidden}" in result.stdout.replace("(l.", " (l.")


def test_no_module_imports_itself_through_others():
    sys.path.insert(0, str(ROOT))
    try:
        graph = grimp.build_graph("fuzz")
    finally:
        sys.path.remove(str(ROOT))
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(importer=imported, imported=module):
                cycles.append(f"{module} -> {imported} -> ... -> {module}")
    assert not cycles, "\n".join(cycles)
