"""Pictures people look at: PNG grids of samples, contact sheets and GIF/MP4 of videos, written atomically.

GIFs are written with one Pillow ``save`` call, as diffusers.utils.export_to_gif does, without importing
diffusers into pixel-space runs; MP4s with PyAV, already a dependency for decoding (diffusers'
export_to_video needs imageio and an ffmpeg binary).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pyraflow.storage import atomic_path

VIDEO_SUFFIXES = (".gif", ".mp4")
GRID_GAP = 2  # pixels of background between the cells of a grid


def to_grid_image(pixels: torch.Tensor, rows: int):
    """(B, C, H, W) in [-1, 1] -> a Pillow image with ``rows`` rows."""
    from PIL import Image

    pixels = pixels.detach().float().cpu()
    b, c, h, w = pixels.shape
    cols = (b + rows - 1) // rows
    gap = GRID_GAP
    canvas = torch.full((c, rows * (h + gap) + gap, cols * (w + gap) + gap), -1.0)
    for i in range(b):
        r, q = divmod(i, cols)
        canvas[:, gap + r * (h + gap) : gap + r * (h + gap) + h, gap + q * (w + gap) : gap + q * (w + gap) + w] = pixels[i]
    array = ((canvas.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if c == 1 else array)


def contact_sheet(videos: torch.Tensor):
    """(B, C, T, H, W) in [-1, 1] -> a Pillow image: one row per video, its frames left to right."""
    b, c, t, h, w = videos.shape
    return to_grid_image(videos.transpose(1, 2).reshape(b * t, c, h, w), rows=b)


def write_image(image, path: str | Path) -> None:
    """Save a Pillow image atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp:
        image.save(tmp)


def write_grid(pixels: torch.Tensor, path: str | Path, rows: int) -> None:
    """Samples (B, C, T, H, W) as one PNG grid with ``rows`` rows; videos also as a GIF beside it (the PNG is then
    their contact sheet)."""
    path = Path(path)
    if pixels.shape[2] > 1:
        write_video(pixels, path.with_suffix(".gif"), rows=rows)
        write_image(contact_sheet(pixels), path)
    else:
        write_image(to_grid_image(pixels[:, :, 0], rows=rows), path)


def write_video(videos: torch.Tensor, path: str | Path, rows: int = 1, fps: int = 8, scale: int = 4) -> None:
    """(B, C, T, H, W) in [-1, 1] -> a GIF or MP4 whose frame t is the grid of every video's frame t.

    Small frames are enlarged ``scale`` times (nearest) so a 32-pixel clip is watchable.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: video output must end in {' or '.join(VIDEO_SUFFIXES)}.")
    frames = [to_grid_image(videos[:, :, i], rows) for i in range(videos.shape[2])]
    frames = [f.resize((f.width * scale, f.height * scale), resample=0) for f in frames]
    with atomic_path(path) as tmp:
        if suffix == ".gif":
            frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0)
        else:
            _write_mp4(frames, tmp, fps)


def _write_mp4(frames: list, path: Path, fps: int) -> None:
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        # yuv420p needs even sides
        stream.width, stream.height = frames[0].width + frames[0].width % 2, frames[0].height + frames[0].height % 2
        stream.pix_fmt = "yuv420p"
        for f in frames:
            rgb = np.zeros((stream.height, stream.width, 3), dtype=np.uint8)
            rgb[: f.height, : f.width] = np.asarray(f.convert("RGB"))
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
