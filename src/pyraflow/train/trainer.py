"""The Trainer: model, optimizer, EMA, batcher and random state of a run, one optimizer step at a time, and
their checkpoint.

One step: the TokenBudgetBatcher picks samples and their classes -> the objective builds examples with their
targets -> pack -> model -> flow-matching loss -> backward (over train.grad_accum batches) -> clip, AdamW, EMA.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from pyraflow.batching import TokenBudgetBatcher, example_classes
from pyraflow.config import Config, load_config, to_yaml, unit_spans
from pyraflow.model import MultiStageMMDiT
from pyraflow.packing import pack
from pyraflow.schedule import PyramidSchedule
from pyraflow.checkpoint import load_tensors, load_trainer_state, resolve_checkpoint, save_tensors, write_checkpoint
from pyraflow.train.objective import flow_matching_loss, image_examples, unit_examples
from pyraflow.train.optim import lr_factor, make_optimizer, resolve_precision
from pyraflow.train.parallelize import DistributedInfo, barrier, full_tensor, init_distributed, parallelize

RANK_SEED_STRIDE = 7919  # a prime: generator seeds seed * stride + rank never collide across ranks and seeds


class TrainingStopped(RuntimeError):
    """Raised after repeated non-finite steps; the state was saved first."""


def load_run_data(config: Config, text_encoder, latent_space, info: DistributedInfo, progress: bool):
    """Encoded training data: from the cache in data.cache (built first if absent) or encoded in memory."""
    from pyraflow.data import encode_dataset, load_cache, prepare

    if config.data.cache:
        cache = Path(config.data.cache)
        if info.is_main and not (cache / "complete.json").is_file():
            prepare(config.data, cache, text_encoder, latent_space, progress)
        barrier(info)
        return load_cache(cache, config.data, text_encoder.identity, latent_space.identity, config.latent_shape())
    return encode_dataset(config.data, text_encoder, latent_space, progress=progress and info.is_main)


class Trainer:
    def __init__(self, config: Config, out_dir: str | Path, resume: bool = False, progress: bool = True,
                 info: DistributedInfo | None = None):
        """info: the run's process group (see parallelize.process_group); None joins the one torchrun describes."""
        from pyraflow.data import encode_dataset
        from pyraflow.latents import build_latent_space
        from pyraflow.text import load_text_encoder

        self.config = config
        self.out = Path(out_dir)
        self.info = info = info or init_distributed(config.train.collective_timeout_minutes)
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
        self.precision = resolve_precision(tc.precision, info.device)
        self.wrapped = parallelize(self.model, info, tc.parallel)
        # the unwrapped model's names (DDP shares these parameters; FSDP2 shards them in place)
        self.names, self.params = map(list, zip(*self.model.named_parameters()))
        self.ema = [p.detach().clone().float() for p in self.params]
        self.optimizer = make_optimizer(self.params, tc.lr, tc.weight_decay, info.enabled and tc.parallel == "fsdp")
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(tc, s))
        self.classes = example_classes(config)
        self.mix = self.classes.mix
        self.batcher = TokenBudgetBatcher(config.batching, self.classes.segment_tokens, self.mix, len(self.data),
                                          info.rank, info.world_size, self.classes.names())
        self.generator = torch.Generator().manual_seed(tc.seed * RANK_SEED_STRIDE + info.rank)
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
        """One token-budget batch -> (packed examples with their targets, on the device; token count)."""
        batch = self.batcher.next_batch()
        ids = torch.tensor(batch.sample_ids)
        stages = torch.tensor([self.classes.stages[c] for c in batch.classes])
        clean = self.data.latents[ids]
        g = self.generator
        null = self.null.item(0)

        def captions() -> tuple[list, torch.Tensor]:
            """(caption per example, which examples dropped their caption for the null one)."""
            drop = torch.rand(len(ids), generator=g) < self.config.train.text_dropout
            return [null if drop[row] else self.data.text(i) for row, i in enumerate(batch.sample_ids)], drop

        if self.config.video_units():
            units = torch.tensor([self.classes.units[c] for c in batch.classes])
            spans = unit_spans(self.config.data.frames, self.config.video.unit_frames)
            texts, drop = captions()
            if self.images is not None:
                self._swap_in_images(clean, units, texts, drop)
            examples = unit_examples(self.schedule, clean, stages, units, spans, self.config.video, texts, g)
        else:
            noise = torch.randn(clean.shape, generator=g)
            r = self.schedule.sample_r(len(ids), g)
            texts, _ = captions()
            examples = image_examples(self.schedule, clean, stages, noise, r, texts)
        m = self.config.model
        packed = pack(examples, self.schedule.num_stages, m.patch_size, m.in_channels, m.text_dim, m.pooled_dim)
        tokens = packed.layout.num_visual + packed.layout.num_text
        return packed.to(self.info.device), tokens

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

    def _loss(self, packed):
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            velocity = self.wrapped(packed)
        loss, per_sample = flow_matching_loss(velocity, packed)
        return loss, per_sample, torch.tensor(packed.layout.stages)

    def train_step(self) -> dict:
        tc = self.config.train
        start = time.perf_counter()
        stage_sum = torch.zeros(self.schedule.num_stages)
        stage_count = torch.zeros(self.schedule.num_stages)
        total_loss, tokens = 0.0, 0
        for micro in range(tc.grad_accum):
            packed, n_tokens = self._micro_batch()
            sync = micro == tc.grad_accum - 1 or not hasattr(self.wrapped, "no_sync")
            context = self.wrapped.no_sync() if not sync else contextlib.nullcontext()
            with context:
                loss, per_sample, stages = self._loss(packed)
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
        return {name: full_tensor(t).detach().cpu() for name, t in zip(self.names, tensors)}

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
        with torch.no_grad():
            for name, p, e in zip(self.names, self.params, self.ema):
                _copy_into(p, model_state[name])
                _copy_into(e, ema_state[name])
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
        """The EMA weights as a plain model on the training device (collective under FSDP: every rank calls it)."""
        model = MultiStageMMDiT(self.config.model)
        model.load_state_dict(self._full_state(self.ema))
        return model.to(self.info.device).eval()


def _copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Load a full tensor into a parameter that may be an FSDP2 shard."""
    if hasattr(target, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        target.copy_(distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements))
    else:
        target.copy_(full)
