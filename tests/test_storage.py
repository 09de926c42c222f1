"""Files and folders written whole or not at all (pyraflow.storage)."""

import os

import pytest

from pyraflow.storage import atomic_path, partial_path, remove_partials, write_json


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"steps": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"steps": ')
            raise RuntimeError("crash half-way")
    assert target.read_text() == '{\n  "steps": 1\n}'
    assert list(tmp_path.iterdir()) == [target]


def test_a_folder_is_replaced_in_one_rename(tmp_path):
    target = tmp_path / "step-10"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("old")
    with atomic_path(target) as tmp:
        assert not tmp.exists() and (target / "a").read_text() == "old"  # the old folder stays readable meanwhile
        tmp.mkdir()
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_published_files_are_readable_by_others_and_partials_are_swept(tmp_path):
    with atomic_path(tmp_path / "w.bin") as tmp:
        tmp.write_bytes(b"x")
        os.chmod(tmp, 0o600)  # as safetensors creates its files
    assert (tmp_path / "w.bin").stat().st_mode & 0o777 == 0o644
    stale = partial_path(tmp_path / "model.safetensors")
    stale.write_bytes(b"half")
    assert stale.name == "model.partial.safetensors"
    remove_partials(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]
