"""The command line: plan output, config show, and clear errors with a non-zero exit."""

import json
from pathlib import Path

import pytest

from pyraflow.cli import build_parser, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_has_the_schedule_and_batch_statistics(capsys):
    report = run_json(capsys, "plan", "--json", "--steps", "200")
    stages = report["schedule"]["stages"]
    assert [s["stage"] for s in stages] == [0, 1, 2]
    assert [s["downsample"] for s in stages] == [4, 2, 1]
    for key in ("sigma_start", "sigma_end", "timestep_window", "target_ratio", "realised_ratio",
                "samples_per_batch_mean", "tokens_per_batch_mean"):
        assert all(key in s for s in stages)
    assert stages[0]["timestep_window"][0] == pytest.approx(1000)
    assert set(report["tokens_per_step"]) == {"mean", "cv", "min", "max"}
    assert "global_batch" in report and "activation_memory_mb" in report


def test_plan_with_the_reference_preset(capsys):
    report = run_json(capsys, "plan", "--schedule", "pyramid-flow", "--json", "--steps", "10")
    assert report["schedule"]["name"] == "pyramid-flow"
    assert [s["timestep_window"] for s in report["schedule"]["stages"]] == [[1000.0, 744.0], [744.0, 386.0], [386.0, 1.0]]


def test_mnist_plan_meets_the_batching_targets(capsys):
    report = run_json(capsys, "plan", "--config", str(CONFIGS / "mnist.yaml"), "--steps", "2000", "--json")
    assert report["tokens_per_step"]["cv"] <= 0.02
    for s in report["schedule"]["stages"]:
        assert abs(s["realised_ratio"] - s["target_ratio"]) <= 0.005


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_plans(capsys, config):
    report = run_json(capsys, "plan", "--config", str(config), "--steps", "300", "--json")
    assert report["tokens_per_step"]["max"] <= report["token_budget"]


def test_plan_table_and_config_show(capsys):
    assert main(["plan", "--steps", "50"]) == 0
    out = capsys.readouterr().out
    assert "timesteps" in out and "tokens/step" in out
    assert main(["config", "show", "--set", "model.width=128"]) == 0
    assert "width: 128" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--set", "batching.tokn_budget=1"], "Did you mean 'batching.token_budget'"),
        (["plan", "--schedule", "pyramidflow"], "pyramid-flow"),
        (["plan", "--set", "batching.token_budget=50"], "below one sample"),
        (["plan", "--set", "batching.mix.ratio=[0.5,0.5]"], "one ratio per stage"),
        (["plan", "--set", "data.num_samples=0"], "needs data"),
        (["config", "show", "--config", "nope.yaml"], "does not exist"),
    ],
)
def test_errors_exit_non_zero_with_a_message(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_lists_only_working_commands():
    help_text = build_parser().format_help()
    for command in ("plan", "config", "bench"):
        assert command in help_text
