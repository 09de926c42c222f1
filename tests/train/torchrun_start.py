"""Test scaffolding, run under torchrun: set a Trainer up (no step), then compare every rank's whole weights and EMA
with EXPECTED (a safetensors file) and write, per rank, the largest difference and the peak resident memory.

    torchrun --nproc_per_node=2 tests/train/torchrun_start.py OUT EXPECTED [KEY=VALUE ...]
"""

import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pyraflow.config import load_config
from pyraflow.train import Trainer
from pyraflow.train.parallelize import full_tensor, process_group
from pyraflow.weights import load_tensors


def main() -> None:
    out, expected_path, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    config = load_config(None, overrides)
    with process_group(config.train.collective_timeout_minutes) as info:
        compare(config, out, expected_path, info)  # its trainer is gone before the group is


def compare(config, out: Path, expected_path: Path, info) -> None:
    trainer = Trainer(config, out, progress=False, info=info)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    expected = load_tensors(expected_path)
    weights = {n: full_tensor(p).detach().cpu() for n, p in zip(trainer.names, trainer.params)}
    ema = {n: full_tensor(e).detach().cpu() for n, e in zip(trainer.names, trainer.ema)}
    compared = sorted(set(expected) & set(weights))
    mine = torch.tensor([max((weights[n] - expected[n]).abs().max().item() for n in compared),
                         max((ema[n] - expected[n]).abs().max().item() for n in compared),
                         len(compared), len(weights), peak_mb], dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(gathered, mine)
    trainer.close()
    if info.is_main:
        keys = ("weights_max_diff", "ema_max_diff", "compared", "trained", "peak_rss_mb")
        (out / "start.json").write_text(json.dumps([dict(zip(keys, g.tolist())) for g in gathered]))

if __name__ == "__main__":
    main()
