"""The emoji dataset: real glyphs of Debian's colour emoji font with their names, a fixed held-out split, and named
errors for fonts that cannot serve. Tests that need the font skip, saying so, where it is not installed (CI installs
it)."""

import pytest
import torch

import pyraflow.data.emoji as emoji_data
from pyraflow.config import DataConfig
from pyraflow.data.emoji import DEFAULT_FONT, EmojiGlyphs, caption_for

needs_font = pytest.mark.skipif(not DEFAULT_FONT.is_file(),
                                reason=f"{DEFAULT_FONT} missing: apt-get install fonts-noto-color-emoji")
DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def config(**kw):
    return DataConfig(dataset="emoji", channels=3, **{"image_size": 64, **kw})


def test_captions_come_from_the_emoji_names():
    assert caption_for((0x1F34E,)) == "red apple"
    assert caption_for((0x1F1EF, 0x1F1F5)) == "flag: Japan"
    assert caption_for((0x1F44B, 0x1F3FD)) == "waving hand: medium skin tone"
    assert caption_for((0x1F319,)) == "crescent moon"
    assert caption_for((0x1FAF1, 0x1F3FB, 0x200D, 0x1FAF2, 0x1F3FF)) == "handshake: light skin tone, dark skin tone"
    assert caption_for((0x2640, 0x200D, 0x1F3C3)) == "woman running"  # found by its members, in any order
    assert caption_for((0x1F1EF,)) == "regional indicator symbol letter j"  # one letter is no flag
    assert caption_for((0xE000,)) is None  # a private-use character has no name


@needs_font
def test_glyphs_are_rendered_on_white_with_their_names_and_a_fixed_heldout_split():
    train, heldout = EmojiGlyphs(config()), EmojiGlyphs(config(), "heldout")
    assert len(train) > 3000 and 0.09 < len(heldout) / (len(train) + len(heldout)) < 0.11
    assert not {n for n, _, _ in train.items} & {n for n, _, _ in heldout.items}
    captions = {c: i for i, (_, c, _) in enumerate(train.items)}
    heldout_captions = {c for _, c, _ in heldout.items}
    for name in ("red apple", "rocket", "sunflower", "dog face", "crescent moon", "waving hand: medium skin tone",
                  "flag: Jamaica", "man running: light skin tone"):  # the last stored gender sign first in the font
        assert name in captions or name in heldout_captions, name
    assert "red apple" in captions  # in the training split
    apple = train[captions["red apple"]]
    assert train.unnamed < 0.12 * len(train)  # the rest: subdivision flags and couples with two skin tones
    sample = train[0]
    assert sample.pixels.shape == (3, 1, 64, 64) and sample.pixels.min() >= -1 and sample.pixels.max() <= 1
    corner = sample.pixels[:, 0, 0, 0]
    assert torch.allclose(corner, torch.ones(3), atol=0.05)  # the background is white
    r, g, b = apple.pixels[:, 0]  # the apple is red: its red channel well above its green one where it is not white
    inked = (r + g + b) < 2.5
    assert (r[inked] - g[inked]).mean() > 0.5


@needs_font
def test_glyphs_without_a_name_get_their_code_points_and_are_counted(monkeypatch):
    monkeypatch.setattr(emoji_data, "caption_for", lambda sequence: None if 0x1F34E in sequence else "named")
    glyphs = EmojiGlyphs(config(image_size=32))
    unnamed = [c for _, c, _ in glyphs.items if c != "named"]
    assert glyphs.unnamed == len(unnamed) >= 1 and "U+1F34E" in unnamed


def test_bad_fonts_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji_data, "DEFAULT_FONT", tmp_path / "absent.ttf")
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        EmojiGlyphs(config())
    with pytest.raises(FileNotFoundError, match="no such font file"):
        EmojiGlyphs(config(path=str(tmp_path / "nope.ttf")))
    junk = tmp_path / "junk.ttf"
    junk.write_bytes(b"not a font at all")
    with pytest.raises(ValueError, match="cannot be read as a font"):
        EmojiGlyphs(config(path=str(junk)))


@pytest.mark.skipif(not __import__("pathlib").Path(DEJAVU).is_file(), reason=f"{DEJAVU} missing (fonts-dejavu-core)")
def test_a_font_without_colour_bitmaps_is_refused_by_name():
    with pytest.raises(ValueError, match="DejaVuSans.ttf is not a colour bitmap font"):
        EmojiGlyphs(config(path=DEJAVU))


@needs_font
def test_skin_tone_variants_can_be_left_out_keeping_the_heldout_split_a_subset():
    full, plain = EmojiGlyphs(config(image_size=16)), EmojiGlyphs(config(image_size=16, skin_tones=False))
    tones = {n for n, c, _ in full.items if "skin tone" in c}
    kept = {n for n, _, _ in plain.items}
    assert len(tones) > 1000 and kept <= {n for n, _, _ in full.items} - tones
    assert len(kept) >= len(full) - len(tones) - full.unnamed  # unnamed glyphs with a tone may go too
    assert "waving hand" in {c for _, c, _ in plain.items}  # the default yellow glyph stays
    heldout, plain_heldout = EmojiGlyphs(config(image_size=16), "heldout"), EmojiGlyphs(
        config(image_size=16, skin_tones=False), "heldout")
    assert {n for n, _, _ in plain_heldout.items} < {n for n, _, _ in heldout.items}


def test_skin_tones_is_an_emoji_setting():
    with pytest.raises(ValueError, match="data.skin_tones=false selects emoji glyphs.*data.dataset=mnist"):
        DataConfig(dataset="mnist", skin_tones=False)
