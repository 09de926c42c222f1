"""One dataclass per component of a run, each validating itself in ``__post_init__``.

Plain Python only (no torch, no numpy), so reading, checking and printing a configuration is cheap and
every module can import its section from here without an import cycle. A field's docstring gives its
unit and what it does; an invalid value raises ValueError naming the key and the fix. (Runs of field
declarations in one section have the shape of runs in another; they are declarations, not repeated logic.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pyraflow.config.buckets import parse_aspect

SCHEDULE_PRESETS = ("continuous", "pyramid-flow")
DENSITIES = ("uniform", "logit-normal", "mode")
ATTENTION_BACKENDS = ("auto", "grouped", "flex", "flash")
ARCHS = ("mmdit", "flux", "mmdit-sd3")
DATASETS = ("mnist", "emoji", "clips", "scenes", "image-folder", "video-folder", "pyramid-flow")
MIX_KINDS = ("constant", "piecewise", "linear", "adaptive")
RATIO_UNITS = ("samples", "tokens")
PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL_MODES = ("ddp", "fsdp")


def check_choice(key: str, value, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{key}={value!r} is unknown; use one of {', '.join(options)}.")


def compile_setting(key: str, value) -> str | bool:
    """auto, true or false (also the strings 'true' / 'false' of a command line)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not (value == "auto" or isinstance(value, bool)):
        raise ValueError(f"{key}={value!r} is unknown; use auto, true or false.")
    return value


def check_integer(key: str, value, minimum: int = 1, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} must be an integer >= {minimum}{note}.")


def check_range(key: str, value, low: float, high: float, open_low: bool = False, open_high: bool = False) -> None:
    """low <= value <= high, with either end open; the message writes the interval as [low, high), (low, high] ..."""
    below = value <= low if open_low else value < low
    above = value >= high if open_high else value > high
    if below or above:
        raise ValueError(f"{key}={value} must be in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}.")


def check_optional_integer(key: str, value, minimum: int = 1) -> None:
    if value is not None:
        check_integer(key, value, minimum, " (or null)")



# ----- schedule ---------------------------------------------------------------------------------------

def uniform_boundaries(stages: int) -> list[float]:
    return [k / stages for k in range(stages + 1)]


@dataclass
class ScheduleConfig:
    """How the noise-level axis is cut into stages and how training timesteps are drawn."""

    preset: str = "continuous"
    """``continuous``: exact formulas. ``pyramid-flow``: the reference implementation's numbers,
    discretised on its 1000-step grid (sigma table, truncated grid indices, r drawn on the grid)."""
    stages: int = 3
    """Number of pyramid stages K (any K >= 1); stage k is downsampled by 2**(K-1-k) per side."""
    boundaries: list[float] | None = None
    """K+1 strictly increasing stage boundaries on the progress axis t = 1 - sigma, from 0 to 1.
    Stage k ends at sigma = 1 - boundaries[k+1]. None means uniform: [0, 1/K, ..., 1]."""
    gamma: float = 1 / 3
    """Block-noise correlation at stage jumps, in (0, 1/3]. Sets the corrected stage starts."""
    shift: float = 1.0
    """SD3 timestep shift applied to the boundary sigmas: sigma' = shift*sigma / (1 + (shift-1)*sigma)."""
    density: str = "logit-normal"
    """Training density of u = 1 - r within each stage's window: logit-normal (logit_mean, logit_std; more draws in
    the middle of the window, fewer at its ends where the target is easiest), uniform, or mode (mode_scale)."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    num_timesteps: int = 1000
    """Length of the model's timestep axis (timesteps run from num_timesteps at pure noise to 0)."""

    def __post_init__(self) -> None:
        check_choice("schedule.preset", self.preset, SCHEDULE_PRESETS)
        check_integer("schedule.stages", self.stages, 1, " (e.g. 3)")
        if self.boundaries is not None:
            b = [float(x) for x in self.boundaries]
            if len(b) != self.stages + 1:
                raise ValueError(
                    f"schedule.boundaries has {len(b)} values but stages={self.stages} needs "
                    f"{self.stages + 1} (from 0 to 1), e.g. {uniform_boundaries(self.stages)}."
                )
            if abs(b[0]) > 1e-12 or abs(b[-1] - 1.0) > 1e-12:
                raise ValueError(f"schedule.boundaries={b} must start at 0 and end at 1 (they cut t = 1 - sigma).")
            if any(not (lo < hi) for lo, hi in zip(b, b[1:])):
                raise ValueError(
                    f"schedule.boundaries={b} must be strictly increasing inside [0, 1]; "
                    "each stage needs a window of positive length."
                )
            self.boundaries = b
        if not (0.0 < self.gamma <= 1 / 3 + 1e-12):
            raise ValueError(
                f"schedule.gamma={self.gamma} must lie in (0, 1/3]: block noise over a 2x2 block has "
                "covariance (1+gamma) I - gamma 11^T, which is a valid covariance only for gamma <= 1/3."
            )
        if self.shift <= 0:
            raise ValueError(f"schedule.shift={self.shift} must be > 0 (1 means no shift).")
        check_choice("schedule.density", self.density, DENSITIES)
        if self.logit_std <= 0:
            raise ValueError(f"schedule.logit_std={self.logit_std} must be > 0.")
        check_integer("schedule.num_timesteps", self.num_timesteps, 2)


# ----- data, text, latents ----------------------------------------------------------------------------

@dataclass
class DataConfig:
    """Where samples come from and the pixel shape they are brought to."""

    dataset: str = "mnist"
    """mnist, emoji (the glyphs of a colour emoji font, captioned with their names), clips (bundled videos), scenes
    (bundled photos cut at several aspect ratios), image-folder, video-folder, or pyramid-flow (the reference's annotation jsonl with pre-extracted latents and text features:
    pyraflow.data.pyramid_flow)."""
    path: str | None = None
    """Folder for image-folder / video-folder; the annotation .jsonl for pyramid-flow; the colour font for emoji
    (default: Debian's fonts-noto-color-emoji)."""
    root: str | None = None
    """pyramid-flow: folder the jsonl's relative paths start from (None: the jsonl's own folder)."""
    image_size: int = 32
    """Height and width in pixels after resizing (without aspect_buckets), and the default target side."""
    resolution: int | None = None
    """With aspect_buckets: the target area, as the side of a square (256 means about 256 x 256 pixels per picture
    in every bucket). None: image_size."""
    aspect_buckets: list[float | str] | str | None = None
    """Keep each picture's shape: its aspect ratio (width / height, or "W:H") goes to the nearest of these buckets,
    e.g. [1:2, 3:4, 1:1, 4:3, 2:1], or ``auto`` to take the ratios the data has. None: every sample is
    image_size x image_size."""
    frame_buckets: list[int] | None = None
    """Clip lengths to cut videos into (each clip takes the longest that fits, cycling through them); None: data.frames."""
    channels: int = 1
    """Image channels: 1 (grey) or 3 (RGB)."""
    resize: str = "pad"
    """``crop``: scale the short side to image_size and centre-crop; ``pad``: scale down only if larger,
    then centre-pad with black."""
    frames: int = 1
    """Frames per sample (1 for images; clip length for videos)."""
    frame_stride: int = 1
    """Take every n-th decoded frame when cutting clips."""
    clip_hop: int | None = None
    """Decoded frames between the starts of consecutive clips; None: clips do not overlap (frames * frame_stride)."""
    max_bad_fraction: float = 0.1
    """Give up if more than this fraction of the files cannot be read."""
    cache: str | None = None
    """Directory of latents/text prepared by ``pyraflow prepare``; training reads it row by row (memory does not
    grow with the dataset) when it fits the config, and prepares it first if it is not there."""
    text_dtype: str = "float32"
    """dtype of the text states in a prepared cache: ``float32``, or ``bfloat16`` (half the disk and reads) for runs
    in bf16, where autocast rounds the text to bf16 at the model's first layer anyway."""
    workers: int = 2
    """DataLoader worker processes that read samples and build the packed batches ahead of the step (0: in the
    training process)."""
    prefetch: int = 2
    """Batches each worker prepares ahead."""
    num_samples: int | None = None
    """Dataset size for ``pyraflow plan`` when the data is not at hand (e.g. a GPU-scale preset)."""
    skin_tones: bool = True
    """emoji: keep the skin-tone variants of people and hands (near-copies of their default yellow glyphs, a large
    share of the font); false keeps only the default glyphs, so every other glyph is seen more often."""

    def __post_init__(self) -> None:
        check_choice("data.dataset", self.dataset, DATASETS)
        if not self.skin_tones and self.dataset != "emoji":
            raise ValueError(f"data.skin_tones=false selects emoji glyphs, but data.dataset={self.dataset}; "
                             "remove it or use data.dataset=emoji.")
        if self.dataset in ("image-folder", "video-folder") and self.path is None and self.num_samples is None:
            raise ValueError(f"data.dataset={self.dataset} needs data.path (the folder to read).")
        if self.dataset == "pyramid-flow" and self.path is None and self.num_samples is None:
            raise ValueError("data.dataset=pyramid-flow needs data.path (the annotation .jsonl to read).")
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels={self.channels} must be 1 (grey) or 3 (RGB).")
        check_choice("data.resize", self.resize, ("crop", "pad"))
        check_optional_integer("data.clip_hop", self.clip_hop)
        for name in ("image_size", "frames", "frame_stride"):
            check_integer(f"data.{name}", getattr(self, name))
        check_range("data.max_bad_fraction", self.max_bad_fraction, 0, 1, open_high=True)
        check_choice("data.text_dtype", self.text_dtype, ("float32", "bfloat16"))
        check_integer("data.workers", self.workers, 0)
        check_integer("data.prefetch", self.prefetch, 1)
        check_optional_integer("data.num_samples", self.num_samples, 0)
        check_optional_integer("data.resolution", self.resolution)
        if isinstance(self.aspect_buckets, str):
            if self.aspect_buckets != "auto":
                raise ValueError(f"data.aspect_buckets={self.aspect_buckets!r} must be a list of ratios or 'auto'.")
        elif self.aspect_buckets is not None:
            if not self.aspect_buckets:
                raise ValueError("data.aspect_buckets is empty; give ratios such as [3:4, 1:1, 4:3], 'auto', or null.")
            for value in self.aspect_buckets:
                parse_aspect(value)
        if self.frame_buckets is not None:
            if not self.frame_buckets:
                raise ValueError("data.frame_buckets is empty; give clip lengths such as [9, 17], or null.")
            for value in self.frame_buckets:
                check_integer("data.frame_buckets[]", value)

    @property
    def bucketed(self) -> bool:
        """Whether samples keep their own shapes (aspect or clip-length buckets, or pre-extracted latents of many
        shapes) instead of one square size."""
        return self.aspect_buckets is not None or self.frame_buckets is not None or self.dataset == "pyramid-flow"

    def clip_lengths(self) -> list[int]:
        return sorted(set(self.frame_buckets)) if self.frame_buckets else [self.frames]


@dataclass
class TextConfig:
    encoder: str = "minilm"
    """``minilm`` (bundled, offline), a local directory holding a Hugging Face text encoder, ``pyramid-flow``: the
    released models' encoders (CLIP + T5, read from ``path``), or ``prepared``: text features extracted elsewhere
    (data.dataset=pyramid-flow), widths model.text_dim / model.pooled_dim."""
    path: str | None = None
    """encoder=pyramid-flow: the released folder (pyramid-flow-miniflux or -sd3) whose tokenizer*/text_encoder*
    subfolders hold the encoders."""
    null_features: str | None = None
    """encoder=prepared: the features of the empty caption (a .pt of the reference's text_fea layout), used for
    caption dropout; None: one zero token and a zero pooled vector."""
    max_tokens: int = 8
    """Token states per caption after truncation; the batcher budgets this many text tokens per sample."""

    def __post_init__(self) -> None:
        check_integer("text.max_tokens", self.max_tokens, 2)
        if self.encoder == "pyramid-flow" and not self.path:
            raise ValueError("text.encoder=pyramid-flow reads the released encoders from text.path; set it to the "
                             "released folder (e.g. text.path=/models/pyramid-flow-miniflux).")


@dataclass
class LatentConfig:
    kind: str = "pixel"
    """``pixel`` (train on pixels), ``vae`` (a diffusers AutoencoderKL in ``path``) or ``pyramid-flow-vae``
    (Pyramid Flow's causal video VAE in ``path``, a released folder's causal_video_vae/: 1 + 8k frames -> 1 + k
    latent frames; a run's frame counts are then latent frames)."""
    path: str | None = None
    """Local directory of the VAE (config.json + weights) for kind=vae or pyramid-flow-vae."""
    scale: float | None = None
    """Latent scale; None: 1 for pixels, the VAE config's scaling_factor for vae."""
    shift: float | None = None
    """Latent shift; None: 0 for pixels, the VAE config's shift_factor (or 0) for vae."""
    channels: int | None = None
    """Latent channels; None: the image channels for pixels, read from the VAE config for vae."""
    downsample: int | None = None
    """Pixels per latent per side; None: 1 for pixels, read from the VAE config for vae."""
    video_scale: float | None = None
    """Scale of a clip's frames after the first (Pyramid Flow's causal video VAE normalises those apart); None: scale."""
    video_shift: float | None = None
    """Shift of a clip's frames after the first; None: shift."""

    def __post_init__(self) -> None:
        check_choice("latent.kind", self.kind, ("pixel", "vae", "pyramid-flow-vae"))
        if self.kind == "pyramid-flow-vae" and self.path is None:
            raise ValueError("latent.kind=pyramid-flow-vae needs latent.path: a released folder's causal_video_vae/ "
                             "directory (or latent.kind=vae without a path for latents prepared elsewhere).")
        factors = (self.scale, self.shift, self.video_scale, self.video_shift)
        if self.kind == "pyramid-flow-vae" and None in factors:
            raise ValueError("latent.kind=pyramid-flow-vae needs latent.scale, shift, video_scale and video_shift (the "
                             "pipelines' own: flux 1/1.8726, -0.04; sd3 1/1.8415, 0.149; both 1/3.0986, -0.2343 for "
                             "later frames; the fine-tune presets carry them).")
        if self.kind == "vae" and self.path is None and (self.channels is None or self.downsample is None):
            raise ValueError(
                "latent.kind=vae needs latent.path (a local AutoencoderKL directory), or latent.channels and "
                "latent.downsample for planning without the weights."
            )
        if self.kind == "pixel" and self.downsample not in (None, 1):
            raise ValueError(f"latent.downsample={self.downsample} must be 1 (or unset) in pixel space.")

    def vae_config(self) -> dict:
        import json
        from pathlib import Path

        path = Path(self.path) / "config.json"
        if not path.is_file():
            raise ValueError(f"latent.path={self.path!r} has no config.json; point it at a diffusers AutoencoderKL directory "
                             "(latent.kind=vae) or a released folder's causal_video_vae/ (latent.kind=pyramid-flow-vae).")
        return json.loads(path.read_text())

    def resolved_channels(self, image_channels: int) -> int:
        if self.channels is not None:
            return self.channels
        if self.kind == "pixel":
            return image_channels
        hf = self.vae_config()
        return int(hf["encoder_out_channels"] if self.kind == "pyramid-flow-vae" else hf["latent_channels"])

    def resolved_downsample(self) -> int:
        if self.downsample is not None:
            return self.downsample
        if self.kind == "pixel":
            return 1
        hf = self.vae_config()
        if self.kind == "pyramid-flow-vae":
            return int(hf["downsample_scale"])
        return 2 ** (len(hf["block_out_channels"]) - 1)


# ----- model ------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """Shape of the transformer. Widths in channels; head_dim = width / num_heads."""

    arch: str = "mmdit"
    """``mmdit``: pyraflow's multi-stage MMDiT. ``flux``: the released pyramid-flow-miniflux transformer (double- then
    single-stream blocks, 3-axis RoPE); ``mmdit-sd3``: the released pyramid-flow-sd3 transformer (sincos positions,
    temporal RoPE). Both reproduce the reference's weights and outputs (pyraflow.interop), packed."""
    in_channels: int = 1
    """Latent channels of the visual input (and output); in a run config it follows the latents."""
    patch_size: int = 4
    width: int = 256
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 384
    """Width of the text encoder's token states."""
    pooled_dim: int = 384
    """Width of the pooled text vector that joins the timestep in the adaLN conditioning."""
    rope_axes: list[int] | None = None
    """Head dims given to the (t, h, w) RoPE axes; even numbers summing to head_dim. None: 1/4, 3/8, 3/8."""
    rope_theta: float = 10000.0
    attention: str = "auto"
    """Attention backend: auto, grouped, flex or flash (see pyraflow.attention)."""
    temporal_causal: bool = False
    """Visual tokens see only their own and earlier frames (and the text); text sees only text."""
    checkpoint_fraction: float = 0.0
    """Training: fraction of blocks (the first ones) whose activations are recomputed in backward to save memory
    (applied by pyraflow.train.parallelize)."""
    single_depth: int = 0
    """flux: single-stream blocks after the ``depth`` double-stream ones."""
    sample_size: int = 128
    """mmdit-sd3: the latent side its sincos position table is centred for (base size = sample_size / patch_size)."""
    pos_embed_max_size: int = 192
    """mmdit-sd3: side of its sincos position table (in patches)."""

    def __post_init__(self) -> None:
        check_choice("model.arch", self.arch, ARCHS)
        for name in ("in_channels", "patch_size", "width", "depth", "num_heads", "text_dim", "pooled_dim"):
            check_integer(f"model.{name}", getattr(self, name))
        check_integer("model.single_depth", self.single_depth, 0)
        if self.arch == "flux" and self.patch_size != 2:
            raise ValueError(f"model.patch_size={self.patch_size}: the flux architecture patchifies 2 x 2 (as released).")
        if self.width % self.num_heads:
            raise ValueError(f"model.width={self.width} must be divisible by model.num_heads={self.num_heads}.")
        axes = self.axes()
        if self.arch != "mmdit-sd3" and (len(axes) != 3 or sum(axes) != self.head_dim or any(a < 2 or a % 2 for a in axes)):
            raise ValueError(f"model.rope_axes={axes} must be three positive even numbers summing to head_dim={self.head_dim}.")
        check_choice("model.attention", self.attention, ATTENTION_BACKENDS)
        check_range("model.checkpoint_fraction", self.checkpoint_fraction, 0, 1)
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio} must be > 0.")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def axes(self) -> list[int]:
        if self.rope_axes is not None:
            return list(self.rope_axes)
        d = self.head_dim
        t = 2 * max(1, d // 8)
        h = 2 * ((d - t) // 4)
        return [t, h, d - t - h]


# ----- batching -------------------------------------------------------------------------------------

def ratio_presets(num_stages: int) -> dict[str, list[float]]:
    presets = {"uniform": [1.0 / num_stages] * num_stages}
    if num_stages == 3:
        presets["25-50-25"] = [0.25, 0.5, 0.25]
    return presets


def resolve_ratio(value: str | list[float], num_stages: int, where: str = "batching.mix.ratio") -> list[float]:
    """A preset name or a list of non-negative reals summing to 1 -> one float per stage."""
    if isinstance(value, str):
        presets = ratio_presets(num_stages)
        if value not in presets:
            extra = "" if num_stages == 3 else " ('25-50-25' needs exactly 3 stages)"
            raise ValueError(
                f"{where}={value!r} is not a preset for {num_stages} stages; use one of "
                f"{', '.join(presets)} or a list of {num_stages} ratios{extra}."
            )
        return list(presets[value])
    ratio = [float(v) for v in value]
    if len(ratio) != num_stages:
        raise ValueError(
            f"{where}={list(value)} has {len(ratio)} entries but the schedule has {num_stages} stages; "
            f"give one ratio per stage (e.g. {ratio_presets(num_stages)['uniform']})."
        )
    if any(r < 0 or not math.isfinite(r) for r in ratio):
        raise ValueError(f"{where}={list(value)} has a negative or non-finite entry; ratios must be >= 0.")
    total = sum(ratio)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{where}={list(value)} sums to {total:.6g}; ratios must sum to 1.")
    return [r / total for r in ratio]


@dataclass
class MixConfig:
    """The stage mix over training.

    kind:
      - ``constant``: ``ratio`` at every step.
      - ``piecewise``: ``points`` is a list of ``{ratio: ..., until: STEP}``; each ratio holds until its
        step (exclusive); the last may omit ``until`` and then holds forever.
      - ``linear``: ``points`` is a list of ``{step: STEP, ratio: ...}``; the ratio moves linearly between
        consecutive points and stays at the first/last point outside them.
      - ``adaptive``: starts at ``ratio`` and moves it toward the stages whose loss improves slowest
        (see pyraflow.batching.AdaptiveMix for the rule), within ``adaptive_min`` .. ``adaptive_max`` per stage.
    """

    kind: str = "constant"
    ratio: list[float] | str = "25-50-25"
    points: list[dict] = field(default_factory=list)
    adaptive_rate: float = 0.05
    """Fraction of the way the ratio moves toward the adaptive target at each update."""
    adaptive_every: int = 50
    """Steps between adaptive updates; an update takes effect this many steps after the losses it reads."""
    adaptive_sensitivity: float = 1.0
    """How strongly slow-improving stages are favoured: the target weight is base * exp(-s * z) with z in [-1, 1]."""
    adaptive_min: list[float] | float = 0.1
    adaptive_max: list[float] | float = 0.7

    def __post_init__(self) -> None:
        check_choice("batching.mix.kind", self.kind, MIX_KINDS)
        if self.kind in ("piecewise", "linear") and not self.points:
            example = (
                "[{ratio: [0.5, 0.3, 0.2], until: 1000}, {ratio: 25-50-25}]"
                if self.kind == "piecewise"
                else "[{step: 0, ratio: [0.5, 0.3, 0.2]}, {step: 2000, ratio: 25-50-25}]"
            )
            raise ValueError(f"batching.mix.kind={self.kind} needs batching.mix.points, e.g. {example}.")
        check_range("batching.mix.adaptive_rate", self.adaptive_rate, 0, 1, open_low=True)
        check_integer("batching.mix.adaptive_every", self.adaptive_every)


@dataclass
class BatchingConfig:
    """Token-budget batches with a stage mix."""

    token_budget: int = 2048
    """Tokens per batch per rank (visual + text, plus the attention term below). Every batch is filled
    close to this and never above it."""
    mix: MixConfig = field(default_factory=MixConfig)
    ratio_unit: str = "samples"
    """What a mix ratio counts: ``samples`` (as the reference: 25/50/25 means a quarter of the samples are
    stage 0) or ``tokens`` (a quarter of the tokens are stage 0, so far more stage-0 samples)."""
    attention_cost: float = 0.0
    """Extra cost per token per token of segment length: a segment of L tokens costs L + attention_cost * L**2.
    About 1 / (6 * model width) makes attention FLOPs count like the linear layers' FLOPs."""
    batch_multiple: int = 1
    """The number of samples in a batch is a multiple of this."""
    max_samples: int = 1024
    """At most this many samples in one batch, whatever the budget allows."""
    seed: int = 0
    """Seed of the per-epoch data permutation."""

    def __post_init__(self) -> None:
        check_integer("batching.token_budget", self.token_budget, 1, " tokens")
        check_choice("batching.ratio_unit", self.ratio_unit, RATIO_UNITS)
        if self.attention_cost < 0:
            raise ValueError(f"batching.attention_cost={self.attention_cost} must be >= 0.")
        check_integer("batching.batch_multiple", self.batch_multiple)
        if self.max_samples < self.batch_multiple:
            raise ValueError(f"batching.max_samples={self.max_samples} is below batching.batch_multiple={self.batch_multiple}.")


# ----- video ------------------------------------------------------------------------------------------

def unit_spans(frames: int, unit_frames: int) -> list[tuple[int, int]]:
    """(first frame, number of frames) of every unit of a ``frames``-long video: unit 0 is frame 0 alone."""
    if frames < 1 or (frames - 1) % unit_frames:
        raise ValueError(
            f"a video of {frames} frames is not a first frame plus units of {unit_frames} frames; use "
            f"1 + U * {unit_frames} frames (e.g. {1 + unit_frames * max(1, (frames - 1) // unit_frames)})."
        )
    return [(0, 1)] + [(1 + u * unit_frames, unit_frames) for u in range((frames - 1) // unit_frames)]


@dataclass
class VideoConfig:
    """Autoregressive video over units of frames (leave unit_frames unset for images or whole clips)."""

    unit_frames: int | None = None
    """Frames per unit F. Set: data.frames must be 1 + U * F, and training predicts one unit per example
    conditioned on the earlier ones. None: every sample is generated whole (images, or clips at once)."""
    image_ratio: float = 0.25
    """Share of training examples that are unit 0 (the first frame alone, i.e. an image); the rest spread
    evenly over units 1..U."""
    history_noise: float = 0.1
    """History is corrupted with a noise level drawn uniformly from [0, history_noise] per example."""
    max_history_units: int | None = None
    """Condition on at most this many earlier units (None: all of them)."""
    sample_history_noise: float = 0.0
    """Noise level of the history when sampling (0: the generated frames as they are)."""
    max_frames: int | None = None
    """Longest video ``pyraflow sample --frames`` may ask for; None: the training clip length (data.frames)."""
    cache: bool = True
    """Compute the text and history keys/values once per unit when sampling instead of at every step."""
    image_dataset: str | None = None
    """An image-only dataset trained beside the clips (``mnist`` or ``image-folder``, brought to data.image_size
    and data.channels): a share of the image examples (unit 0) take an image and its caption from it instead
    of a clip's first frame. None: images are the clips' first frames only."""
    image_path: str | None = None
    """Folder for ``image_dataset: image-folder`` (images, captioned by captions.jsonl or .txt files as for data.path)."""
    image_dataset_share: float = 0.5
    """Share of the image examples (unit 0) drawn from image_dataset; the rest are first frames of the clips."""

    def __post_init__(self) -> None:
        for name in ("unit_frames", "max_history_units", "max_frames"):
            check_optional_integer(f"video.{name}", getattr(self, name))
        for name in ("image_ratio", "image_dataset_share"):
            check_range(f"video.{name}", getattr(self, name), 0, 1)
        for name in ("history_noise", "sample_history_noise"):
            check_range(f"video.{name}", getattr(self, name), 0, 1, open_high=True)
        if self.image_dataset is not None:
            check_choice("video.image_dataset", self.image_dataset, ("mnist", "image-folder"))
        if self.image_dataset == "image-folder" and self.image_path is None:
            raise ValueError("video.image_dataset=image-folder needs video.image_path (the folder of images).")


# ----- training and sampling ---------------------------------------------------------------------------

@dataclass
class LoraConfig:
    """Low-rank adapters (peft) instead of full fine-tuning: the base weights (train.init_from) stay frozen; only the
    adapters are optimised, averaged (EMA) and checkpointed."""

    rank: int = 0
    """Adapter rank; 0: no adapters, every weight trains."""
    alpha: float | None = None
    """Scale numerator (updates are scaled by alpha / rank); None: rank."""
    targets: list[str] | None = None
    """Names (or name endings) of the linear layers that get adapters; None: every attention projection of the
    architecture (q, k, v and output, both streams)."""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_integer("train.lora.rank", self.rank, 0)
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"train.lora.alpha={self.alpha} must be > 0 (or null for the rank).")
        check_range("train.lora.dropout", self.dropout, 0, 1, open_high=True)
        if self.targets is not None and not self.targets:
            raise ValueError("train.lora.targets is empty; name layers such as [to_q, to_k, to_v], or null for the default.")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of a training run."""

    init_from: str | None = None
    """Start from these weights instead of a fresh init: a released Pyramid Flow ``diffusion_transformer_*`` folder,
    a pyraflow checkpoint or a model directory (``pyraflow convert``). Its architecture must be the model section's."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    steps: int = 1000
    """Optimizer steps in the run."""
    lr: float = 3e-3
    """Peak learning rate. The default suits the small demo model's short run; large models want far less
    (the GPU and fine-tuning presets use 1e-4)."""
    warmup_steps: int = 100
    """Linear learning-rate warmup from 0."""
    lr_schedule: str = "cosine"
    """After warmup: ``constant``, or ``cosine`` decay to lr * min_lr_ratio at train.steps."""
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    grad_accum: int = 1
    """Batches (each one token budget) per optimizer step."""
    precision: str = "auto"
    """``fp32``, ``bf16`` (autocast, fp32 master weights) or ``auto``: bf16 on CUDA, fp32 on CPU. The choice is
    recorded in the run and a resume keeps it. (Whether bf16 pays on a given CPU depends on its matrix
    units: ``pyraflow bench`` times both.)"""
    ema_decay: float = 0.99
    """EMA decay per step; 0.99 averages over ~100 steps (short runs at a high LR), long runs use ~0.9999."""
    ema_warmup_steps: int = 100
    """The decay ramps linearly from 0 to ema_decay over these steps, so the EMA starts as the model itself."""
    text_dropout: float = 0.1
    """Probability of replacing a caption by the null embedding (for classifier-free guidance)."""
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500
    """Write a sample grid every this many steps (and at the end); 0 disables the intermediate ones."""
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    max_bad_steps: int = 5
    """Consecutive steps with a non-finite loss or gradient after which the run saves and stops."""
    parallel: str = "ddp"
    """Data parallelism under torchrun: ``ddp`` or ``fsdp`` (FSDP2 fully_shard)."""
    sequence_parallel: int = 1
    """Under torchrun: ranks that split each batch's token sequence between them (Ulysses: every rank holds a
    contiguous 1/N of the packed tokens; an all-to-all before attention trades it for every token of 1/N of the heads).
    Groups are consecutive ranks; the world size must be a multiple, the model's heads too. Activation memory per GPU
    falls about N-fold; each group trains on one batch, so the data-parallel batch count is world / N."""
    collective_timeout_minutes: float = 10.0
    """Under torchrun: how long a rank waits in a collective for a peer that hangs before the job fails."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    time_limit_minutes: float | None = None
    """Stop (with a checkpoint) once training has run this long, even before train.steps: equal-compute runs."""
    compile: str | bool = "auto"
    """Compile each transformer block (torch.compile, dynamic token counts; attention stays eager between the two
    compiled halves): ``true``, ``false`` or ``auto`` (on where the device has a compiler toolchain: a C++ compiler
    on CPU, Triton on CUDA; the decision is logged). The first step pays the compilation; BENCHMARKS.md has what it
    costs and gains per host and precision."""

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "log_every", "max_bad_steps"):
            check_integer(f"train.{name}", getattr(self, name))
        for name in ("warmup_steps", "ema_warmup_steps", "sample_every", "checkpoint_every", "keep_checkpoints"):
            check_integer(f"train.{name}", getattr(self, name), 0)
        if self.lr <= 0:
            raise ValueError(f"train.lr={self.lr} must be > 0.")
        for name in ("ema_decay", "text_dropout"):
            check_range(f"train.{name}", getattr(self, name), 0, 1, open_high=True)
        check_choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        check_range("train.min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_choice("train.precision", self.precision, PRECISIONS)
        self.compile = compile_setting("train.compile", self.compile)
        if self.time_limit_minutes is not None and self.time_limit_minutes <= 0:
            raise ValueError(f"train.time_limit_minutes={self.time_limit_minutes} must be > 0 (or null).")
        if self.collective_timeout_minutes <= 0:
            raise ValueError(f"train.collective_timeout_minutes={self.collective_timeout_minutes} must be > 0.")
        check_choice("train.parallel", self.parallel, PARALLEL_MODES)
        check_integer("train.sequence_parallel", self.sequence_parallel)
        check_optional_integer("train.threads", self.threads)
        if self.lora.rank and not self.init_from:
            raise ValueError("train.lora.rank is set but train.init_from is not: adapters fine-tune existing weights; "
                             "point train.init_from at them (or set train.lora.rank: 0 to train from scratch).")


@dataclass
class SampleConfig:
    """How sample grids are drawn (during training and by ``pyraflow sample``)."""

    steps: list[int] | int = 10
    """Euler steps per stage: one number for every stage, or one per stage."""
    guidance: float = 3.0
    """Classifier-free guidance scale (1 = no guidance)."""
    video_guidance: float | None = None
    """Guidance of a video's units after the first frame (the reference's video_guidance_scale); None: guidance."""
    solver: str = "euler"
    """ODE step inside each stage: ``euler`` (one model call per step) or ``heun`` (two; second order)."""
    prompts: list[str] = field(default_factory=list)
    """Prompts for the grids written during training; empty means the dataset's own (the ten digits for mnist)."""
    per_prompt: int = 8
    """Images per prompt in those grids."""
    seed: int = 0
    prompt_suffix: str = ""
    """Appended to every prompt before it is encoded (the released Pyramid Flow pipeline adds ", hyper quality,
    Ultra HD, 8K")."""
    negative_prompt: str | None = None
    """The caption of guidance's unconditional branch; None: the empty caption the run trained its dropout with."""
    compile: str | bool = "auto"
    """Compile each transformer block for sampling (as train.compile; ``pyraflow sample`` and the grids written
    during training)."""

    def __post_init__(self) -> None:
        self.compile = compile_setting("sample.compile", self.compile)
        steps = [self.steps] if isinstance(self.steps, int) else list(self.steps)
        if not steps or any(not isinstance(s, int) or s < 1 for s in steps):
            raise ValueError(f"sample.steps={self.steps!r} must be a positive integer or a list of them (one per stage).")
        for name in ("guidance", "video_guidance"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"sample.{name}={value} must be >= 0.")
        check_choice("sample.solver", self.solver, ("euler", "heun"))
        check_integer("sample.per_prompt", self.per_prompt)

    def steps_per_stage(self, num_stages: int) -> list[int]:
        steps = [self.steps] * num_stages if isinstance(self.steps, int) else list(self.steps)
        if len(steps) != num_stages:
            raise ValueError(f"sample.steps has {len(steps)} entries for {num_stages} stages; give one per stage.")
        return steps
