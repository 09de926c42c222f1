"""``pyraflow plan``: parameters and memory per GPU for the fine-tuning presets, checked against independent counts."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pyraflow import interop
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
    model = interop.load(FIXTURES / variant / "model")
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


def test_memory_grows_with_the_batch():
    config = load_config(ROOT / "configs" / "pyramid-flow-sd3-finetune.yaml")
    small, large = memory_report(config, 8, [1000] * 4), memory_report(config, 8, [1000] * 8)
    assert large["per_gpu"][0]["activations_gb"] == pytest.approx(2 * small["per_gpu"][0]["activations_gb"])
