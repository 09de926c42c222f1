"""``pyraflow bench --startup``: each rank's host memory while a sharded (FSDP2) run sets up from a stored model,
and while it saves a checkpoint.

A model directory of pyraflow's MMDiT at about 218 M parameters (width 1024, 6 blocks; 833 MB in fp32) is written
with random weights, tensor by tensor; then ``torchrun --nproc_per_node=RANKS`` runs this module as a script: every
rank sets up a Trainer with ``train.init_from`` = that directory and ``train.parallel=fsdp`` and reports its peak
resident set (VmHWM) once set up. The same with a tiny model gives what a rank holds besides the model (torch,
data, text encoder), so the difference is what the model costs a rank: its shard of the weights and of the EMA
(half of 2 x the fp32 model on 2 ranks) when it reads only its own rows, one more whole model when it builds it
first. The large model is also set up fresh (no init_from), each rank drawing only its own rows' initial values.
Each run then trains a step and saves a checkpoint, and reports the save's peak RSS above the rank's RSS
before it: rank 0 writes the weights, the EMA and AdamW's two moments (four fp32 models in all)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LARGE = ["model.width=1024", "model.depth=6", "model.num_heads=16"]
TINY = ["model.width=64", "model.depth=2", "model.num_heads=2"]
RUN = ["train.parallel=fsdp", "train.steps=1", "batching.token_budget=400", "train.sample_every=0", "data.num_samples=512"]


def write_random_model(directory: Path, overrides: list[str]) -> int:
    """A model directory of random weights for ``overrides``' model, written one tensor at a time; its parameter count."""
    import torch

    from pyraflow.archs import build_model
    from pyraflow.config import load_config
    from pyraflow.weights import write_model_config, write_weights

    config = load_config(None, overrides)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in build_model(config.model).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    write_weights(((name, torch.randn(shape, generator=generator) * 0.02) for name, shape in shapes.items()), directory)
    write_model_config(directory, config.model)
    return sum(shape.numel() for shape in shapes.values())


def launch(root: Path, ranks: int, overrides: list[str], timeout: int = 1200) -> list[dict]:
    """Each rank's figures (_set_up_train_and_save) from a torchrun job with ``overrides``."""
    out = root / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
               str(out), *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"the torchrun job failed ({result.returncode}): {result.stderr[-2000:]}")
    return json.loads((out / "ranks.json").read_text())


def startup_memory(ranks: int = 2, directory: str | Path | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    result = {"ranks": ranks, "run": RUN, "measure": "VmHWM of each rank once its Trainer is set up; after one step, "
              "the peak RSS while it saves a checkpoint above its RSS before the save"}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        for name, model in tqdm((("tiny", TINY), ("large", LARGE)), desc="bench startup", disable=not progress):
            root = Path(tmp) / name
            parameters = write_random_model(root / "model", RUN + model)
            reports = launch(root, ranks, RUN + model + [f"train.init_from={root / 'model'}"])
            result[name] = {"model": model, "parameters": parameters, "fp32_model_mb": 4 * parameters / 2**20,
                            "peak_rss_mb": [r["set_up_peak_mb"] for r in reports],
                            "save_mb": [r["save_mb"] for r in reports]}
        if progress:
            print("bench startup: the large model initialised fresh (no train.init_from)", flush=True)
        reports = launch(Path(tmp) / "fresh", ranks, RUN + LARGE)
        result["fresh"] = {"model": LARGE, "peak_rss_mb": [r["set_up_peak_mb"] for r in reports],
                           "save_mb": [r["save_mb"] for r in reports]}
    large, tiny = result["large"], result["tiny"]
    result["model_cost_mb"] = [a - b for a, b in zip(large["peak_rss_mb"], tiny["peak_rss_mb"])]
    result["fresh_model_cost_mb"] = [a - b for a, b in zip(result["fresh"]["peak_rss_mb"], tiny["peak_rss_mb"])]
    result["model_cost_in_fp32_models"] = [c / large["fp32_model_mb"] for c in result["model_cost_mb"]]
    result["save_in_fp32_models"] = [None if c is None else c / large["fp32_model_mb"] for c in large["save_mb"]]
    return result


def format_startup(result: dict) -> str:
    large = result["large"]
    lines = [f"set-up of a {result['ranks']}-rank FSDP2 run from a {large['parameters'] / 1e6:.0f} M-parameter model "
             f"({large['fp32_model_mb']:.0f} MB in fp32), peak RSS per rank:"]
    for rank, (big, small, cost) in enumerate(zip(large["peak_rss_mb"], result["tiny"]["peak_rss_mb"], result["model_cost_mb"])):
        lines.append(f"  rank {rank}: {big:,.0f} MB ({small:,.0f} MB with a tiny model): the model costs {cost:,.0f} MB "
                     f"= {cost / large['fp32_model_mb']:.2f} fp32 models")
    for rank, (peak, cost) in enumerate(zip(result["fresh"]["peak_rss_mb"], result["fresh_model_cost_mb"])):
        lines.append(f"  rank {rank}, the same model initialised fresh: {peak:,.0f} MB: the model costs {cost:,.0f} MB "
                     f"= {cost / large['fp32_model_mb']:.2f} fp32 models")
    for rank, save in enumerate(large["save_mb"]):
        lines.append(f"  rank {rank}, saving a checkpoint after one step: " + (
            "not measured (the kernel refused to reset the peak)" if save is None else
            f"{save:,.0f} MB above its RSS before = {save / large['fp32_model_mb']:.2f} fp32 models"))
    return "\n".join(lines)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def _set_up_train_and_save(config, out: Path, info) -> dict:
    """One rank's figures: its peak RSS once set up, then, after one step, the peak RSS while it saves a checkpoint
    above its RSS before (the peak is reset through /proc/self/clear_refs; None where the kernel refuses)."""
    from pyraflow.train import Trainer

    trainer = Trainer(config, out, progress=False, info=info)
    set_up_peak = _status_mb("VmHWM")
    trainer.train_step()
    before = _status_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    trainer.save()
    trainer.close()
    return {"set_up_peak_mb": set_up_peak, "save_mb": _status_mb("VmHWM") - before if reset else None}


def _rank_main() -> None:
    """Under torchrun: set a Trainer up, train a step and save, then rank 0 writes every rank's figures. Imports
    only what any pyraflow version has, so the same script measures an older checkout (PYTHONPATH) for comparison."""
    import torch.distributed as dist

    from pyraflow.config import load_config
    from pyraflow.train.parallelize import process_group

    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    config = load_config(None, overrides)
    with process_group() as info:
        report = _set_up_train_and_save(config, out, info)  # its trainer is gone before the group is
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, report)
        if info.is_main:
            (out / "ranks.json").write_text(json.dumps(gathered))


if __name__ == "__main__":
    _rank_main()
