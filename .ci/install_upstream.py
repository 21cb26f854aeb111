"""Installs google/gemma_pytorch (import name `gemma`) into the running environment, if at hand.

tox runs this before the tests (tox.ini, commands_pre) so that tests/test_upstream.py checks the
built-in engine against upstream's own code instead of skipping. gemma_pytorch is on no package
registry, so the copy comes from a directory:
- $GEMMA_PYTORCH_SRC when set (it must then be a gemma_pytorch checkout: a wrong path is an error);
- else ../shared/upstream/gemma_pytorch beside the repository (the development machines' copy);
- else nothing is installed, and one line says that the parity tests will skip and how to run them.
`--no-deps` because upstream pins torch==2.6.0 (its setup.py); its other runtime needs (numpy,
sentencepiece, pillow) come with the project and its `test` extra. pip is given a temporary copy:
building in place writes build/ and gemma.egg-info into the source, and the shared copy on the
development machines is read-only.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = "GEMMA_PYTORCH_SRC"
BESIDE = ROOT.parent / "shared" / "upstream" / "gemma_pytorch"


def source(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The gemma_pytorch directory to install, or None when there is none."""
    named = environ.get(ENV)
    if named:
        path = Path(named)
        if not (path / "gemma" / "model.py").is_file():
            raise SystemExit(f"{ENV}={named} is not a google/gemma_pytorch checkout "
                             f"(no gemma/model.py there)")
        return path
    return BESIDE if (BESIDE / "gemma" / "model.py").is_file() else None


def main() -> int:
    path = source()
    if path is None:
        print(f"google/gemma_pytorch not found: the upstream parity tests (tests/test_upstream.py) "
              f"will skip; to run them, set {ENV} to a clone of "
              f"https://github.com/google/gemma_pytorch")
        return 0
    print(f"installing google/gemma_pytorch from {path} (--no-deps) for the parity tests")
    with tempfile.TemporaryDirectory(prefix="gemma-pytorch-") as tmp:
        copy = Path(tmp) / "gemma_pytorch"
        writable_copy(path, copy)
        return subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                str(copy)])


def writable_copy(src: Path, dst: Path) -> None:
    """Copies the source files without their modes (shutil.copytree would keep a read-only copy
    read-only) and without earlier build output (build/, *.egg-info) or .git."""
    for file in sorted(src.rglob("*")):
        parts = file.relative_to(src).parts
        if not file.is_file() or parts[0] in ("build", ".git") or any(
                part.endswith(".egg-info") for part in parts):
            continue
        target = dst.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)


if __name__ == "__main__":
    sys.exit(main())
