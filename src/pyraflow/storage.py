"""Files written whole or not at all: every artefact pyraflow writes (weights, caches, pictures, JSON) goes
through ``atomic_path``, so a reader, or a run resumed after a crash, never sees half a file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

PARTIAL = ".partial"  # infix of files being written; a crash can leave them behind, and they are never read


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is published: same folder, same suffix (writers such as Pillow pick
    the format from it)."""
    return path.with_name(f"{path.stem}{PARTIAL}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path`` in one rename, on failure it is
    removed. Works for files and for directories (an existing directory at ``path`` is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    if tmp.is_file():
        os.chmod(tmp, 0o644)  # some writers (safetensors) create their files readable by the owner only
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, payload) -> None:
    write_text(path, json.dumps(payload, indent=2))


def remove_partials(folder: Path) -> None:
    """Delete what writers interrupted by a crash left in ``folder``."""
    for stale in folder.glob(f"*{PARTIAL}*"):
        _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
