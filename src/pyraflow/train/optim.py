"""Optimisation choices of a run: AdamW, the learning-rate schedule and the compute precision."""

from __future__ import annotations

import math

import torch

from pyraflow.config import TrainConfig

ADAM_BETAS = (0.9, 0.99)


def make_optimizer(params, lr: float, weight_decay: float, sharded: bool = False) -> torch.optim.AdamW:
    """AdamW, fused where torch has a fused kernel for these tensors (CPU and CUDA), else foreach: the default
    per-parameter loop costs a noticeable share of a small model's step. Sharded (FSDP2 DTensor) parameters
    take the foreach path."""
    kwargs = dict(lr=lr, weight_decay=weight_decay, betas=ADAM_BETAS)
    if not sharded:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(params, foreach=True, **kwargs)


def lr_factor(tc: TrainConfig, step: int) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then constant or cosine down to min_lr_ratio."""
    if tc.warmup_steps and step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_precision(setting: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: as configured, or from the device for ``auto`` (bf16 on CUDA, fp32 elsewhere).

    A function of the config and the device only, never of a timing, so every rank and every resume of a run
    computes in the same precision (a resumed run keeps the precision its checkpoint records)."""
    if setting != "auto":
        return setting
    return "bf16" if device.type == "cuda" else "fp32"
