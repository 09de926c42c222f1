"""Shared test set-up. This folder is on sys.path (pytest's prepend import mode puts a conftest's folder there),
so tests in sub-folders import ``helpers``.

Tests run eager (``compile: auto`` then finds PYRAFLOW_NO_COMPILE=1 and says so), also in the processes they start,
because compiling every tiny model would cost tens of seconds a test; tests of compilation ask for the
``compiling`` fixture."""

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
