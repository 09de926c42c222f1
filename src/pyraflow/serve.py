"""``pyraflow serve``: a Gradio page to sample from a trained run.

The run is loaded once. The page takes prompts (one per line; several make a grid, one row each), samples per
prompt, Euler steps per stage, guidance and seed (for video runs also the number of frames and an optional first
image), shows a progress bar per stage while it works and the time per stage when done, and returns the grid (or
the video and its contact sheet) with a download. A second tab shows the run's loss plot and resolved config.
Generation goes through ``Pipeline`` and ``media`` exactly as ``pyraflow sample`` does, so the same seed and
settings give the same picture. Requests queue, one generation at a time; bad input is refused on the page with
the reason, and the server keeps serving.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

MAX_STEPS = 100  # Euler steps per stage the page offers
MAX_PER_PROMPT = 16
MAX_PROMPTS = 16


class Generator:
    """The page's work, without the page: validates a request, samples, writes the files (also used by tests)."""

    def __init__(self, pipeline, out_dir: Path):
        self.pipeline, self.out_dir = pipeline, Path(out_dir)
        self.lock = threading.Lock()  # one generation at a time, whatever the queue does
        self.count = 0

    @property
    def is_video(self) -> bool:
        return self.pipeline.config.video_units()

    def check(self, prompts_text: str, per_prompt: int, steps: int, guidance: float, seed, frames: int | None,
              image_path: str | None) -> tuple[list[str], int, int, float, int]:
        """(prompts, per_prompt, steps, guidance, seed) or ValueError naming the problem and the fix."""
        prompts = [line.strip() for line in (prompts_text or "").splitlines() if line.strip()]
        if not prompts:
            raise ValueError("Enter a prompt (one per line; several lines make one row each).")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"{len(prompts)} prompts: give at most {MAX_PROMPTS}.")
        checks = [(per_prompt, 1, MAX_PER_PROMPT, "samples per prompt"), (steps, 1, MAX_STEPS, "Euler steps per stage")]
        for value, low, high, what in checks:
            if value is None or int(value) != value or not low <= value <= high:
                raise ValueError(f"{what} must be a whole number from {low} to {high}, not {value}.")
        if guidance is None or not 0 <= guidance <= 20:
            raise ValueError(f"guidance must be between 0 and 20, not {guidance}.")
        if seed is None or int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, not {seed}.")
        if self.is_video:
            limit = self.pipeline.max_frames()
            if frames is None or not 1 <= frames <= limit:
                raise ValueError(f"this run makes 1 to {limit} frames; {frames} frames cannot be made.")
        elif image_path:
            raise ValueError("this run makes images; a first frame only applies to video runs.")
        return prompts, int(per_prompt), int(steps), float(guidance), int(seed)

    def __call__(self, prompts_text: str, per_prompt: int, steps: int, guidance: float, seed, frames: int | None = None,
                 image_path: str | None = None, on_stage=None) -> dict:
        """Generate and write the files; on_stage(done, total, description) reports progress."""
        from pyraflow.data import read_image
        from pyraflow.media import contact_sheet, write_grid, write_image, write_video

        prompts, per_prompt, steps, guidance, seed = self.check(prompts_text, per_prompt, steps, guidance, seed, frames,
                                                                image_path)
        image = None
        if image_path:
            image = read_image(image_path, self.pipeline.config.data.channels)  # a clear error if unreadable
        rows = [p for p in prompts for _ in range(per_prompt)]
        num_stages = self.pipeline.schedule.num_stages
        calls = {"n": 0}

        def stage_done(k, _latents):
            calls["n"] += 1
            if on_stage is not None:
                on_stage(calls["n"], k)

        with self.lock:
            self.count += 1
            folder = self.out_dir / f"request-{self.count:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            if self.is_video:
                pixels, timings = self.pipeline.video(rows, frames, seed, image, [steps] * num_stages, guidance,
                                                      on_stage_end=stage_done)
                video = folder / "video.gif"
                write_video(pixels, video, rows=len(prompts))
                picture = folder / "contact-sheet.png"
                write_image(contact_sheet(pixels), picture)
                files = [str(video), str(picture)]
                timing = "seconds per unit: " + ", ".join(f"{t:.2f}" for t in timings)
            else:
                pixels, timings = self.pipeline.generate(rows, seed, [steps] * num_stages, guidance,
                                                         on_stage_end=stage_done)
                picture = folder / "grid.png"
                write_grid(pixels, picture, rows=len(prompts))
                files = [str(picture)]
                timing = ", ".join(f"stage {k}: {t:.2f} s" for k, t in enumerate(timings))
            total = time.perf_counter() - started
        return {"picture": str(picture), "files": files, "video": files[0] if self.is_video else None,
                "summary": f"{len(rows)} sample(s) in {total:.1f} s ({timing}); seed {seed}, {steps} steps per stage, "
                           f"guidance {guidance:g}."}


def build_page(generator: Generator, run_dir: Path, title: str):
    """The Gradio Blocks of the page."""
    import gradio as gr

    pipeline = generator.pipeline
    sc = pipeline.config.sample
    num_stages = pipeline.schedule.num_stages
    default_steps = sc.steps_per_stage(num_stages)[0]
    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# pyraflow: {title}")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompts = gr.Textbox(label="Prompts (one per line; each makes a row)", lines=3,
                                         elem_id="prompts", placeholder="a handwritten digit seven")
                    per_prompt = gr.Slider(1, MAX_PER_PROMPT, value=4, step=1, label="Samples per prompt",
                                           elem_id="per-prompt")
                    steps = gr.Slider(1, MAX_STEPS, value=default_steps, step=1, label="Euler steps per stage",
                                      elem_id="steps")
                    guidance = gr.Slider(0, 20, value=sc.guidance, step=0.5, label="Guidance", elem_id="guidance")
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="seed")
                    if generator.is_video:
                        frames = gr.Slider(1, pipeline.max_frames(), value=pipeline.default_frames(), step=1,
                                           label="Frames", elem_id="frames")
                    else:
                        frames = gr.Number(value=1, visible=False)
                    image = gr.Image(type="filepath", label="First frame (optional)", visible=generator.is_video,
                                     elem_id="first-frame")
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column():
                    picture = gr.Image(type="filepath", format="png", label="Samples", elem_id="result",
                                       interactive=False)
                    video = gr.Image(type="filepath", label="Video", visible=generator.is_video, elem_id="video",
                                     interactive=False)
                    summary = gr.Markdown(elem_id="summary")
                    download = gr.File(label="Download", elem_id="download")
        with gr.Tab("Run"):
            loss = run_dir / "loss.png"
            if loss.is_file():
                gr.Image(str(loss), label="Loss per stage", interactive=False)
            gr.Code(to_yaml_text(pipeline.config), language="yaml", label="Resolved config")

        def run(prompts_text, per_prompt, steps, guidance, seed, frames, image_path, progress=gr.Progress()):
            total = num_stages * (_units(pipeline) if generator.is_video else 1)
            progress((0, total), desc="starting")
            try:
                result = generator(prompts_text, per_prompt, steps, guidance, seed,
                                   frames if generator.is_video else None, image_path,
                                   lambda done, k: progress((done, total), desc=f"stage {k} done"))
            except ValueError as err:
                raise gr.Error(str(err)) from None
            return result["picture"], result["video"], result["summary"], result["files"]

        button.click(run, [prompts, per_prompt, steps, guidance, seed, frames, image],
                     [picture, video, summary, download], concurrency_limit=1)
    return page


def _units(pipeline) -> int:
    from pyraflow.config import unit_spans

    return len(unit_spans(pipeline.config.data.frames, pipeline.config.video.unit_frames))


def to_yaml_text(config) -> str:
    from pyraflow.config import to_yaml

    return to_yaml(config)


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 7860, device=None, block: bool = True,
          transformer: str | Path | None = None, **memory):
    """Load the run (or a released Pyramid Flow folder, with ``transformer`` in place of its own where given) once
    and serve its page (blocks until interrupted unless ``block`` is False); ``memory``: load_pipeline's precision,
    offload and decode options."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # never reach for the network
    from pyraflow.checkpoint import SAMPLING, resolve_checkpoint
    from pyraflow.sample import load_pipeline
    from pyraflow.sample.released import is_released_root

    if is_released_root(checkpoint):
        path = run_dir = Path(checkpoint)
        pipeline = load_pipeline(path, device, transformer=transformer, **memory)
    else:
        path = resolve_checkpoint(checkpoint, SAMPLING)
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
        pipeline = load_pipeline(path, device, transformer=transformer, **memory)
    out_dir = Path(tempfile.mkdtemp(prefix="pyraflow-serve-"))
    page = build_page(Generator(pipeline, out_dir), run_dir, f"{run_dir.name} ({path.name})")
    page.queue(default_concurrency_limit=1, max_size=64)
    print(f"pyraflow serve: {run_dir} on http://{host}:{port} (Ctrl-C stops it)", flush=True)
    try:
        page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, quiet=True,
                    allowed_paths=[str(out_dir), str(run_dir)])
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port} ({err}); pass another --port.") from None
    return page
