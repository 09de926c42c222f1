"""The run configuration: one dataclass per component, composed here, filled from YAML and --set.

Each component's config lives beside its code (ScheduleConfig in schedule, ModelConfig in model, ...)
and validates itself in ``__post_init__``. This module only maps nested mappings onto those
dataclasses, applies ``--set dotted.key=value`` overrides, and checks what spans components.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pyraflow.batching import BatchingConfig, resolve_ratio
from pyraflow.data import DataConfig
from pyraflow.latents import LatentConfig
from pyraflow.model import ModelConfig
from pyraflow.sampling import SampleConfig
from pyraflow.schedule import ScheduleConfig
from pyraflow.text import TextConfig
from pyraflow.video import VideoConfig, unit_spans


@dataclass
class Config:
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(in_channels=DataConfig().channels))
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    train: "TrainConfig" = field(default_factory=lambda: _train_config())
    sample: SampleConfig = field(default_factory=SampleConfig)
    video: VideoConfig = field(default_factory=VideoConfig)

    def __post_init__(self) -> None:
        model, k = self.model, self.schedule.stages
        channels, size = self.latent_channels(), self.latent_size()
        if model.in_channels != channels:
            raise ValueError(
                f"model.in_channels={model.in_channels} but the latents have {channels} channels; set them equal "
                "(or leave model.in_channels unset to follow the latents)."
            )
        unit = model.patch_size * 2 ** (k - 1)
        if size % unit:
            raise ValueError(
                f"the full-resolution latent is {size}x{size} (data.image_size={self.data.image_size} / latent "
                f"downsample {self.latent.resolved_downsample()}), which must be divisible by patch_size * 2**(stages-1) "
                f"= {unit} so every stage has whole patches; change data.image_size, model.patch_size or schedule.stages."
            )
        mix = self.batching.mix
        if mix.kind in ("constant", "adaptive"):
            resolve_ratio(mix.ratio, k)
        self.sample.steps_per_stage(k)
        if self.video.unit_frames is not None:
            try:
                unit_spans(self.data.frames, self.video.unit_frames)
            except ValueError as err:
                raise ValueError(f"data.frames={self.data.frames} with video.unit_frames={self.video.unit_frames}: {err}") from err
            if not model.temporal_causal:
                raise ValueError("video.unit_frames needs model.temporal_causal: true (a unit must not see later units).")
        elif self.video.image_dataset is not None:
            raise ValueError("video.image_dataset joins the image examples (unit 0) of a unit-by-unit video run; set "
                             "video.unit_frames, or train on the images alone with data.dataset.")

    def video_units(self) -> bool:
        """Whether videos are trained and sampled unit by unit (autoregressively)."""
        return self.video.unit_frames is not None

    def image_data(self) -> DataConfig | None:
        """The data config of video.image_dataset (at the clips' size and channels), or None."""
        v = self.video
        if v.image_dataset is None:
            return None
        return DataConfig(dataset=v.image_dataset, path=v.image_path, image_size=self.data.image_size,
                          channels=self.data.channels, resize=self.data.resize,
                          max_bad_fraction=self.data.max_bad_fraction)

    def latent_channels(self) -> int:
        return self.latent.resolved_channels(self.data.channels)

    def latent_size(self) -> int:
        return self.data.image_size // self.latent.resolved_downsample()

    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of a full-resolution latent."""
        size = self.latent_size()
        return (self.latent_channels(), self.data.frames, size, size)

    def stage_visual_tokens(self) -> list[int]:
        """Visual tokens of one sample at each stage."""
        p, k, s = self.model.patch_size, self.schedule.stages, self.latent_size()
        return [self.data.frames * (s // (p * 2 ** (k - 1 - i))) ** 2 for i in range(k)]

    def stage_segment_tokens(self) -> list[int]:
        """Tokens one sample brings at each stage: visual + text (budgeted at text.max_tokens)."""
        return [v + self.text.max_tokens for v in self.stage_visual_tokens()]


def _train_config():
    from pyraflow.training import TrainConfig

    return TrainConfig()


# ----- building dataclasses from mappings -------------------------------------------------------------

def _hints(cls) -> dict:
    from pyraflow.training import TrainConfig

    return typing.get_type_hints(cls, localns={"TrainConfig": TrainConfig})


def _dotted_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _dotted_keys(hints[f.name], name + ".")
    return keys


def valid_keys() -> list[str]:
    return _dotted_keys(Config)


def _unknown_key(key: str) -> ValueError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else " Run 'pyraflow config show' for every key."
    return ValueError(f"unknown config key '{key}'.{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check and convert a YAML value to a field's annotated type, naming the key on failure."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(f"config key '{key}'={value!r} has the wrong type; expected {_type_name(tp)}.")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}'={value!r} must be a list.")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}'={value!r} must be a mapping.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key '{key}'={value!r} must be true or false.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key '{key}'={value!r} must be an integer.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key '{key}'={value!r} must be a number.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key '{key}'={value!r} must be a string.")
        return value
    return value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def build(cls, raw: dict | None, prefix: str = ""):
    """Construct dataclass ``cls`` from a nested mapping, defaults filling what is absent."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {raw!r}.")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise _unknown_key(prefix + str(key))
    kwargs = {}
    for name in names & set(raw):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, raw[name], prefix + name + ".")
        else:
            kwargs[name] = _coerce(raw[name], tp, prefix + name)
    if cls is Config and "in_channels" not in (raw.get("model") or {}):
        # The model's input channels follow the latents unless set explicitly.
        channels = kwargs.get("latent", LatentConfig()).resolved_channels(kwargs.get("data", DataConfig()).channels)
        kwargs["model"] = dataclasses.replace(kwargs.get("model", ModelConfig()), in_channels=channels)
    return cls(**kwargs)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` to a nested mapping; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r} must look like dotted.key=value (e.g. --set batching.token_budget=4096).")
    key, text = assignment.split("=", 1)
    key = key.strip()
    if key not in valid_keys():
        raise _unknown_key(key)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"--set {key}: cannot parse {text!r} ({err}).") from err
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (optional) + overrides -> validated Config. Errors name the key and the fix."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist; pass a YAML file such as configs/mnist.yaml.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections (schedule:, model:, ...).")
    for assignment in overrides:
        apply_override(raw, assignment)
    return build(Config, raw)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)
