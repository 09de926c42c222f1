"""``pyraflow train``: the loop around the Trainer, writing checkpoints, metrics, sample grids and a loss plot."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from pyraflow.config import Config
from pyraflow.storage import write_json
from pyraflow.train.parallelize import DistributedInfo, barrier, gather_objects, main_says, process_group
from pyraflow.train.trainer import Trainer, TrainingStopped

log = logging.getLogger("pyraflow.train")


def sample_prompts(trainer: Trainer) -> list[str]:
    """Prompts of the grids written during training: the configured ones, the ten digits for mnist, or up to
    eight of the dataset's captions."""
    from pyraflow.data import caption_for_digit

    if trainer.config.sample.prompts:
        return list(trainer.config.sample.prompts)
    if trainer.config.data.dataset == "mnist":
        return [caption_for_digit(d) for d in range(10)]
    return sorted(trainer.data.first_captions(8))


def run_training(config: Config, out_dir: str | Path | None = None, resume: bool = False,
                 max_steps: int | None = None, progress: bool = True) -> dict:
    """Train to train.steps (or max_steps), writing checkpoints, metrics, grids and a loss plot. Under torchrun the
    run owns its process group and tears it down however it ends."""
    if out_dir is None:
        out_dir = Path("runs") / f"{config.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    with process_group(config.train.collective_timeout_minutes) as info:
        return _build_and_train(config, Path(out_dir), resume, max_steps, progress, info)


def _build_and_train(config: Config, out_dir: Path, resume: bool, max_steps: int | None, progress: bool,
                     info: DistributedInfo) -> dict:
    """Build a Trainer and train it; the trainer is dropped when this returns, before the process group goes."""
    trainer = Trainer(config, out_dir, resume=resume, progress=progress, info=info)
    try:
        return train(trainer, max_steps)
    finally:
        trainer.close()


def train(trainer: Trainer, max_steps: int | None = None) -> dict:
    """Run a Trainer to train.steps (or max_steps); returns the run's summary."""
    from tqdm import tqdm

    from pyraflow.reporting import MetricsLog, plot_losses

    config = trainer.config
    tc, info, out = config.train, trainer.info, trainer.out
    target = max_steps if max_steps is not None else tc.steps
    metrics = MetricsLog(out, trainer.step) if info.is_main else None
    if info.is_main:
        images = "" if trainer.images is None else f" + {len(trainer.images)} images from {config.video.image_dataset}"
        log.info("run directory %s (precision %s, %d samples%s)", out, trainer.precision, len(trainer.data), images)
    started = time.perf_counter()
    bar = tqdm(total=target, initial=trainer.step, desc="train", unit="step", disable=not trainer.progress)
    last_saved = trainer.step
    try:
        while trainer.step < target:
            m = trainer.train_step()
            step = trainer.step
            bar.update(1)
            # the device is read only here, at logging steps (and for an adaptive mix), never inside the step
            if step % tc.log_every == 0 or step == target:
                m = trainer.read_metrics(m)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
                if metrics:
                    metrics.log(m)
                if m["worst_bad_run"] >= tc.max_bad_steps:
                    trainer.save()
                    raise TrainingStopped(
                        f"{m['worst_bad_run']} steps in a row had a non-finite loss or gradient (seen at step {step}); "
                        f"state saved in {out}/checkpoints/latest. Lower train.lr, raise train.warmup_steps or check "
                        "the data, then continue with --resume."
                    )
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                trainer.save()
                last_saved = step
            if tc.sample_every and step % tc.sample_every == 0 and step != target:
                write_training_grid(trainer, out / "samples" / f"step-{step:06d}.png")
            if tc.time_limit_minutes and _out_of_time(trainer, started, tc.time_limit_minutes, step % tc.log_every == 0):
                break
    finally:
        bar.close()
        if metrics:
            metrics.close()
    trainer.close()  # the loader's workers are done before the final grid
    if last_saved != trainer.step:
        trainer.save()
    timings = write_training_grid(trainer, out / "samples" / f"step-{trainer.step:06d}.png")
    summary = {"run_dir": str(out), "steps": trainer.step, "seconds": time.perf_counter() - started,
               "precision": trainer.precision, "compiled": trainer.model.compiled, "bad_steps": int(trainer.bad_steps),
               "sample_seconds_per_stage": timings}
    if info.is_main:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        write_json(out / "summary.json", summary)
    return summary


def _out_of_time(trainer: Trainer, started: float, minutes: float, logging_step: bool) -> bool:
    """Whether the time limit is reached. A single process reads its clock every step; under torchrun every rank
    follows rank 0's clock, agreed by a broadcast (which waits for the device) at logging steps only."""
    late = time.perf_counter() - started > 60 * minutes
    if not trainer.info.enabled:
        return late
    if not logging_step:
        return False
    return main_says(late, trainer.info)


def grid_sizes(trainer: Trainer) -> list[tuple[str, tuple[int, int] | None]]:
    """(file suffix, (height, width)) of the grids a run writes: its one size, or, with aspect buckets, the most
    portrait, the squarest and the most landscape bucket."""
    buckets = trainer.buckets
    if len(buckets) == 1 or not trainer.config.data.bucketed:
        return [("", None)]
    portrait = min(buckets, key=lambda b: b.aspect)
    square = min(buckets, key=lambda b: abs(math.log(b.aspect)))
    landscape = max(buckets, key=lambda b: b.aspect)
    chosen = list(dict.fromkeys([portrait, square, landscape]))
    return [(f"-{b.height}x{b.width}", (b.height, b.width)) for b in chosen]


def write_training_grid(trainer: Trainer, path: Path) -> list[float] | None:
    """Sample grids from the EMA weights on the training device (one per grid size). Under torchrun the rows are
    spread over the ranks (each samples its share with seed + rank) and rank 0 writes the grid, so no rank waits on
    another for long. Returns seconds per stage (of rank 0's share of the first grid) on rank 0."""
    from pyraflow.media import write_grid
    from pyraflow.sample import Pipeline

    info, sc = trainer.info, trainer.config.sample
    if not trainer.latent_space.can_decode:
        if info.is_main:
            log.warning("no sample grid at %s: the latent space cannot decode (latent.path is not set)", path.name)
        return None
    model = trainer.ema_model()  # collective under FSDP, so every rank builds it
    prompts = sample_prompts(trainer)
    rows = [p for p in prompts for _ in range(sc.per_prompt)]
    share = rows[info.rank :: info.world_size]
    pipeline = Pipeline(trainer.config, model, trainer.schedule, trainer.text_encoder, trainer.latent_space, trainer.null)
    first = None
    for suffix, size in grid_sizes(trainer):
        pixels, timings = pipeline.generate(share, sc.seed + info.rank, size=size) if share else (None, None)
        first = timings if first is None else first
        if info.enabled:
            gathered = gather_objects(pixels, info)
            if info.is_main:
                pixels = torch.empty(len(rows), *gathered[0].shape[1:])
                for rank, part in enumerate(gathered):
                    if part is not None:
                        pixels[rank :: info.world_size] = part
        if info.is_main:
            write_grid(pixels, path.with_name(path.stem + suffix + path.suffix), rows=len(prompts))
    barrier(info)
    return first if info.is_main else None
