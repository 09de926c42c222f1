"""Shared test set-up. This folder is on sys.path (pytest's prepend import mode puts a conftest's folder there),
so tests in sub-folders import ``helpers``."""

import pytest

from helpers import reference_varlen


@pytest.fixture()
def flash_on_cpu(monkeypatch):
    """Let the model use the flash backend off-GPU: flash-attn's varlen kernel replaced by its contract in plain
    torch, so the index layout that feeds the kernel is what the tests check."""
    import pyraflow.attention as attention

    monkeypatch.setattr(attention, "flash_available", lambda: True)
    monkeypatch.setattr(attention, "_flash_varlen", reference_varlen)
