"""The run configuration: one dataclass per component (``sections``), composed into ``Config``, filled from
YAML and ``--set dotted.key=value``.

A leaf of the package: it imports no torch and no other pyraflow module, so ``pyraflow config show`` is
instant and every module can take its section from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pyraflow.config.buckets import Bucket, auto_aspects, make_buckets, nearest_bucket, parse_aspect
from pyraflow.config.loading import apply_override, build_kwargs, dotted_keys, load_yaml
from pyraflow.config.sections import (
    ATTENTION_BACKENDS,
    BatchingConfig,
    DataConfig,
    LatentConfig,
    LoraConfig,
    MixConfig,
    ModelConfig,
    SampleConfig,
    ScheduleConfig,
    TextConfig,
    TrainConfig,
    VideoConfig,
    ratio_presets,
    resolve_ratio,
    uniform_boundaries,
    unit_spans,
)

__all__ = [
    "ATTENTION_BACKENDS", "BatchingConfig", "Bucket", "Config", "auto_aspects", "make_buckets", "nearest_bucket",
    "parse_aspect", "DataConfig", "LatentConfig", "LoraConfig", "MixConfig", "ModelConfig",
    "SampleConfig", "ScheduleConfig", "TextConfig", "TrainConfig", "VideoConfig", "drop_retired", "load_config", "ratio_presets",
    "resolve_ratio", "to_dict", "to_yaml", "uniform_boundaries", "unit_spans", "valid_keys",
]


@dataclass
class Config:
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(in_channels=DataConfig().channels))
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
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
        if size % unit and not self.data.bucketed:
            raise ValueError(
                f"the full-resolution latent is {size}x{size} (data.image_size={self.data.image_size} / latent "
                f"downsample {self.latent.resolved_downsample()}), which must be divisible by patch_size * 2**(stages-1) "
                f"= {unit} so every stage has whole patches; change data.image_size, model.patch_size or schedule.stages."
            )
        check_sequence_heads(model.num_heads, self.train.sequence_parallel)
        mix = self.batching.mix
        if mix.kind in ("constant", "adaptive"):
            resolve_ratio(mix.ratio, k)
        self.sample.steps_per_stage(k)
        if self.video.unit_frames is not None:
            for frames in self.data.clip_lengths():
                try:
                    unit_spans(frames, self.video.unit_frames)
                except ValueError as err:
                    key = "data.frames" if self.data.frame_buckets is None else "a data.frame_buckets entry"
                    raise ValueError(f"{key}={frames} with video.unit_frames={self.video.unit_frames}: {err}") from err
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
        """(C, T, H, W) of a full-resolution latent of the square size (every sample's, without buckets)."""
        size = self.latent_size()
        return (self.latent_channels(), self.data.frames, size, size)

    def bucket_multiple(self) -> int:
        """Pixels a bucket's sides must be a multiple of: every stage whole patches, in latent units."""
        return self.model.patch_size * 2 ** (self.schedule.stages - 1) * self.latent.resolved_downsample()

    def buckets(self, aspects: list[float] | None = None) -> list[Bucket]:
        """The shapes samples are brought to. Without buckets: one, image_size square. ``aspects`` resolves
        data.aspect_buckets = auto (the ratios the data has, see auto_aspects)."""
        d = self.data
        if not d.bucketed:
            return [Bucket(d.image_size, d.image_size, d.frames)]
        if aspects is None:
            if d.aspect_buckets == "auto":
                raise ValueError("data.aspect_buckets=auto needs the data's sizes (pyraflow.data.resolve_buckets).")
            aspects = [1.0] if d.aspect_buckets is None else [parse_aspect(a) for a in d.aspect_buckets]
        return make_buckets(aspects, d.resolution or d.image_size, self.bucket_multiple(), d.clip_lengths())

    def valid_size(self, height: int, width: int) -> tuple[int, int]:
        """The nearest picture size the pyramid can halve cleanly (sides multiples of bucket_multiple)."""
        from pyraflow.config.buckets import bucket_side

        m = self.bucket_multiple()
        return bucket_side(height, m), bucket_side(width, m)


def check_sequence_heads(heads: int, ranks: int) -> None:
    """Each rank of a sequence-parallel group attends over 1/ranks of the heads: refuse a split that is not whole,
    naming the group sizes that divide the heads."""
    if heads % ranks:
        valid = [n for n in range(1, heads + 1) if heads % n == 0]
        nearest = min(valid, key=lambda n: (abs(n - ranks), n))
        raise ValueError(f"train.sequence_parallel={ranks} does not divide the model's {heads} heads; use "
                         f"{nearest} (any of {valid}).")


def valid_keys() -> list[str]:
    return dotted_keys(Config)


# Keys older runs wrote (in run.yaml) that now always hold this value; read and dropped so those runs still load.
RETIRED_KEYS = {("model", "modulation"): "broadcast"}


def drop_retired(raw: dict) -> None:
    for (section, key), value in RETIRED_KEYS.items():
        part = raw.get(section)
        if isinstance(part, dict) and key in part:
            if part[key] != value:
                raise ValueError(f"{section}.{key}={part[key]!r} is no longer a setting (always {value!r} now); "
                                 f"remove it from the config.")
            del part[key]


def build_config(raw: dict) -> Config:
    """A validated Config from a nested mapping; model.in_channels follows the latents unless set."""
    drop_retired(raw)
    kwargs = build_kwargs(Config, raw, valid_keys())
    if "in_channels" not in (raw.get("model") or {}):
        channels = kwargs.get("latent", LatentConfig()).resolved_channels(kwargs.get("data", DataConfig()).channels)
        kwargs["model"] = dataclasses.replace(kwargs.get("model", ModelConfig()), in_channels=channels)
    return Config(**kwargs)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (optional) + overrides -> validated Config. Errors name the key and the fix."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist; pass a YAML file such as configs/mnist.yaml.")
        try:
            raw = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections (schedule:, model:, ...).")
    valid = valid_keys()
    for assignment in overrides:
        apply_override(raw, assignment, valid)
    return build_config(raw)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)
