"""Shared test set-up. This folder is on sys.path (pytest's prepend import mode puts a conftest's folder there),
so tests in sub-folders import ``helpers``.

Tests run eager (``compile: auto`` then finds PYRAFLOW_NO_COMPILE=1 and says so), also in the processes they start,
because compiling every tiny model would cost tens of seconds a test; tests of compilation ask for the
``compiling`` fixture."""

import json
import os

import pytest

from helpers import reference_varlen

os.environ["PYRAFLOW_NO_COMPILE"] = "1"


@pytest.fixture()
def compiling(monkeypatch):
    """Compilation allowed for this test (and dynamo's caches reset after it)."""
    import torch._dynamo

    monkeypatch.delenv("PYRAFLOW_NO_COMPILE")
    yield
    torch._dynamo.reset()


@pytest.fixture()
def flash_on_cpu(monkeypatch):
    """Let the model use the flash backend off-GPU: flash-attn's varlen kernel replaced by its contract in plain
    torch, so the index layout that feeds the kernel is what the tests check."""
    import pyraflow.attention as attention

    monkeypatch.setattr(attention, "flash_available", lambda: True)
    monkeypatch.setattr(attention, "_flash_varlen", reference_varlen)


PARITY: dict[str, dict] = {}  # fixture case -> its largest |difference| from the reference's recorded output


@pytest.fixture()
def parity():
    """``parity(case, ours, reference, tolerance)``: assert a result matches the reference's recorded one within the
    tolerance, and record the largest |difference| per case. With PYRAFLOW_PARITY=<file.json> the session writes
    the records there (benchmarks/parity.sh: the parity table in BENCHMARKS.md)."""

    def check(case: str, ours, reference, tolerance: float = 1e-4) -> float:
        assert tuple(ours.shape) == tuple(reference.shape), (case, tuple(ours.shape), tuple(reference.shape))
        gap = (ours.double() - reference.double()).abs().max().item()
        entry = PARITY.setdefault(case, {"max_abs_diff": 0.0, "tolerance": tolerance})
        entry["max_abs_diff"] = max(entry["max_abs_diff"], gap)
        assert gap < tolerance, f"{case}: max |diff| {gap:.2e}, tolerance {tolerance:.0e}"
        return gap

    return check


def pytest_sessionfinish(session):
    path = os.environ.get("PYRAFLOW_PARITY")
    if path and PARITY:
        with open(path, "w") as handle:
            json.dump(dict(sorted(PARITY.items())), handle, indent=2)
