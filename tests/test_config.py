"""Config files, --set overrides and the errors they give."""

import pytest

from pyraflow.config import Config, load_config, to_yaml, valid_keys


def test_defaults_resolve_and_every_key_is_listed():
    config = load_config()
    assert isinstance(config, Config)
    assert config.model.in_channels == config.data.channels
    assert {"schedule.gamma", "batching.mix.ratio", "model.width"} <= set(valid_keys())
    assert "token_budget" in to_yaml(config)


def test_the_demo_preset_is_the_built_in_defaults():
    """`pyraflow train` alone runs the demo: configs/mnist.yaml and the dataclass defaults must not drift apart."""
    from pathlib import Path

    preset = Path(__file__).resolve().parents[1] / "configs" / "mnist.yaml"
    assert load_config(preset) == load_config()
    assert load_config(preset, ["train.lr=1e-4"]) != load_config()


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("schedule:\n  stages: 4\nbatching:\n  token_budget: 9000\n  mix:\n    ratio: uniform\n")
    config = load_config(path, ["batching.mix.ratio=[0.1, 0.2, 0.3, 0.4]", "schedule.gamma=0.25", "model.width=128"])
    assert config.schedule.stages == 4 and config.schedule.gamma == 0.25
    assert config.batching.token_budget == 9000
    assert config.batching.mix.ratio == [0.1, 0.2, 0.3, 0.4]
    assert config.model.width == 128


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["batching.tokn_budget=3"], "Did you mean 'batching.token_budget'"),
        (["shedule.gamma=0.2"], "Did you mean 'schedule.gamma'"),
        (["schedule.gamma"], "dotted.key=value"),
        (["schedule.stages=three"], "must be an integer"),
        (["schedule.gamma=0.9"], "1/3"),
        (["model.attention=fast"], "grouped"),
        (["data.image_size=30"], "divisible by"),
        (["model.in_channels=3"], "set them equal"),
        (["schedule.stages=4"], "4 stages"),  # the 25-50-25 default needs 3 stages
    ],
)
def test_bad_values_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("schedule: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("scheduler:\n  stages: 3\n")
    with pytest.raises(ValueError, match="Did you mean 'schedule'"):
        load_config(unknown)


def test_yaml_reads_ratios_as_text_and_exponents_as_numbers():
    from pyraflow.config.loading import load_yaml

    assert load_yaml("[1:2, 3e-4, 6E-4, 1e3, 1.5, 7, abc]") == ["1:2", 3e-4, 6e-4, 1000.0, 1.5, 7, "abc"]
    config = load_config(None, ["train.lr=6e-4", "data.aspect_buckets=[3:4, 1:1]"])
    assert config.train.lr == 6e-4 and config.data.aspect_buckets == ["3:4", "1:1"]
