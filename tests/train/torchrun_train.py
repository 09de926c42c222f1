"""Test scaffolding, run under torchrun: train through the product path (process group, Trainer and loop, as
``pyraflow train`` does), then write every rank's weight checksums so a test can compare the ranks.

    torchrun --nproc_per_node=2 tests/train/torchrun_train.py OUT [KEY=VALUE ...]

With FAIL_RANK=r and FAIL_STEP=s in the environment, rank r raises RuntimeError("injected failure") at step s.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pyraflow.config import load_config
from pyraflow.train import Trainer, train
from pyraflow.train.parallelize import full_tensor, process_group


def inject_failure(trainer: Trainer) -> None:
    if int(os.environ.get("FAIL_RANK", "-1")) != trainer.info.rank:
        return
    fail_at, step = int(os.environ["FAIL_STEP"]), trainer.train_step

    def failing_step():
        if trainer.step + 1 == fail_at:
            raise RuntimeError("injected failure")
        return step()

    trainer.train_step = failing_step


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    config = load_config(None, overrides)
    with process_group(config.train.collective_timeout_minutes) as info:
        train_and_check(config, out, info)  # its trainer is gone before the group is


def train_and_check(config, out: Path, info) -> None:
    trainer = Trainer(config, out, progress=False, info=info)
    inject_failure(trainer)
    train(trainer)
    local = [full_tensor(p).detach().double() for p in trainer.params]
    mine = torch.tensor([sum(float(t.sum()) for t in local), sum(float(t.square().sum()) for t in local)],
                        dtype=torch.float64, device=info.device)
    gathered = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(gathered, mine)
    if info.is_main:
        (out / "rank_checksums.json").write_text(json.dumps([g.cpu().tolist() for g in gathered]))

if __name__ == "__main__":
    main()
