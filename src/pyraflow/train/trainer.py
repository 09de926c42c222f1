"""The Trainer: model, optimizer, EMA, batcher and loader of a run, one optimizer step at a time, and their
checkpoint.

One step: the loader hands over batches planned by the TokenBudgetBatcher and built by the objective (examples
with their targets, packed) -> model -> flow-matching loss -> backward (over train.grad_accum batches) -> clip,
AdamW, EMA. Random draws are counter-based (pyraflow.train.objective.batch_generator), so the state to save is
the weights, the optimizer, the mix and the batcher's position after the last consumed batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Iterator

import torch

from pyraflow.batching import TokenBudgetBatcher, example_classes
from pyraflow.checkpoint import LEGACY_OPTIMIZER, load_trainer_state, resolve_checkpoint, write_checkpoint
from pyraflow.config import Config, load_config, to_yaml
from pyraflow.data.loader import prefetch_depth, training_loader
from pyraflow.archs import build_model, parameters_on_meta, stored_tensors, training_model
from pyraflow.archs.base import PackedTransformer, tensor_generator
from pyraflow.weights import EMA, MODEL, NULL_TEXT, OPTIMIZER, StoredTensors, stream_tensors, write_model_config
from pyraflow.schedule import PyramidSchedule
from pyraflow.train.objective import ExampleBuilder, flow_matching_loss
from pyraflow.train.optim import lr_factor, make_optimizer, resolve_precision
from pyraflow.compilation import compile_blocks, resolve_compile
from pyraflow.lora import ADAPTER, add_adapters
from pyraflow.train.parallelize import (DistributedInfo, all_reduce_sum, barrier, checkpoint_activations, fill_sharded,
                                        full_copies, full_tensor, init_distributed, join_sequence_groups, materialize,
                                        parallelize, sequence_shard)

log = logging.getLogger("pyraflow.train")


class TrainingStopped(RuntimeError):
    """Raised after repeated non-finite steps; the state was saved first."""


def stage_losses(stage_sum: torch.Tensor, stage_count: torch.Tensor) -> dict[int, float]:
    """Mean loss of each stage that had samples (reads the device)."""
    sums, counts = stage_sum.tolist(), stage_count.tolist()
    return {k: sums[k] / counts[k] for k in range(len(counts)) if counts[k] > 0}


def load_run_data(config: Config, text_encoder, latent_space, info: DistributedInfo, progress: bool, buckets,
                  run_dir: Path):
    """Encoded training data: the prepared cache in data.cache (built first if absent; data with buckets without a
    data.cache gets one in the run directory), read row by row; or the dataset encoded in memory."""
    from pyraflow.data import encode_dataset, load_cache, prepare

    if config.data.dataset == "pyramid-flow":
        from pyraflow.data.pyramid_flow import load_annotations

        return load_annotations(config)
    if config.data.cache or config.data.bucketed:
        cache = Path(config.data.cache or run_dir / "cache")
        if info.is_main and not (cache / "complete.json").is_file():
            prepare(config.data, cache, text_encoder, latent_space, progress, buckets)
        barrier(info)
        channels, downsample = config.latent_channels(), config.latent.resolved_downsample()
        data = load_cache(cache, config.data, text_encoder.identity, latent_space.identity,
                          [b.shape(channels, downsample) for b in buckets], buckets)
        if data.bad_shards and info.is_main:
            log.warning("training without %d unreadable shard(s) of %s (%d samples)", len(data.bad_shards), cache,
                        data.skipped_samples)
        return data
    return encode_dataset(config.data, text_encoder, latent_space, progress=progress and info.is_main)


def fresh_adapter(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """A new adapter tensor as peft initialises one (lora_B zero; lora_A Kaiming-uniform with a = sqrt(5), i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))), drawn whole from a generator of (seed, name), so every rank of a sharded
    run cuts its rows from the same tensor."""
    if "lora_B" in name:
        return torch.zeros(shape)
    return (torch.rand(shape, generator=tensor_generator(seed, name)) * 2 - 1) / math.sqrt(shape[1])


class Trainer:
    def __init__(self, config: Config, out_dir: str | Path, resume: bool = False, progress: bool = True,
                 info: DistributedInfo | None = None):
        """info: the run's process group (see parallelize.process_group); None joins the one torchrun describes."""
        from pyraflow.data import encode_dataset, resolve_buckets
        from pyraflow.latents import build_latent_space
        from pyraflow.text import load_text_encoder

        self.config = config
        self.out = Path(out_dir)
        info = info or init_distributed(config.train.collective_timeout_minutes)
        self.info = info = join_sequence_groups(info, config.train.sequence_parallel)
        self.progress = progress and info.is_main
        tc = config.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if info.is_main:
            self._check_out_dir(resume)
        self.text_encoder = load_text_encoder(config.text, widths=(config.model.text_dim, config.model.pooled_dim))
        self._check_text_widths()
        self.latent_space = build_latent_space(config.latent, info.device)
        self.buckets = resolve_buckets(config)
        self.data = load_run_data(config, self.text_encoder, self.latent_space, info, self.progress, self.buckets,
                                  self.out)
        image_data = config.image_data()
        self.images = None if image_data is None else encode_dataset(
            image_data, self.text_encoder, self.latent_space, progress=self.progress)
        self.null = self.text_encoder.null()
        self.schedule = PyramidSchedule(config.schedule)
        # a resume computes in the precision its run recorded, whatever the device would choose now
        self.precision = self._recorded_precision() if resume else resolve_precision(tc.precision, info.device)
        torch.manual_seed(tc.seed)  # the initial weights' seed (archs.base.draw_init_seed), the same on every rank
        if self.sharded:
            self.model, self.wrapped = self._sharded_model(resume)
        else:
            self.model = training_model(config, load_base=not resume).to(info.device)
            self._prepare_blocks(self.model)
            self.wrapped = parallelize(self.model, info, tc.parallel, self.precision)
        self.model.sequence_shard = sequence_shard(info)
        # the unwrapped model's names of what trains (DDP shares these parameters; FSDP2 shards them in place): every
        # weight, or with train.lora the adapters only, which are then all that the optimizer, EMA and checkpoints hold
        self.names, self.params = map(list, zip(*[(n, p) for n, p in self.model.named_parameters() if p.requires_grad]))
        # persistent buffers (the sd3 position table) travel with the weights, except in a LoRA run's adapter files
        parameters = {n for n, _ in self.model.named_parameters()}
        self.buffers = {} if tc.lora.rank else {n: b for n, b in self.model.state_dict().items() if n not in parameters}
        self.ema = [p.detach().clone().float() for p in self.params]
        self.optimizer = make_optimizer(self.params, tc.lr, tc.weight_decay, self.sharded)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(tc, s))
        self.classes = example_classes(config, self.buckets, self.data.pool_sizes)
        self.mix = self.classes.mix
        self._check_mix_delay()
        self.batcher = TokenBudgetBatcher(config.batching, self.classes.segment_tokens, self.mix, self.data.pool_sizes,
                                          info.data_rank, info.data_size, self.classes.names(), self.classes.buckets,
                                          self.data.pool_ids)
        # the ranks of a sequence-parallel group plan and draw the same batch
        self.builder = ExampleBuilder(config, self.schedule, self.classes, self.null.item(0), self.images, info.data_rank)
        self.position = self.batcher.state_dict()  # the batcher's state after the last consumed batch
        self._batches = None  # the loader's iterator, started by the first step (after a resume has loaded state)
        self.step = 0
        # tokens since metrics were last read, and when that was: throughput over the interval, measured when the
        # device has caught up (a step's own host time is only its launch time on a GPU)
        self._interval_start: float | None = None
        self._interval_tokens = 0
        # non-finite steps (total, current run of consecutive ones, and its longest run since metrics were last read)
        self.bad_steps, self.consecutive_bad, self.worst_bad_run = (
            torch.zeros((), dtype=torch.long, device=info.device) for _ in range(3))
        if resume:
            self._resume()

    @property
    def sharded(self) -> bool:
        return self.info.enabled and self.config.train.parallel == "fsdp"

    def _sharded_model(self, resume: bool) -> tuple[PackedTransformer, torch.nn.Module]:
        """FSDP2 without the whole model on any rank's host: built with its parameters on the meta device, compiled
        and sharded, then allocated and filled, each rank its own rows: from train.init_from's files (a LoRA run's
        base, also on resume), or, where there is nothing to read, from the model's initialisation, drawn a tensor at
        a time from a generator per tensor (the single-process run's weights, whatever the world size). Fresh adapters
        start as peft starts them (B = 0), A drawn per tensor from the run's seed. A resume fills the rest from the
        checkpoint (``_resume``)."""
        config, tc, info = self.config, self.config.train, self.info
        with parameters_on_meta():
            model = build_model(config.model)
            if tc.lora.rank:
                add_adapters(model, tc.lora)
        self._prepare_blocks(model)
        wrapped = parallelize(model, info, "fsdp", self.precision)
        materialize(model, info.device)
        parameters = dict(model.named_parameters())
        base = {name: p for name, p in parameters.items() if ADAPTER not in name}
        if tc.init_from and (not resume or tc.lora.rank):
            fill_sharded(base, stored_tensors(tc.init_from, config.model).read)
        elif not resume:
            fill_sharded(base, lambda name, rows: model.initial_value(name)[rows or slice(None)])
        if tc.lora.rank and not resume:
            adapters = {name: p for name, p in parameters.items() if ADAPTER in name}
            fill_sharded(adapters, lambda name, rows: fresh_adapter(name, adapters[name].shape, tc.seed)[rows or slice(None)])
        return model, wrapped

    def _prepare_blocks(self, model: PackedTransformer) -> None:
        """Activation checkpointing, then compilation: both before data parallelism wraps the blocks, as torchtitan
        orders them."""
        checkpoint_activations(model, self.config.model.checkpoint_fraction)
        if resolve_compile(self.config.train.compile, self.info.device):
            compile_blocks(model)

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

    def _check_mix_delay(self) -> None:
        """An adaptive mix's updates apply adaptive_every batches late; the loader must not plan further ahead."""
        d, mix = self.config.data, self.config.batching.mix
        ahead = prefetch_depth(d.workers, d.prefetch) + 1
        if mix.kind == "adaptive" and mix.adaptive_every <= ahead:
            raise ValueError(
                f"batching.mix.adaptive_every={mix.adaptive_every} must exceed the {ahead} batches the loader plans ahead "
                f"(data.workers={d.workers} x data.prefetch={d.prefetch}, + 1); raise it or lower data.workers/prefetch."
            )

    # ----- one step ---------------------------------------------------------------------------------
    def _loader(self):
        d = self.config.data
        return training_loader(self.data, self.batcher, self.builder, d.workers, d.prefetch,
                               pin_memory=self.info.device.type == "cuda")

    def _next_batch(self):
        """The next built batch, on the device, and the seconds the step waited for it."""
        if self._batches is None:
            self._batches = self._loader()
        start = time.perf_counter()
        loaded = next(self._batches)
        waited = time.perf_counter() - start
        self.position = loaded.state
        return loaded.batch.to(self.info.device, non_blocking=True), loaded.tokens, waited

    def close(self) -> None:
        """Stop the loader's workers (the loop calls this however the run ends)."""
        if self._batches is not None:
            self._batches.close()
        self._batches = None

    def _loss(self, packed):
        with torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            velocity = self.wrapped(packed)
        loss, per_sample = flow_matching_loss(velocity, packed)
        stages = torch.tensor(packed.layout.stages).to(per_sample.device, non_blocking=True)
        return loss, per_sample, stages

    def train_step(self) -> dict:
        """One optimizer step. Nothing here waits for the device: losses, the gradient norm and the skip of a
        non-finite step stay on it (tensors in the returned dict); ``read_metrics`` reads them at logging steps."""
        tc = self.config.train
        start = time.perf_counter()
        if self._interval_start is None:
            self._interval_start = start
        device, k = self.info.device, self.schedule.num_stages
        stage_sum = torch.zeros(k, device=device)
        stage_count = torch.zeros(k, device=device)
        total_loss = torch.zeros((), device=device)
        tokens, waited = 0, 0.0
        # the ranks of a sequence-parallel group each hold part of the gradient of the same loss, which data
        # parallelism averages over the whole world: scaled by the group size, the sum over the group remains
        scale = self.info.sequence_ranks / tc.grad_accum
        for micro in range(tc.grad_accum):
            packed, n_tokens, wait = self._next_batch()
            sync = micro == tc.grad_accum - 1 or not hasattr(self.wrapped, "no_sync")
            context = self.wrapped.no_sync() if not sync else contextlib.nullcontext()
            with context:
                loss, per_sample, stages = self._loss(packed)
                (loss * scale).backward()
            total_loss += loss.detach() / tc.grad_accum
            tokens += n_tokens
            waited += wait
            stage_sum.index_add_(0, stages, per_sample)
            stage_count.index_add_(0, stages, torch.ones_like(per_sample))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        grad_norm = full_tensor(grad_norm).float()
        if self.info.enabled:
            if self.info.sequence_rank:  # a sequence-parallel group's batch is counted once, by its first rank
                stage_sum.zero_()
                stage_count.zero_()
            stats = all_reduce_sum(torch.cat([stage_sum, stage_count, total_loss[None] / self.info.world_size]))
            stage_sum, stage_count, total_loss = stats[:k], stats[k : 2 * k], stats[-1]
        finite = torch.isfinite(total_loss) & torch.isfinite(grad_norm)
        self._optimizer_step(finite)
        self._update_ema(finite)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        self.step += 1
        bad = (~finite).to(self.bad_steps.dtype)
        self.bad_steps += bad
        self.consecutive_bad = (self.consecutive_bad + bad) * bad
        self.worst_bad_run = torch.maximum(self.worst_bad_run, self.consecutive_bad)
        self._interval_tokens += tokens * self.info.data_size
        if self.mix.reads_losses:  # an adaptive mix reads each step's per-stage losses (a host read)
            self.mix.observe(self.step * tc.grad_accum, stage_losses(stage_sum, stage_count))
        return {
            "step": self.step,
            "loss": total_loss,
            "stage_sum": stage_sum,
            "stage_count": stage_count,
            "grad_norm": grad_norm,
            "lr": self.lr_schedule.get_last_lr()[0],
            "tokens": tokens * self.info.data_size,
            "seconds": time.perf_counter() - start,
            "data_wait_seconds": waited,
            "finite": finite,
        }

    def read_metrics(self, step: dict) -> dict:
        """A step's metrics as numbers (reads the device), with the run's bad-step counts; the consecutive-bad
        peak since the last read is reset."""
        stage_loss = stage_losses(step["stage_sum"], step["stage_count"])
        worst = int(self.worst_bad_run)  # reading waits for the device: the interval's time is its compute
        self.worst_bad_run = self.consecutive_bad.clone()
        now = time.perf_counter()
        tokens_per_s = self._interval_tokens / max(now - (self._interval_start or now), 1e-9)
        self._interval_start, self._interval_tokens = now, 0
        return {
            "step": step["step"],
            "loss": float(step["loss"]),
            **{f"loss_stage{k}": v for k, v in stage_loss.items()},
            "samples_stage": step["stage_count"].int().tolist(),
            "grad_norm": float(step["grad_norm"]),
            "lr": step["lr"],
            "tokens": step["tokens"],
            "tokens_per_s": tokens_per_s,
            "seconds": step["seconds"],
            "data_wait_seconds": step["data_wait_seconds"],
            "skipped": not bool(step["finite"]),
            "bad_steps": int(self.bad_steps),
            "worst_bad_run": worst,
        }

    def _optimizer_step(self, finite: torch.Tensor) -> None:
        """AdamW, skipped where the step was not finite. The fused kernel takes the skip as a device flag
        (``found_inf``, as the AMP grad scaler passes it: no update, no step count); the foreach path, which sharded
        parameters take, must decide on the host."""
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
        elif bool(finite):
            self.optimizer.step()

    @torch.no_grad()
    def _update_ema(self, finite: torch.Tensor) -> None:
        """EMA <- EMA + w (weights - EMA) in one foreach op, w = 1 - decay (0 on a skipped step), on the device."""
        tc = self.config.train
        ramp = min(1.0, self.step / tc.ema_warmup_steps) if tc.ema_warmup_steps else 1.0
        weight = (1.0 - tc.ema_decay * ramp) * finite.float()
        torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], [weight] * len(self.ema))

    # ----- state ------------------------------------------------------------------------------------
    def _checkpoint_files(self) -> tuple[list[tuple[str, list, Iterator]], list]:
        """The safetensors files of a checkpoint as (file, specs, full tensors): the weights, the EMA and AdamW's
        moments ("<parameter>.<key>", found through torch's sharded optimizer state dict, which gathers nothing),
        each tensor gathered when its file's writer asks for it (a collective for a sharded one); and the optimizer's
        parameter groups."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = get_optimizer_state_dict(self.wrapped, self.optimizer, options=StateDictOptions(full_state_dict=False))
        moments = [(f"{name}.{key}", value) for name, entry in optimizer["state"].items() for key, value in entry.items()]
        buffers = [(name, b.detach()) for name, b in self.buffers.items()]
        files = []
        for file, named in ((MODEL, [*zip(self.names, self.params), *buffers]),
                            (EMA, [*zip(self.names, self.ema), *buffers]), (OPTIMIZER, moments)):
            specs = [(name, t.shape, t.dtype) for name, t in named]
            files.append((file, specs, full_copies([t for _, t in named], self.info)))
        return files, optimizer["param_groups"]

    def save(self) -> Path | None:
        """Write a checkpoint: every rank takes part in gathering sharded state, one tensor at a time, and rank 0
        writes each tensor as it arrives, so no rank ever holds the whole state (only rank 0 returns the path)."""
        from pyraflow.text import save_null

        files, optimizer_groups = self._checkpoint_files()
        if not self.info.is_main:
            for _, _, tensors in files:
                for _ in tensors:  # the same gathers, in the same order, as rank 0's writers
                    pass
            return None

        def writer(directory: Path) -> None:
            for file, specs, tensors in files:
                stream_tensors(specs, tensors, directory / file)
            write_model_config(directory, self.config.model)
            save_null(self.null, directory / NULL_TEXT)
            (directory / "run.yaml").write_text(to_yaml(self.config))
            torch.save({
                "optimizer_groups": optimizer_groups,
                "step": self.step,
                "lr_schedule": self.lr_schedule.state_dict(),
                "batcher": self.position,
                "mix": self.mix.state_dict(),
                "bad_steps": int(self.bad_steps),
                "consecutive_bad": int(self.consecutive_bad),
                "precision": self.precision,
                "world_size": self.info.world_size,
                "sequence_parallel": self.info.sequence_ranks,
            }, directory / "trainer.pt")

        return write_checkpoint(self.out, self.step, writer, self.config.train.keep_checkpoints)

    def _recorded_precision(self) -> str:
        return load_trainer_state(resolve_checkpoint(self.out))["precision"]

    def _resume(self) -> None:
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
        if state.get("sequence_parallel", 1) != self.info.sequence_ranks:
            raise ValueError(f"{path} was written with train.sequence_parallel={state.get('sequence_parallel', 1)} (its "
                             "batches were planned per group); resume with the same value.")
        if "batcher" not in state or "mix" not in state:
            raise ValueError(f"{path} was written by an older pyraflow (before counter-based random state); it cannot "
                             "resume exactly: start a new run, or sample from it as it is.")
        # sharded runs: each rank reads the rows it holds; replicas read the whole state
        for name, targets in ((MODEL, self.params), (EMA, self.ema)):
            stored = StoredTensors([path / name])
            fill_sharded(dict(zip(self.names, targets)), stored.read)
            if name == MODEL:
                fill_sharded({b: t for b, t in self.buffers.items() if b in stored.names()}, stored.read)
        self._resume_optimizer(path, state)
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.batcher.load_state_dict(state["batcher"])
        self.position = state["batcher"]
        if state["mix"]:  # None or {}: a mix without state
            self.mix.load_state_dict(state["mix"])
        self.step = state["step"]
        self.bad_steps.fill_(state["bad_steps"])
        self.consecutive_bad.fill_(state["consecutive_bad"])
        self.worst_bad_run.fill_(state["consecutive_bad"])

    def _resume_optimizer(self, path: Path, state: dict) -> None:
        """AdamW's state, each rank reading the rows of the moments it holds (a scalar such as the step count
        whole). A checkpoint of an older pyraflow holds it in one pickle, read whole by rank 0 and sent out."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not (path / OPTIMIZER).is_file() and (path / LEGACY_OPTIMIZER).is_file():
            reads = self.info.is_main or not self.sharded
            optimizer = load_trainer_state(path, LEGACY_OPTIMIZER) if reads else {}
            set_optimizer_state_dict(self.wrapped, self.optimizer, optimizer, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=self.sharded))
            return
        if not (path / OPTIMIZER).is_file():
            raise FileNotFoundError(f"{path} has no {OPTIMIZER}: the checkpoint is incomplete; resume from an "
                                    "earlier step-N (point --out's checkpoints/latest at it) or start a new run.")
        stored = StoredTensors([path / OPTIMIZER])
        by_parameter: dict[str, list[str]] = {}
        for key in sorted(stored.names()):
            by_parameter.setdefault(key.rpartition(".")[0], []).append(key)
        entries = {}
        for name, param in zip(self.names, self.params):
            keys = by_parameter.get(name)
            if not keys:
                raise ValueError(f"{path / OPTIMIZER} holds no state for {name}; it was written for another model.")
            whole = {key: stored.read(key) for key in keys if list(stored.shape(key)) != list(param.shape)}
            rows = {key: torch.zeros_like(param) for key in keys if key not in whole}  # sharded as the parameter
            fill_sharded(rows, stored.read)
            entries[name] = {key.rpartition(".")[2]: value for key, value in {**whole, **rows}.items()}
        set_optimizer_state_dict(self.wrapped, self.optimizer, {"state": entries, "param_groups": state["optimizer_groups"]},
                                 options=StateDictOptions(full_state_dict=False))

    def ema_model(self) -> PackedTransformer:
        """The EMA weights as a plain model on the training device, on every rank (a collective under FSDP)."""
        model = training_model(self.config, load_base=True) if self.config.train.lora.rank else build_model(self.config.model)
        model.load_state_dict({**{name: full_tensor(t).detach() for name, t in zip(self.names, self.ema)}, **self.buffers},
                              strict=not self.config.train.lora.rank)
        return model.to(self.info.device).eval()
