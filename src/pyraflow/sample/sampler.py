"""Pyramidal sampling: Euler steps through each stage, a renoising jump between stages, and
classifier-free guidance. The sampler owns the loop; the model is only a velocity function.

Everything stays on the model's device from the first noise to the last step, block noise included (draw with
a generator on that device: the same seed gives the same samples on a given device).
"""

from __future__ import annotations

import time

import torch

from pyraflow.config import unit_spans
from pyraflow.archs.base import PackedTransformer
from pyraflow.packing import Sample, pack, patchify, unpack_stacked
from pyraflow.schedule import PyramidSchedule
from pyraflow.text import TextEmbedding
from pyraflow.video import history_parts


def model_device(model) -> torch.device:
    """The device of a model's parameters (CPU for a parameter-free stand-in)."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a stage's wall time is its own (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SOLVERS = ("euler", "heun")


def integrate(velocity, x: torch.Tensor, grid: torch.Tensor, solver: str = "euler") -> torch.Tensor:
    """Integrate dx/dr = velocity(x, r) over the grid of r values (1 -> 0) of one stage.

    euler: x <- x + (r_next - r) v(x, r), one model call per step. heun: the Euler step's end point is corrected
    with the velocity there (the trapezoid of the two), two calls per step; the step that lands on r = 0 stays an
    Euler step (the velocity at the data end is where the model is least informed)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is unknown; use one of {', '.join(SOLVERS)}.")
    for i in range(len(grid) - 1):
        r, r_next = grid[i], grid[i + 1]
        dt = (r_next - r).float()
        v = velocity(x, r)
        if solver == "heun" and float(r_next) > 0:
            guess = x + dt * v
            v = 0.5 * (v + velocity(guess, r_next))
        x = x + dt * v
    return x


def _check_noise(noise: torch.Tensor, captions: int, latent_shape: tuple[int, ...]) -> None:
    if tuple(noise.shape) != (captions, *latent_shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; {captions} caption(s) of latents {tuple(latent_shape)} "
                         f"need {(captions, *latent_shape)}.")


@torch.no_grad()
def sample_pyramid(
    model: PackedTransformer,
    schedule: PyramidSchedule,
    text: TextEmbedding,
    null: TextEmbedding,
    latent_shape: tuple[int, int, int, int],
    steps: list[int],
    guidance: float = 3.0,
    generator: torch.Generator | None = None,
    solver: str = "euler",
    on_stage_end=None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Generate one latent per caption in ``text``, on the model's device.

    latent_shape: (C, T, H, W) at full resolution. noise: the full-resolution Gaussian (B, C, T, H, W) to start
    from, instead of one drawn with ``generator``. Returns (latents (B, C, T, H, W), seconds per stage).
    Stage 0 starts from the coarsest level of one full-resolution Gaussian; each stage integrates its
    local coordinate r from 1 to 0 (x <- x + (r_next - r) v); between stages ``schedule.jump`` upsamples
    and renoises with block noise. Guidance runs the conditional and null branches in one packed pass.
    ``generator`` must live on the model's device.
    """
    device = model_device(model)
    if noise is None:
        noise = torch.randn((len(text), *latent_shape), generator=generator, device=device)
    _check_noise(noise, len(text), latent_shape)
    noise = noise.to(device)
    return denoise_cascade(model, schedule, noise, text, null, steps, guidance, generator, solver=solver,
                           on_stage_end=on_stage_end)


def denoise_cascade(
    model: PackedTransformer,
    schedule: PyramidSchedule,
    noise: torch.Tensor,
    text: TextEmbedding,
    null: TextEmbedding,
    steps: list[int],
    guidance: float,
    generator: torch.Generator | None,
    history=None,
    unit: int | None = None,
    first_frame: int = 0,
    use_cache: bool = False,
    solver: str = "euler",
    on_stage_end=None,
) -> tuple[torch.Tensor, list[float]]:
    """Run one latent (per caption) through every stage: noise (B, C, T, H, W) at full resolution, on the model's
    device -> latents on that device.

    history(k, row) -> list of HistoryPart of caption ``row``, for a video unit predicted at stage k; with
    ``use_cache`` the text and history are run once per stage (PackedTransformer.prefix_cache) instead of at
    every step, where the architecture allows it (model.caches_history). solver: ``euler`` or ``heun`` (see ``integrate``). on_stage_end(k, x) sees each stage's end state.
    """
    model.eval()
    device = noise.device
    text, null = text.to(device), null.to(device)
    n = len(text)
    x = schedule.noise_pyramid(noise)[0]
    guided = guidance != 1.0
    captions = [text.item(j) for j in range(n)] + ([null.item(0)] * n if guided else [])
    timings = []
    p = model.config.patch_size
    for k in range(schedule.num_stages):
        start = time.perf_counter()
        if k > 0:
            x = schedule.jump(x, k, generator)
        grid = schedule.sampling_grid(steps[k])
        parts = [history(k, j % n) if history is not None else [] for j in range(len(captions))]
        # Shapes stay fixed within a stage, so pack and prepare once; each step only swaps in the
        # current latents and timestep.
        cache = None
        if use_cache and parts[0] and model.caches_history:
            prefix = [Sample(ps[-1].stage, ps[-1].latent, *c, ps[-1].timestep, ps[:-1], ps[-1].first_frame, ps[-1].unit)
                      for c, ps in zip(captions, parts)]
            cache = model.prefix_cache(pack(prefix, schedule.num_stages, p).to(device))
            parts = [[] for _ in captions]
        samples = [Sample(k, x[j % n], *c, 0.0, ps, first_frame, unit) for j, (c, ps) in enumerate(zip(captions, parts))]
        batch = pack(samples, schedule.num_stages, p).to(device)
        context = model.prepare(batch.layout, device, prefix=cache)
        rows = torch.tensor([i % n for i in batch.layout.order], device=device)  # packed segment -> row of x
        _, runs = torch.unique_consecutive(batch.layout.run_segment, return_counts=True)
        last_run = (runs.cumsum(0) - 1).to(device)  # the predicted latent's run in each segment
        with_history = batch.predicted.numel() != batch.visual.shape[0]

        def velocity(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            """The (guided) velocity at local coordinate r of stage k, for every caption: (n, C, T, H, W)."""
            batch.visual[batch.predicted] = patchify(x, p).index_select(0, rows).flatten(0, 1)
            batch.timestep[last_run] = float(schedule.timestep(torch.tensor([k]), r.float().reshape(1))[0])
            out = model(batch, context, prefix=cache)
            if with_history:
                out = out.index_select(0, batch.predicted)
            v = unpack_stacked(out.float(), batch.layout)  # (rows, C, T, H, W) in caption order
            if guided:
                v_cond, v_null = v[:n], v[n:]
                v = v_null + guidance * (v_cond - v_null)
            return v

        x = integrate(velocity, x, grid, solver)
        if on_stage_end is not None:
            on_stage_end(k, x)
        _synchronize(device)
        timings.append(time.perf_counter() - start)
    return x, timings


@torch.no_grad()
def sample_video(
    model: PackedTransformer,
    schedule: PyramidSchedule,
    text: TextEmbedding,
    null: TextEmbedding,
    latent_shape: tuple[int, int, int, int],
    unit_frames: int,
    steps: list[int],
    guidance: float = 3.0,
    generator: torch.Generator | None = None,
    first_frame: torch.Tensor | None = None,
    use_cache: bool = True,
    max_history_units: int | None = None,
    history_noise: float = 0.0,
    solver: str = "euler",
    on_stage_end=None,
    video_guidance: float | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Autoregressive video: unit by unit, each through the whole stage cascade, conditioned on the
    compressed history of the units generated so far.

    latent_shape: (C, T, H, W) with T = 1 + U * unit_frames. first_frame: (B, C, 1, H, W) latents to start from
    (image-to-video) instead of generating unit 0. guidance: of the first frame; video_guidance: of the later units
    (None: guidance). noise: the full-resolution Gaussian of the whole clip (B, C, T, H, W), each unit taking its
    frames, instead of a draw per unit with ``generator``. Returns (latents (B, C, T, H, W) on the model's device,
    seconds per unit). ``generator`` must live on the model's device. on_stage_end(k, x): after every stage of
    every unit.
    """
    device = model_device(model)
    c, frames, h, w = latent_shape
    spans = unit_spans(frames, unit_frames)
    n = len(text)
    if noise is not None:
        _check_noise(noise, n, latent_shape)
    video = torch.zeros((n, c, frames, h, w), device=device)
    timings = []
    for u, (first, count) in enumerate(spans):
        start = time.perf_counter()
        if u == 0 and first_frame is not None:
            video[:, :, :1] = first_frame.to(device)
            timings.append(0.0)
            continue
        if noise is None:
            unit_noise = torch.randn((n, c, count, h, w), generator=generator, device=device)
        else:
            unit_noise = noise[:, :, first : first + count].to(device)
        levels = schedule.data_pyramid(video)
        noise_levels = (schedule.noise_pyramid(torch.randn(video.shape, generator=generator, device=device))
                        if history_noise else None)

        def history(k: int, row: int):
            return history_parts([lv[row] for lv in levels], spans, u, k, max_history_units, history_noise,
                                 None if noise_levels is None else [nv[row] for nv in noise_levels],
                                 schedule.config.num_timesteps)

        unit_guidance = guidance if u == 0 or video_guidance is None else video_guidance
        video[:, :, first : first + count], _ = denoise_cascade(
            model, schedule, unit_noise, text, null, steps, unit_guidance, generator, history, u, first, use_cache,
            solver, on_stage_end)
        timings.append(time.perf_counter() - start)
    return video, timings
