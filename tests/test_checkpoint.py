"""Checkpoints are published whole or not at all."""

import pytest

from pyraflow.checkpoint import REQUIRED, write_checkpoint


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_latest(tmp_path):
    def good(directory):
        for name in REQUIRED:
            (directory / name).write_text("x")

    def crash(directory):
        (directory / "config.json").write_text("partial")
        raise OSError("disk full")

    write_checkpoint(tmp_path, 1, good, keep=3)
    with pytest.raises(OSError):
        write_checkpoint(tmp_path, 2, crash, keep=3)
    assert (tmp_path / "checkpoints" / "latest").resolve().name == "step-1"
    assert not (tmp_path / "checkpoints" / "step-2").exists()
