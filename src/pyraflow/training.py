"""``pyraflow train``: the training loop, from encoded data to checkpoints, metrics and sample grids.

Data flows one way: encoded data -> TokenBudgetBatcher (which samples, which stage) -> schedule
(inputs and velocity targets per stage) -> pack -> model -> loss. Every sample counts equally in the
loss (mean squared error per sample, averaged over samples), matching a stage mix counted in samples.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pyraflow.batching import TokenBudgetBatcher
from pyraflow.checkpoint import load_tensors, load_trainer_state, resolve_checkpoint, save_tensors, write_checkpoint
from pyraflow.config import Config, load_config, to_yaml
from pyraflow.model import MultiStageMMDiT
from pyraflow.packing import Sample, pack, patchify
from pyraflow.sampling import Pipeline
from pyraflow.parallelize import DistributedInfo, barrier, full_tensor, init_distributed, parallelize, unwrap
from pyraflow.schedule import PyramidSchedule
from pyraflow.video import example_classes, unit_spans, unit_training_samples

log = logging.getLogger("pyraflow.train")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of a training run."""

    steps: int = 1000
    """Optimizer steps in the run."""
    lr: float = 3e-4
    warmup_steps: int = 100
    """Linear learning-rate warmup from 0."""
    lr_schedule: str = "constant"
    """After warmup: ``constant``, or ``cosine`` decay to lr * min_lr_ratio at train.steps (on the MNIST demo
    cosine measured worse: FID 1062 / 93.5% digit accuracy against 967 / 97.0% for constant)."""
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    grad_accum: int = 1
    """Batches (each one token budget) per optimizer step."""
    precision: str = "auto"
    """``fp32``, ``bf16`` (autocast, fp32 master weights) or ``auto``: bf16 on CUDA; on CPU whichever runs
    a matmul of the model's width faster on this machine (CPUs without AMX are often faster in fp32)."""
    ema_decay: float = 0.995
    """EMA decay per step (0.995 averages over ~200 steps, right for the short demo; long runs use 0.9999)."""
    ema_warmup_steps: int = 100
    """The decay ramps linearly from 0 to ema_decay over these steps, so the EMA starts as the model itself."""
    text_dropout: float = 0.1
    """Probability of replacing a caption by the null embedding (for classifier-free guidance)."""
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500
    """Write a sample grid every this many steps (and at the end); 0 disables the intermediate ones."""
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    max_bad_steps: int = 5
    """Consecutive steps with a non-finite loss or gradient after which the run saves and stops."""
    parallel: str = "ddp"
    """Data parallelism under torchrun: ``ddp`` or ``fsdp`` (FSDP2 fully_shard)."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    time_limit_minutes: float | None = None
    """Stop (with a checkpoint) once training has run this long, even before train.steps: equal-compute runs."""

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1.")
        for name in ("warmup_steps", "ema_warmup_steps", "sample_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 0.")
        if self.lr <= 0:
            raise ValueError(f"train.lr={self.lr} must be > 0.")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay={self.ema_decay} must be in [0, 1).")
        if not 0 <= self.text_dropout < 1:
            raise ValueError(f"train.text_dropout={self.text_dropout} must be in [0, 1).")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"train.lr_schedule={self.lr_schedule!r} must be constant or cosine.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision={self.precision!r} must be auto, fp32 or bf16.")
        if self.time_limit_minutes is not None and self.time_limit_minutes <= 0:
            raise ValueError(f"train.time_limit_minutes={self.time_limit_minutes} must be > 0 (or null).")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel={self.parallel!r} must be ddp or fsdp.")


def choose_precision(setting: str, device: torch.device, width: int) -> str:
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16"
    a = torch.randn(2048, width)
    b = torch.randn(width, 4 * width)
    timings = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        start = time.perf_counter()
        for _ in range(5):
            x @ y
        timings[name] = time.perf_counter() - start
    return "bf16" if timings["bf16"] * 1.2 < timings["fp32"] else "fp32"


def lr_factor(tc: TrainConfig, step: int) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then constant or cosine down to min_lr_ratio."""
    if tc.warmup_steps and step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, lr: float, weight_decay: float, sharded: bool = False) -> torch.optim.AdamW:
    """AdamW, fused where torch has a fused kernel for these tensors (CPU and CUDA), else foreach:
    the default per-parameter loop costs ~10% of a small model's step on CPU."""
    kwargs = dict(lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    if not sharded:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(params, foreach=True, **kwargs)


class TrainingStopped(RuntimeError):
    """Raised after repeated non-finite steps; the state was saved first."""


def load_run_data(config: Config, text_encoder, latent_space, info: DistributedInfo, progress: bool):
    """Encoded training data: from the cache in data.cache (built first if absent) or encoded in memory."""
    from pyraflow.cache import load_cache, prepare
    from pyraflow.data import encode_dataset

    if config.data.cache:
        cache = Path(config.data.cache)
        if info.is_main and not (cache / "complete.json").is_file():
            prepare(config.data, cache, text_encoder, latent_space, progress)
        barrier(info)
        return load_cache(cache, config.data, text_encoder.identity, latent_space.identity, config.latent_shape())
    return encode_dataset(config.data, text_encoder, latent_space, progress=progress and info.is_main)


class Trainer:
    def __init__(self, config: Config, out_dir: str | Path, resume: bool = False, progress: bool = True):
        from pyraflow.data import encode_dataset
        from pyraflow.latents import build_latent_space
        from pyraflow.text import load_text_encoder

        self.config = config
        self.out = Path(out_dir)
        self.info = info = init_distributed()
        self.progress = progress and info.is_main
        tc = config.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if info.is_main:
            self._check_out_dir(resume)
        self.text_encoder = load_text_encoder(config.text)
        self._check_text_widths()
        self.latent_space = build_latent_space(config.latent, info.device)
        self.data = load_run_data(config, self.text_encoder, self.latent_space, info, self.progress)
        image_data = config.image_data()
        self.images = None if image_data is None else encode_dataset(
            image_data, self.text_encoder, self.latent_space, progress=self.progress)
        self.null = self.text_encoder.null()
        self.schedule = PyramidSchedule(config.schedule)
        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.model = MultiStageMMDiT(config.model).to(info.device)
        self.precision = choose_precision(tc.precision, info.device, config.model.width)
        self.wrapped = parallelize(self.model, info, tc.parallel)
        self.params = [p for p in self.wrapped.parameters()]
        self.names = [n for n, _ in self.wrapped.named_parameters()]
        self.ema = [p.detach().clone().float() for p in self.params]
        self.optimizer = make_optimizer(self.params, tc.lr, tc.weight_decay, info.enabled and tc.parallel == "fsdp")
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(tc, s))
        self.classes = example_classes(config)
        self.mix = self.classes.mix
        self.batcher = TokenBudgetBatcher(config.batching, self.classes.segment_tokens, self.mix, len(self.data),
                                          info.rank, info.world_size,
                                          [self.classes.name(c) for c in range(len(self.classes.stages))])
        self.generator = torch.Generator().manual_seed(tc.seed * 7919 + info.rank)
        self.step = 0
        self.bad_steps = self.consecutive_bad = 0
        if resume:
            self._resume()

    # ----- set-up checks ---------------------------------------------------------------------------
    def _check_out_dir(self, resume: bool) -> None:
        latest = self.out / "checkpoints" / "latest"
        if resume and not latest.exists():
            raise ValueError(f"--resume: {self.out} has no checkpoint to resume from; drop --resume to start a new run.")
        if not resume and (self.out / "checkpoints").exists():
            raise ValueError(f"{self.out} already holds a run; pass --resume to continue it, or another --out.")
        self.out.mkdir(parents=True, exist_ok=True)

    def _check_text_widths(self) -> None:
        m, enc = self.config.model, self.text_encoder
        if m.text_dim != enc.width or m.pooled_dim != enc.pooled_width:
            raise ValueError(
                f"model.text_dim={m.text_dim} and model.pooled_dim={m.pooled_dim}, but text encoder {self.config.text.encoder!r} "
                f"gives {enc.width}-wide states and {enc.pooled_width}-wide pooled vectors; set model.text_dim={enc.width} "
                f"and model.pooled_dim={enc.pooled_width}."
            )

    # ----- one step ---------------------------------------------------------------------------------
    def _micro_batch(self):
        """One token-budget batch -> (packed inputs, targets of the predicted tokens, token count)."""
        batch = self.batcher.next_batch()
        ids = torch.tensor(batch.sample_ids)
        stages = torch.tensor([self.classes.stages[c] for c in batch.stages])
        clean = self.data.latents[ids]
        g = self.generator
        null = self.null.item(0)

        def captions() -> tuple[list, torch.Tensor]:
            """(text per example, which examples dropped their text for the null caption)."""
            drop = torch.rand(len(ids), generator=g) < self.config.train.text_dropout
            return [null if drop[row] else self.data.text(i) for row, i in enumerate(batch.sample_ids)], drop

        if self.config.video_units():
            units = torch.tensor([self.classes.units[c] for c in batch.stages])
            spans = unit_spans(self.config.data.frames, self.config.video.unit_frames)
            texts, drop = captions()
            if self.images is not None:
                self._swap_in_images(clean, units, texts, drop)
            samples, targets = unit_training_samples(self.schedule, clean, stages, units, spans, self.config.video,
                                                     texts, g)
        else:
            noise = torch.randn(clean.shape, generator=g)
            r = self.schedule.sample_r(len(ids), g)
            texts, _ = captions()
            samples, targets = [], []
            for pair in self.schedule.training_pairs(stages, clean, noise, r):
                for j, row in enumerate(pair.indices.tolist()):
                    samples.append(Sample(pair.stage, pair.input[j], *texts[row], pair.timestep[j]))
                    targets.append(pair.target[j])
        m = self.config.model
        packed = pack(samples, self.schedule.num_stages, m.patch_size, m.in_channels, m.text_dim, m.pooled_dim)
        target = torch.cat([patchify(targets[i], m.patch_size) for i in packed.layout.order])
        tokens = packed.layout.num_visual + packed.layout.num_text
        return packed.to(self.info.device), target.to(self.info.device), tokens

    def _swap_in_images(self, clean: torch.Tensor, units: torch.Tensor, texts: list, dropped: torch.Tensor) -> None:
        """Give a share of the image examples (unit 0) an image and caption of video.image_dataset instead of a
        clip's first frame, in place in ``clean`` (the batch's own gathered copy) and ``texts`` (captions stay
        null where text dropout chose so)."""
        g = self.generator
        pick = (units == 0) & (torch.rand(len(units), generator=g) < self.config.video.image_dataset_share)
        rows = pick.nonzero().flatten()
        if not len(rows):
            return
        chosen = torch.randint(len(self.images), (len(rows),), generator=g)
        clean[rows, :, 0] = self.images.latents[chosen, :, 0]
        for row, j in zip(rows.tolist(), chosen.tolist()):
            if not dropped[row]:
                texts[row] = self.images.text(j)

    def _loss(self, packed, target):
        """Mean over samples of each sample's mean squared error on its predicted (non-history) tokens."""
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.wrapped(packed)
        layout = packed.layout
        if any(layout.history_lengths):
            out = out[layout.predicted_index().to(out.device)]
        lengths = torch.tensor([v - h for v, h in zip(layout.visual_lengths, layout.history_lengths)], device=out.device)
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=out.device), lengths)
        per_token = (out.float() - target).square().mean(-1)
        per_sample = torch.zeros(len(lengths), device=out.device).index_add_(0, segment, per_token) / lengths
        return per_sample.mean(), per_sample.detach(), torch.tensor(layout.stages)

    def train_step(self) -> dict:
        tc = self.config.train
        start = time.perf_counter()
        stage_sum = torch.zeros(self.schedule.num_stages)
        stage_count = torch.zeros(self.schedule.num_stages)
        total_loss, tokens = 0.0, 0
        for micro in range(tc.grad_accum):
            packed, target, n_tokens = self._micro_batch()
            sync = micro == tc.grad_accum - 1 or not hasattr(self.wrapped, "no_sync")
            context = self.wrapped.no_sync() if not sync else contextlib.nullcontext()
            with context:
                loss, per_sample, stages = self._loss(packed, target)
                (loss / tc.grad_accum).backward()
            total_loss += loss.item() / tc.grad_accum
            tokens += n_tokens
            stage_sum.index_add_(0, stages, per_sample.cpu())
            stage_count.index_add_(0, stages, torch.ones(len(stages)))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        grad_norm = float(full_tensor(grad_norm)) if isinstance(grad_norm, torch.Tensor) else float(grad_norm)
        if self.info.enabled:
            import torch.distributed as dist

            stats = torch.cat([stage_sum, stage_count, torch.tensor([total_loss])]).to(self.info.device)
            dist.all_reduce(stats)
            stats = stats.cpu()
            k = self.schedule.num_stages
            stage_sum, stage_count, total_loss = stats[:k], stats[k : 2 * k], float(stats[-1]) / self.info.world_size
        finite = math.isfinite(total_loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self._update_ema()
            self.consecutive_bad = 0
        else:
            self.bad_steps += 1
            self.consecutive_bad += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        self.step += 1
        stage_loss = {k: float(stage_sum[k] / stage_count[k]) for k in range(len(stage_sum)) if stage_count[k] > 0}
        if hasattr(self.mix, "observe"):
            self.mix.observe(self.step, stage_loss)
        elapsed = time.perf_counter() - start
        return {
            "step": self.step,
            "loss": total_loss,
            **{f"loss_stage{k}": v for k, v in stage_loss.items()},
            "samples_stage": stage_count.int().tolist(),
            "grad_norm": grad_norm,
            "lr": self.lr_schedule.get_last_lr()[0],
            "tokens": tokens * self.info.world_size,
            "tokens_per_s": tokens * self.info.world_size / elapsed,
            "seconds": elapsed,
            "skipped": not finite,
            "bad_steps": self.bad_steps,
        }

    @torch.no_grad()
    def _update_ema(self) -> None:
        tc = self.config.train
        ramp = min(1.0, self.step / tc.ema_warmup_steps) if tc.ema_warmup_steps else 1.0
        decay = tc.ema_decay * ramp
        torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1.0 - decay)

    # ----- state ------------------------------------------------------------------------------------
    def _full_state(self, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix = "module." if hasattr(self.wrapped, "module") else ""
        return {n[len(prefix):] if n.startswith(prefix) else n: full_tensor(t).detach().cpu() for n, t in zip(self.names, tensors)}

    def _optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.wrapped, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(self) -> Path | None:
        from pyraflow.text import save_null

        model_state = self._full_state(self.params)
        ema_state = self._full_state(self.ema)
        optimizer_state = self._optimizer_state()  # collective under FSDP: every rank takes part
        if not self.info.is_main:
            return None

        def writer(directory: Path) -> None:
            (directory / "config.json").write_text(json.dumps(self.config.model.__dict__, indent=2, default=list))
            save_tensors(model_state, directory / "model.safetensors")
            save_tensors(ema_state, directory / "ema.safetensors")
            save_null(self.null, directory / "null_text.safetensors")
            (directory / "run.yaml").write_text(to_yaml(self.config))
            torch.save({
                "step": self.step,
                "optimizer": optimizer_state,
                "lr_schedule": self.lr_schedule.state_dict(),
                "batcher": self.batcher.state_dict(),
                "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "bad_steps": self.bad_steps,
                "consecutive_bad": self.consecutive_bad,
                "precision": self.precision,
                "world_size": self.info.world_size,
            }, directory / "trainer.pt")

        return write_checkpoint(self.out, self.step, writer, self.config.train.keep_checkpoints)

    def _resume(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        path = resolve_checkpoint(self.out)
        saved = load_config(path / "run.yaml")
        for section in ("model", "schedule", "data", "text", "latent", "video"):
            if getattr(saved, section) != getattr(self.config, section):
                raise ValueError(
                    f"the config's '{section}' section differs from the run in {self.out} (see {path / 'run.yaml'}); "
                    "resume with the same config, or start a new run with another --out."
                )
        state = load_trainer_state(path)
        if state["world_size"] != self.info.world_size:
            raise ValueError(f"{path} was written by {state['world_size']} rank(s); resume with the same number.")
        model_state, ema_state = load_tensors(path / "model.safetensors"), load_tensors(path / "ema.safetensors")
        prefix = "module." if hasattr(self.wrapped, "module") else ""
        with torch.no_grad():
            for name, p, e in zip(self.names, self.params, self.ema):
                key = name[len(prefix):] if name.startswith(prefix) else name
                _copy_into(p, model_state[key])
                _copy_into(e, ema_state[key])
        set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.batcher.load_state_dict(state["batcher"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.bad_steps, self.consecutive_bad = state["bad_steps"], state["consecutive_bad"]
        self.precision = state["precision"]

    def ema_model(self) -> MultiStageMMDiT:
        model = MultiStageMMDiT(self.config.model)
        model.load_state_dict(self._full_state(self.ema))
        return model.eval()


def _copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Load a full tensor into a parameter that may be an FSDP2 shard."""
    if hasattr(target, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        target.copy_(distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements))
    else:
        target.copy_(full)


def sample_prompts(trainer: Trainer) -> list[str]:
    from pyraflow.data import caption_for_digit

    if trainer.config.sample.prompts:
        return list(trainer.config.sample.prompts)
    if trainer.config.data.dataset == "mnist":
        return [caption_for_digit(d) for d in range(10)]
    return sorted(set(trainer.data.captions))[:8]


def run_training(config: Config, out_dir: str | Path | None = None, resume: bool = False,
                 max_steps: int | None = None, progress: bool = True) -> dict:
    """Train to train.steps (or max_steps), writing checkpoints, metrics, grids and a loss plot."""
    from tqdm import tqdm

    from pyraflow.reporting import MetricsLog, plot_losses

    if out_dir is None:
        out_dir = Path("runs") / f"{config.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = Trainer(config, out_dir, resume=resume, progress=progress)
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
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
            if metrics and (step % tc.log_every == 0 or step == target or m["skipped"]):
                metrics.log(m)
            if trainer.consecutive_bad >= tc.max_bad_steps:
                trainer.save()
                raise TrainingStopped(
                    f"{trainer.consecutive_bad} steps in a row had a non-finite loss or gradient (last at step {step}); "
                    f"state saved in {out}/checkpoints/latest. Lower train.lr, raise train.warmup_steps or check the "
                    "data, then continue with --resume."
                )
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                trainer.save()
                last_saved = step
            if tc.sample_every and step % tc.sample_every == 0 and step != target:
                _grid(trainer, out / "samples" / f"step-{step:06d}.png")
            if tc.time_limit_minutes and _out_of_time(trainer, started, tc.time_limit_minutes):
                break
    finally:
        bar.close()
        if metrics:
            metrics.close()
    if last_saved != trainer.step:
        trainer.save()
    timings = _grid(trainer, out / "samples" / f"step-{trainer.step:06d}.png")
    summary = {"run_dir": str(out), "steps": trainer.step, "seconds": time.perf_counter() - started,
               "precision": trainer.precision, "bad_steps": trainer.bad_steps, "sample_seconds_per_stage": timings}
    if info.is_main:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if info.enabled:
        _record_rank_checksums(trainer)
    return summary


def _out_of_time(trainer: Trainer, started: float, minutes: float) -> bool:
    """Whether the time limit is reached; under torchrun every rank follows rank 0's clock."""
    late = torch.tensor([float(time.perf_counter() - started > 60 * minutes)], device=trainer.info.device)
    if trainer.info.enabled:
        import torch.distributed as dist

        dist.broadcast(late, src=0)
    return bool(late.item())


def _grid(trainer: Trainer, path: Path) -> list[float] | None:
    model = trainer.ema_model()  # collective under FSDP, so every rank builds it
    timings = None
    if trainer.info.is_main:
        sc = trainer.config.sample
        pipeline = Pipeline(trainer.config, model, trainer.schedule, trainer.text_encoder, trainer.latent_space,
                            trainer.null)
        timings = pipeline.grid(sample_prompts(trainer), sc.per_prompt, path)
    barrier(trainer.info)
    return timings


def _record_rank_checksums(trainer: Trainer) -> None:
    """Every rank's weights reduced to (sum, sum of squares); rank 0 writes them so tests can compare ranks."""
    import torch.distributed as dist

    local = [full_tensor(p).detach().double() for p in trainer.params]
    mine = torch.tensor([sum(float(t.sum()) for t in local), sum(float(t.square().sum()) for t in local)])
    device = trainer.info.device  # NCCL gathers CUDA tensors, gloo CPU ones
    gathered = [torch.zeros(2, dtype=torch.float64, device=device) for _ in range(trainer.info.world_size)]
    dist.all_gather(gathered, mine.to(device, torch.float64))
    if trainer.info.is_main:
        (trainer.out / "rank_checksums.json").write_text(json.dumps([g.cpu().tolist() for g in gathered]))
