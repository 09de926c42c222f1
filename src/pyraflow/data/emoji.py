"""``emoji``: colour pictures with real captions, offline: the glyphs of a colour emoji font.

By default Debian's ``fonts-noto-color-emoji`` (about 3,700 bitmaps of 136x128, Apache-2.0); any CBDT or sbix
colour font through ``data.path``. Every glyph with a bitmap becomes one sample: composited on white, padded to a
square, resized to ``data.image_size``; its caption is the emoji's name ("red apple", "flag: Japan", "waving hand:
medium skin tone") from the ``emoji`` package, or Unicode's character name, or, where neither knows it, its code
points (those are counted and logged, never dropped).

Glyphs reach their code-point sequences through the font's cmap (single characters) and its GSUB ligatures (flags,
skin tones, ZWJ sequences). ``data.skin_tones: false`` leaves out every glyph with a skin-tone modifier. A fixed
held-out split (every HELDOUT_EVERY-th glyph in code-point order, chosen before any glyph is left out, so a filtered
split is a subset of the full one) is what ``pyraflow eval`` scores against.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import unicodedata
from pathlib import Path

from pyraflow.config import DataConfig
from pyraflow.data.datasets import RawSample, Shaper, image_to_tensor

log = logging.getLogger("pyraflow.data")

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_PACKAGE = "fonts-noto-color-emoji"
HELDOUT_EVERY = 10
EMOJI_SPLITS = ("train", "heldout")
_SKIN_TONE = re.compile(r" ((?:medium-light|medium-dark|light|medium|dark) skin tone.*)$")
_AFTER_TONE = re.compile(r"(skin tone) (?=\S)")  # "handshake: light skin tone, dark skin tone"
_REGIONAL = range(0x1F1E6, 0x1F200)
_SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))  # the five Fitzpatrick modifiers
_IGNORED = {0xFE0F, 0xFE0E}  # variation selectors: not part of a name


def font_path(config: DataConfig) -> Path:
    """The font a config names, checked to exist (its error names the package to install)."""
    path = Path(config.path) if config.path else DEFAULT_FONT
    if not path.is_file():
        if config.path:
            raise FileNotFoundError(f"data.path={config.path!r}: no such font file; give a CBDT or sbix colour font.")
        raise FileNotFoundError(f"data.dataset=emoji needs a colour emoji font and {DEFAULT_FONT} is missing: install "
                                f"Debian's {FONT_PACKAGE} (apt-get install {FONT_PACKAGE}) or set data.path to a CBDT or "
                                "sbix colour font.")
    return path


def glyph_sequences(font) -> dict[str, tuple[int, ...]]:
    """Glyph name -> the code points it draws: single characters from the cmap, sequences from GSUB ligatures
    (resolved recursively, so a ligature of ligatures reaches its characters)."""
    sequences: dict[str, tuple[int, ...]] = {}
    for codepoint, glyph in sorted(font.getBestCmap().items()):
        sequences.setdefault(glyph, (codepoint,))
    if "GSUB" not in font:
        return sequences
    ligatures: dict[str, tuple[str, ...]] = {}
    for lookup in font["GSUB"].table.LookupList.Lookup:
        for subtable in lookup.SubTable:
            if subtable.LookupType == 7:  # extension: the real subtable inside
                subtable = subtable.ExtSubTable
            for first, entries in getattr(subtable, "ligatures", {}).items():
                for entry in entries:
                    ligatures.setdefault(entry.LigGlyph, (first, *entry.Component))
    for _ in range(4):  # ligatures built from ligatures: a few passes reach every one
        for glyph, parts in ligatures.items():
            if glyph not in sequences and all(p in sequences for p in parts):
                sequences[glyph] = tuple(c for p in parts for c in sequences[p])
    return sequences


def glyph_bitmaps(font, path: Path) -> dict[str, bytes]:
    """Glyph name -> PNG bytes, from the strike with the largest bitmaps (CBDT) or pixels per em (sbix)."""
    if "CBDT" in font:
        strikes = font["CBDT"].strikeData
        if not strikes:
            raise ValueError(f"{path} has a CBDT table without bitmaps; give a colour font that holds glyph images.")
        strike = max(strikes, key=len)
        return {name: bitmap.imageData for name, bitmap in strike.items() if getattr(bitmap, "imageData", None)}
    if "sbix" in font:
        strikes = font["sbix"].strikes
        if not strikes:
            raise ValueError(f"{path} has an sbix table without strikes; give a colour font that holds glyph images.")
        strike = strikes[max(strikes)]
        return {name: g.imageData for name, g in strike.glyphs.items() if g.graphicType == "png "}
    raise ValueError(f"{path} is not a colour bitmap font (it has no CBDT or sbix table); give a colour emoji font "
                     f"such as {DEFAULT_FONT} ({FONT_PACKAGE}).")


@functools.cache
def _names_by_members() -> dict[tuple[int, ...], str | None]:
    """The emoji package's names keyed by their sorted code points (variation selectors dropped); None where two
    emoji share the members (a family in another order, a kiss with the skin tones swapped)."""
    import emoji

    index: dict[tuple[int, ...], str | None] = {}
    for text, entry in emoji.EMOJI_DATA.items():
        key = tuple(sorted(ord(ch) for ch in text if ord(ch) not in _IGNORED))
        index[key] = None if key in index and index[key] != entry["en"] else entry["en"]
    return index


def caption_for(sequence: tuple[int, ...]) -> str | None:
    """The emoji's name in words, or None where no source names it. Fonts may store a ZWJ sequence's characters in
    another order than Unicode's (Noto puts the gender sign first), so a sequence the emoji package does not know
    as written is looked up by its members, where those name one emoji only."""
    import emoji

    text = "".join(chr(c) for c in sequence)
    entry = emoji.EMOJI_DATA.get(text) or emoji.EMOJI_DATA.get(text + "\ufe0f")
    core = [c for c in sequence if c not in _IGNORED]
    name = entry["en"] if entry is not None else _names_by_members().get(tuple(sorted(core)))
    if name is not None:
        name = name.strip(":").replace("_", " ")
    elif len(core) == 1:
        try:
            name = unicodedata.name(chr(core[0])).lower()
        except ValueError:
            return None
    else:
        return None
    if len(core) == 2 and all(c in _REGIONAL for c in core) and not name.startswith("flag"):
        name = f"flag: {name}"
    elif core[:1] == [0x1F3F4] and len(core) > 2 and not name.startswith("flag"):  # tag sequences: England, Scotland
        name = f"flag: {name}"
    name = _SKIN_TONE.sub(r": \1", name, count=1)
    return _AFTER_TONE.sub(r"\1, ", name)


def code_points(sequence: tuple[int, ...]) -> str:
    return " ".join(f"U+{c:04X}" for c in sequence)


class EmojiGlyphs:
    """Every glyph of a colour emoji font with a bitmap, as an RGB (or grey) picture on white with its name."""

    def __init__(self, config: DataConfig, split: str = "train", shaper: Shaper | None = None):
        from fontTools.ttLib import TTFont, TTLibError

        if split not in EMOJI_SPLITS:
            raise ValueError(f"split={split!r} must be 'train' or 'heldout'.")
        self.config, self.split = config, split
        self.shaper = shaper or Shaper(config)
        self.path = font_path(config)
        try:
            font = TTFont(str(self.path), lazy=True)
            sequences = glyph_sequences(font)
            bitmaps = glyph_bitmaps(font, self.path)
        except TTLibError as err:
            raise ValueError(f"{self.path} cannot be read as a font ({err}); give a CBDT or sbix colour font.") from err
        glyphs = sorted((sequences.get(name, ()), name) for name in bitmaps)
        if not glyphs:
            raise ValueError(f"{self.path} holds no glyph bitmaps; give a colour emoji font.")
        unnamed = 0
        self.items: list[tuple[str, str, bytes]] = []  # (glyph name, caption, PNG)
        for i, (sequence, name) in enumerate(glyphs):
            if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) != (split == "heldout"):
                continue
            if not config.skin_tones and _SKIN_TONES.intersection(sequence):
                continue
            caption = caption_for(sequence) if sequence else None
            if caption is None:
                unnamed += 1
                caption = code_points(sequence) if sequence else f"glyph {name}"
            self.items.append((name, caption, bitmaps[name]))
        if unnamed:
            log.info("%d of %d %s glyphs of %s have no name: captioned with their code points", unnamed,
                     len(self.items), split, self.path.name)
        self.unnamed = unnamed
        self.bad: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.items)

    def item_sizes(self) -> list[tuple[int, int]]:
        return [(self.config.image_size, self.config.image_size)] * len(self)

    def picture(self, i: int):
        """The glyph on a white square (a Pillow RGB image at its own resolution)."""
        from PIL import Image

        _, _, png = self.items[i]
        with Image.open(io.BytesIO(png)) as image:
            rgba = image.convert("RGBA")
        side = max(rgba.size)
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
        return canvas.convert("RGB")

    def __getitem__(self, i: int) -> RawSample | None:
        from PIL import Image

        name, caption, _ = self.items[i]
        try:
            image = self.picture(i)
        except Exception as err:  # a glyph whose PNG does not decode
            self.bad.append((f"{self.path}:{name}", f"{type(err).__name__}: {err}"))
            return None
        size = self.config.image_size
        image = image.resize((size, size), Image.LANCZOS).convert("L" if self.config.channels == 1 else "RGB")
        pixels = image_to_tensor(image, self.config.channels)
        return RawSample(f"emoji-{self.split}-{name}", pixels.unsqueeze(1), caption, f"{self.path}:{name}")
