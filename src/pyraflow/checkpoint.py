"""Checkpoints: written whole or not at all, found again by run directory or by path.

  RUN/checkpoints/step-N/   config.json + model.safetensors (a model directory: pyraflow.weights, archs.load_model),
                            ema.safetensors, null_text.safetensors, run.yaml (the full config),
                            trainer.pt (LR schedule, batcher position, stage mix, counters, precision),
                            optimizer.safetensors (the AdamW state, "<parameter>.<key>"; each rank of a sharded run
                            reads only its rows), its parameter groups in trainer.pt
  RUN/checkpoints/latest -> step-N   a symlink, replaced atomically

A checkpoint is assembled in a temporary directory and renamed into place (pyraflow.storage); ``latest`` is
moved with an atomic symlink replace. A crash at any moment leaves the previous ``latest`` intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from pyraflow.storage import atomic_path, remove_partials
from pyraflow.weights import CONFIG, EMA, MODEL, NULL_TEXT, OPTIMIZER

LEGACY_OPTIMIZER = "optimizer.pt"  # the older format: the whole AdamW state in one pickle, read whole by rank 0
RESUMES = (CONFIG, MODEL, EMA, NULL_TEXT, "run.yaml", "trainer.pt")  # and one of the two optimizer files
REQUIRED = RESUMES + (OPTIMIZER,)  # what a checkpoint is written with
SAMPLING = (CONFIG, EMA, NULL_TEXT, "run.yaml")  # what sampling needs


def write_checkpoint(run_dir: Path, step: int, writer, keep: int) -> Path:
    """Call ``writer(tmp_dir)`` to fill a fresh directory, then publish it as step-N and latest."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_partials(root)  # left by a run that died while writing
    final = root / f"step-{step}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        writer(tmp)
        for name in REQUIRED:
            assert (tmp / name).is_file(), f"checkpoint writer did not produce {name}"
    with atomic_path(root / "latest") as link:
        os.symlink(final.name, link)
    steps = sorted((int(p.name.split("-")[1]) for p in root.glob("step-*") if p.name.split("-")[1].isdigit()))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path, needs: tuple[str, ...] = RESUMES) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint directory -> a checkpoint directory holding ``needs``
    (everything a resume reads by default; SAMPLING for sampling)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory made by 'pyraflow train' or a checkpoint in it.")
    if (path / "checkpoints").is_dir():
        latest = path / "checkpoints" / "latest"
        if not latest.exists():
            raise FileNotFoundError(f"{path} has no finished checkpoint yet ({latest} is missing); train longer or pick a step-N directory.")
        path = latest.resolve()
    missing = [name for name in needs if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a complete pyraflow checkpoint: missing {', '.join(missing)}. "
            "Pass a run directory or a checkpoints/step-N directory written by 'pyraflow train'."
        )
    return path


def load_trainer_state(path: Path, name: str = "trainer.pt") -> dict:
    try:
        return torch.load(path / name, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{path / name} cannot be read ({err}); the checkpoint is corrupt, use an earlier step-N.") from err
