"""The learning-rate schedule and the compute precision."""

import pytest
import torch

from pyraflow.config import TrainConfig
from pyraflow.train.optim import lr_factor, resolve_precision


def test_learning_rate_schedule():
    tc = TrainConfig(steps=1000, warmup_steps=100, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(tc, 0) == pytest.approx(0.01) and lr_factor(tc, 99) == pytest.approx(1.0)
    assert lr_factor(tc, 100) == pytest.approx(1.0)
    assert lr_factor(tc, 550) == pytest.approx(0.55)  # half way through the decay: (1 + 0.1) / 2
    assert lr_factor(tc, 1000) == pytest.approx(0.1)
    assert lr_factor(TrainConfig(lr_schedule="constant"), 5000) == 1.0


def test_precision_follows_the_config_or_the_device_never_a_timing():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"
