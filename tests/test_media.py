"""Pictures (pyraflow.media): where each sample lands in a grid, and videos as GIF / MP4 with every frame."""

import pytest
import torch
from PIL import Image

from pyraflow.media import GRID_GAP, contact_sheet, to_grid_image, write_grid, write_video


def test_each_sample_lands_in_its_cell_row_by_row():
    b, h, w = 5, 4, 6
    pixels = torch.stack([torch.full((3, h, w), -1 + 2 * (i + 1) / 8) for i in range(b)])
    image = to_grid_image(pixels, rows=2)  # 3 columns, the last cell empty
    assert image.size == (3 * (w + GRID_GAP) + GRID_GAP, 2 * (h + GRID_GAP) + GRID_GAP)
    array = torch.as_tensor(list(image.getdata())).view(image.height, image.width, 3)
    for i in range(b):
        r, q = divmod(i, 3)
        y, x = GRID_GAP + r * (h + GRID_GAP), GRID_GAP + q * (w + GRID_GAP)
        expected = round((pixels[i, 0, 0, 0].item() + 1) * 127.5)
        assert (array[y : y + h, x : x + w] == expected).all(), i
    assert (array[0] == 0).all()  # the gap is the background (-1 -> black)
    assert to_grid_image(pixels[:, :1], rows=1).mode == "L"


def test_a_contact_sheet_puts_frames_left_to_right():
    videos = torch.linspace(-1, 1, 2 * 3).view(2, 1, 3, 1, 1).expand(2, 1, 3, 2, 2)
    sheet = contact_sheet(videos)
    assert sheet.size == (3 * (2 + GRID_GAP) + GRID_GAP, 2 * (2 + GRID_GAP) + GRID_GAP)
    x_of_frame = [GRID_GAP + t * (2 + GRID_GAP) for t in range(3)]
    row1 = [sheet.getpixel((x, GRID_GAP + 2 + GRID_GAP)) for x in x_of_frame]
    assert row1 == [round((v + 1) * 127.5) for v in videos[1, 0, :, 0, 0].tolist()]


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_a_video_keeps_every_frame(tmp_path, suffix):
    videos = torch.rand(2, 3, 5, 8, 8) * 2 - 1
    write_video(videos, tmp_path / f"v{suffix}", rows=1, fps=5)
    if suffix == ".gif":
        with Image.open(tmp_path / "v.gif") as gif:
            assert gif.n_frames == 5
    else:
        import av

        with av.open(str(tmp_path / "v.mp4")) as container:
            assert sum(1 for _ in container.decode(video=0)) == 5


def test_videos_get_a_gif_beside_their_contact_sheet_and_bad_suffixes_are_named(tmp_path):
    write_grid(torch.zeros(2, 1, 3, 4, 4), tmp_path / "grid.png", rows=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.gif", "grid.png"]
    write_grid(torch.zeros(2, 1, 1, 4, 4), tmp_path / "still.png", rows=1)
    assert not (tmp_path / "still.gif").exists()
    with pytest.raises(ValueError, match="must end in .gif or .mp4"):
        write_video(torch.zeros(1, 1, 2, 4, 4), tmp_path / "v.avi")
