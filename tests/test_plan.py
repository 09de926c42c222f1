"""``pyraflow plan``: parameters and memory per GPU for the fine-tuning presets, checked against independent counts."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pyraflow import interop
from pyraflow.archs import load_model
from pyraflow.config import load_config
from pyraflow.lora import add_adapters, trainable_count
from pyraflow.plan import memory_report, parameter_counts, plan_report

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "pyramid-flow"


@pytest.mark.parametrize("variant, parameters", [("flux", 950800), ("mmdit", 283536)])
def test_parameter_counts_match_the_reference_and_peft(variant, parameters):
    """Counts on a meta-device model against the reference's own count (the fixtures' README) and, for LoRA, against
    the adapters peft really injects."""
    released = json.loads((FIXTURES / variant / "model" / "config.json").read_text())
    model_config = interop.model_config_from_reference(released)
    config = load_config(None, ["train.init_from=x", "train.lora.rank=4", "latent.kind=vae", "latent.downsample=8",
                                f"latent.channels={model_config.in_channels}", "data.image_size=128"])
    config = replace(config, model=model_config)
    total, adapters, rank = parameter_counts(config)
    assert total == parameters and rank == 4
    model = load_model(FIXTURES / variant / "model")
    add_adapters(model, config.train.lora)
    assert adapters == trainable_count(model)


@pytest.mark.parametrize("preset", ["pyramid-flow-miniflux-finetune", "pyramid-flow-sd3-finetune"])
def test_the_fine_tuning_presets_plan_without_their_data(preset):
    config = load_config(ROOT / "configs" / f"{preset}.yaml")
    report = plan_report(config, steps=20, world_size=8)
    memory = report["memory"]
    assert 1.9e9 < memory["parameters"] < 2.1e9  # the released models are about 2B
    rows = {(r["mode"], r["parallel"], r["checkpointing"]): r for r in memory["per_gpu"]}
    full, lora = rows[("full", "fsdp", False)], rows[("lora-r64", "fsdp", False)]
    assert full["weights_and_optimizer_gb"] == pytest.approx(20 * memory["parameters"] / 8 / 2**30)
    assert lora["weights_and_optimizer_gb"] < full["weights_and_optimizer_gb"] / 4
    assert rows[("full", "fsdp", True)]["activations_gb"] < full["activations_gb"] / 5
    assert rows[("full", "ddp", True)]["weights_and_optimizer_gb"] == pytest.approx(8 * full["weights_and_optimizer_gb"])


def test_sequence_parallelism_splits_the_tokens_and_activations_per_gpu(capsys):
    from pyraflow.cli import main

    args = ["plan", "--config", str(ROOT / "configs" / "pyramid-flow-sd3-finetune.yaml"), "--steps", "5", "--json"]
    reports = {}
    for n in (1, 4):
        assert main(args + ["--sequence-parallel", str(n)]) == 0
        reports[n] = json.loads(capsys.readouterr().out)
    one, four = reports[1]["memory"], reports[4]["memory"]
    assert four["tokens_per_gpu"] == -(-four["tokens"] // 4) and one["tokens_per_gpu"] == one["tokens"]
    output = four["tokens"] * 16 * 2 * 2 * 4 / 2**30  # the gathered fp32 prediction: 16 channels x 2 x 2 per token
    for a, b in zip(one["per_gpu"], four["per_gpu"]):
        assert b["activations_gb"] == pytest.approx(a["activations_gb"] * one["tokens"] / four["tokens"] / 4 + output)
        assert b["ranks"] == 4  # the world defaults to one group
    assert reports[4]["global_batch"]["samples_mean"] == pytest.approx(reports[4]["samples_per_step"]["mean"])
    assert main(args[:-1] + ["--sequence-parallel", "5"]) == 2
    assert "train.sequence_parallel=5 does not divide the model's 24 heads; use 4" in capsys.readouterr().err
    assert main(args + ["--sequence-parallel", "2", "--world-size", "3"]) == 2
    assert "--world-size 3 is not a multiple of train.sequence_parallel=2" in capsys.readouterr().err


def test_memory_grows_with_the_batch():
    config = load_config(ROOT / "configs" / "pyramid-flow-sd3-finetune.yaml")
    small, large = memory_report(config, 8, [1000] * 4), memory_report(config, 8, [1000] * 8)
    assert large["per_gpu"][0]["activations_gb"] == pytest.approx(2 * small["per_gpu"][0]["activations_gb"])


def test_plan_counts_the_bytes_a_trainer_holds_per_weight(tmp_path):
    """20 bytes per trained weight, against what a real tiny Trainer holds after a step: its fp32 weights, a
    gradient for each (alive during the step, freed after it), every AdamW state tensor and the EMA."""
    from pyraflow.train import Trainer

    config = load_config(None, ["model.width=32", "model.depth=2", "model.num_heads=2", "batching.token_budget=400",
                                "train.steps=1", "sample.per_prompt=1"])
    trainer = Trainer(config, tmp_path / "run", progress=False)
    try:
        trainer.train_step()
    finally:
        trainer.close()
    weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    gradients = sum(p.numel() * p.element_size() for p in trainer.params)
    optimizer = sum(v.numel() * v.element_size() for state in trainer.optimizer.state.values()
                    for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    ema = sum(e.numel() * e.element_size() for e in trainer.ema)
    assert optimizer == 2 * weights and ema == weights  # the pieces are all there
    row = next(r for r in memory_report(config, 1, [100])["per_gpu"] if r["mode"] == "full" and r["parallel"] == "ddp")
    assert row["weights_and_optimizer_gb"] * 2**30 == pytest.approx(weights + gradients + optimizer + ema, rel=1e-9)
