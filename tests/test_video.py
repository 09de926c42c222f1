"""Video units: history compression, causality, packed == alone with history, the history cache, the batcher's
classes, and autoregressive / image-to-video sampling end to end."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyraflow.batching import example_classes
from pyraflow.config import ScheduleConfig, VideoConfig, load_config
from pyraflow.packing import Sample, pack, unpack
from pyraflow.sample import sample_video
from pyraflow.schedule import PyramidSchedule
from pyraflow.text import TextEmbedding
from pyraflow.train.objective import unit_examples
from pyraflow.video import history_parts, history_stage, unit_spans
from helpers import CHANNELS, POOLED_DIM, TEXT_DIM, randomised_model

SCHEDULE = PyramidSchedule(ScheduleConfig(stages=3))
SPANS = unit_spans(7, 2)  # first frame + 3 units of 2 frames


def video(seed, frames=7, side=16):
    return torch.randn(CHANNELS, frames, side, side, generator=torch.Generator().manual_seed(seed))


def text(seed, length=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(length, TEXT_DIM, generator=g), torch.randn(POOLED_DIM, generator=g)


def unit_sample(clip, unit, stage, seed=0, sigma=0.0, length=5):
    """A training-like sample: unit ``unit`` of ``clip`` at ``stage`` with its compressed history."""
    levels = SCHEDULE.data_pyramid(clip)
    first, count = SPANS[unit]
    parts = history_parts(levels, SPANS, unit, stage, None, sigma, SCHEDULE.noise_pyramid(video(seed + 99)))
    return Sample(stage, levels[stage][:, first : first + count], *text(seed, length), 300.0, parts, first, unit)


def test_unit_spans_and_their_errors():
    assert unit_spans(7, 2) == [(0, 1), (1, 2), (3, 2), (5, 2)]
    assert unit_spans(1, 4) == [(0, 1)]
    with pytest.raises(ValueError, match="first frame plus units of 2"):
        unit_spans(8, 2)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_history_is_compressed_one_stage_lower_per_unit_back(stage):
    clip = video(0)
    sample = unit_sample(clip, unit=3, stage=stage)
    # unit 2 (most recent) at the current stage, unit 1 one lower, unit 0 (the first frame) lower still
    expected_stages = [max(stage - 2, 0), max(stage - 1, 0), stage]
    assert [p.stage for p in sample.history] == expected_stages
    assert [p.unit for p in sample.history] == [0, 1, 2]
    for part, k in zip(sample.history, expected_stages):
        first, count = SPANS[part.unit]
        side = 16 // 2 ** (2 - k)
        assert part.latent.shape == (CHANNELS, count, side, side)
        assert part.first_frame == first
        # the clean history equals the clip's frames average-pooled to that stage (independent computation)
        pooled = F.avg_pool2d(clip[:, first : first + count], 2 ** (2 - k))
        torch.testing.assert_close(part.latent, pooled, rtol=0, atol=1e-6)
    assert history_stage(2, 1) == 2 and history_stage(2, 3) == 0 and history_stage(0, 5) == 0


def test_history_positions_are_absolute_frames_and_aligned_across_resolutions():
    sample = unit_sample(video(1), unit=3, stage=2)
    batch = pack([sample], num_stages=3, patch_size=2)
    lay, pos = batch.layout, batch.layout.positions
    start = 0
    for part in sample.history + [sample]:
        c, t, h, w = part.latent.shape
        n = t * (h // 2) * (w // 2)
        piece = pos[start : start + n].view(t, h // 2, w // 2, 3)
        d = 2 ** (2 - part.stage)  # fine tokens per coarse token per side
        assert torch.equal(piece[:, 0, 0, 0], torch.arange(t) + float(part.first_frame))
        # a coarse token sits at the centre of the d x d fine tokens it covers
        fine = torch.arange(16 // 2, dtype=torch.float32)
        centres = fine.view(-1, d).mean(1)
        assert torch.equal(piece[0, :, 0, 1], centres) and torch.equal(piece[0, 0, :, 2], centres)
        assert torch.equal(lay.causal_index[start : start + n], torch.full((n,), part.unit))
        start += n
    assert lay.history_lengths == [start - 8 * 8 * 2]
    assert batch.timestep.numel() == 4  # one run per history part, one for the predicted unit


@pytest.mark.parametrize("backend", ["grouped", "flash", "flex"])
def test_a_unit_does_not_depend_on_later_units(backend, flash_on_cpu):
    model = randomised_model(3, attention=backend, temporal_causal=True)
    clip = video(2)
    changed = clip.clone()
    changed[:, 3:] += torch.randn(changed[:, 3:].shape, generator=torch.Generator().manual_seed(5))  # units 2 and 3

    def outputs(x):
        batch = pack([unit_sample(x, unit=3, stage=1)], 3, 2)
        with torch.no_grad():
            out = model(batch)
        return out, batch.layout

    a, lay = outputs(clip)
    b, _ = outputs(changed)
    units = lay.causal_index
    for u in (0, 1):
        torch.testing.assert_close(a[units == u], b[units == u], rtol=0, atol=1e-5)  # fp32 order noise only
    for u in (2, 3):  # a change there does show (the test can fail)
        assert not torch.allclose(a[units == u], b[units == u], atol=1e-3)


@pytest.mark.parametrize("backend", ["grouped", "flash", "flex"])
def test_packed_samples_with_histories_equal_each_alone(backend, flash_on_cpu):
    model = randomised_model(4, attention=backend, temporal_causal=True)
    samples = [unit_sample(video(10 + i), unit=u, stage=k, seed=i, sigma=0.05, length=3 + i)
               for i, (u, k) in enumerate([(3, 2), (1, 0), (0, 1), (3, 2), (2, 1), (3, 0)])]
    batch = pack(samples, 3, 2)
    with torch.no_grad():
        together = unpack(model(batch), batch.layout)
        for s, t in zip(samples, together):
            alone = pack([s], 3, 2)
            torch.testing.assert_close(t, unpack(model(alone), alone.layout)[0], rtol=1e-5, atol=1e-5)
            assert t.shape == s.latent.shape


def test_training_samples_noise_the_history_and_target_the_unit():
    config = VideoConfig(unit_frames=2, history_noise=0.2)
    clips = torch.stack([video(20), video(21), video(22)])
    stages, units = torch.tensor([2, 1, 0]), torch.tensor([3, 0, 2])
    texts = [text(i) for i in range(3)]
    samples = unit_examples(SCHEDULE, clips, stages, units, SPANS, config, texts, torch.Generator().manual_seed(0))
    targets = [s.target for s in samples]
    assert len(samples) == 3
    by_unit = {s.unit: (s, t) for s, t in zip(samples, targets)}
    s, t = by_unit[3]
    assert s.stage == 2 and s.latent.shape == t.shape == (CHANNELS, 2, 16, 16) and s.first_frame == 5
    levels = SCHEDULE.data_pyramid(clips[0])
    sigma = s.history[0].timestep / 1000
    assert 0 <= sigma <= 0.2 and all(p.timestep == s.history[0].timestep for p in s.history)
    for p in s.history:  # x = (1 - sigma) clean + sigma noise: the clean part is recovered up to the noise
        clean = levels[p.stage][:, p.first_frame : p.first_frame + p.latent.shape[1]]
        assert (p.latent - (1 - sigma) * clean).abs().max() <= sigma * 6 + 1e-6
    assert by_unit[0][0].history == [] and by_unit[0][0].latent.shape[1] == 1
    assert [p.unit for p in by_unit[2][0].history] == [0, 1]


def test_batcher_classes_count_the_tokens_that_packing_makes():
    config = load_config(None, ["data.dataset=clips", "data.frames=7", "video.unit_frames=2", "model.temporal_causal=true",
                                "data.image_size=16", "model.patch_size=2", "text.max_tokens=5"])
    classes = example_classes(config)
    assert len(classes.stages) == 3 * 4
    np.testing.assert_allclose(classes.mix.ratio(0).reshape(3, 4).sum(1), [0.25, 0.5, 0.25])
    np.testing.assert_allclose(classes.mix.ratio(0).reshape(3, 4).sum(0), [0.25, 0.25, 0.25, 0.25])
    clip = torch.randn(1, 7, 16, 16)
    for c, (k, u) in enumerate(zip(classes.stages, classes.units)):
        levels = SCHEDULE.data_pyramid(clip)
        first, count = SPANS[u]
        sample = Sample(k, levels[k][:, first : first + count], torch.randn(5, 384), torch.randn(384), 1.0,
                        history_parts(levels, SPANS, u, k, None), first, u)
        lay = pack([sample], 3, 2).layout
        assert classes.segment_tokens[c] == lay.num_text + lay.num_visual


def embedding(n, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return TextEmbedding(torch.randn(n, max(lengths), TEXT_DIM, generator=g), torch.tensor(lengths),
                         torch.randn(n, POOLED_DIM, generator=g))


@pytest.mark.parametrize("history_noise", [0.0, 0.05])
def test_the_history_cache_gives_the_same_frames(history_noise):
    model = randomised_model(6, temporal_causal=True)
    text, null = embedding(2, [5, 3], 1), embedding(1, [2], 2)
    frames = {}
    for cache in (False, True):
        frames[cache], _ = sample_video(model, SCHEDULE, text, null, (CHANNELS, 7, 16, 16), 2, [2, 2, 2], 2.0,
                                        torch.Generator().manual_seed(0), use_cache=cache, history_noise=history_noise)
    assert frames[True].shape == (2, CHANNELS, 7, 16, 16)
    torch.testing.assert_close(frames[True], frames[False], rtol=1e-4, atol=1e-4)


def test_image_to_video_keeps_the_given_first_frame_and_caps_history():
    model = randomised_model(7, temporal_causal=True)
    text, null = embedding(1, [4], 3), embedding(1, [2], 4)
    first = torch.randn(1, CHANNELS, 1, 16, 16)
    out, timings = sample_video(model, SCHEDULE, text, null, (CHANNELS, 7, 16, 16), 2, [1, 1, 1], 1.0,
                                torch.Generator().manual_seed(0), first_frame=first, max_history_units=1)
    assert torch.equal(out[:, :, :1], first) and len(timings) == 4 and timings[0] == 0.0
    assert out[:, :, 1:].abs().sum() > 0


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="temporal_causal"):
        load_config(None, ["data.frames=5", "video.unit_frames=2"])
    with pytest.raises(ValueError, match="data.frames=6 with video.unit_frames=2"):
        load_config(None, ["data.frames=6", "video.unit_frames=2", "model.temporal_causal=true"])
    with pytest.raises(ValueError, match="video.image_ratio"):
        load_config(None, ["video.image_ratio=1.5"])


def test_a_prefix_cache_for_other_segments_is_refused():
    model = randomised_model(8, temporal_causal=True)
    a = unit_sample(video(30), unit=2, stage=1, length=4)
    prefix = pack([Sample(p.stage, p.latent, a.text, a.pooled, p.timestep, a.history[:-1], p.first_frame, p.unit)
                   for p in a.history[-1:]], 3, 2)
    cache = model.prefix_cache(prefix)
    other = Sample(1, a.latent, torch.randn(6, TEXT_DIM), a.pooled, 300.0, [], a.first_frame, a.unit)
    with pytest.raises(ValueError, match="other segments"):
        model(pack([other], 3, 2), prefix=cache)
    no_causal = randomised_model(8)
    with pytest.raises(ValueError, match="temporal_causal"):
        no_causal.prefix_cache(prefix)


TINY_VIDEO = ["data.dataset=clips", "data.image_size=16", "data.frames=5", "data.frame_stride=4", "data.clip_hop=40",
              "video.unit_frames=2", "model.temporal_causal=true", "model.patch_size=2", "model.width=32",
              "model.depth=1", "model.num_heads=2", "text.max_tokens=12", "batching.token_budget=800",
              "train.warmup_steps=1", "train.sample_every=0", "sample.steps=1", "sample.per_prompt=1",
              "sample.prompts=[a cartoon rabbit in a green meadow]"]


def test_train_then_sample_videos_end_to_end(tmp_path, capsys):
    from PIL import Image

    from pyraflow.cli import main

    run = tmp_path / "run"
    args = [a for item in TINY_VIDEO for a in ("--set", item)]
    assert main(["train", *args, "--max-steps", "2", "--out", str(run), "--quiet"]) == 0
    assert Image.open(run / "samples" / "step-000002.gif").n_frames == 5  # the training-time sample is a GIF
    gif = tmp_path / "v.gif"
    assert main(["sample", "--checkpoint", str(run), "--prompt", "a cartoon rabbit", "--frames", "5",
                 "--out", str(gif)]) == 0
    assert Image.open(gif).n_frames == 5
    sheet = Image.open(gif.with_suffix(".png"))
    assert sheet.size == (2 + 5 * 18, 2 + 18)  # one row of 5 frames of 16 px with 2 px borders
    # image-to-video: the first frame is the given image; 4 frames round up to whole units and are trimmed
    first = Image.fromarray((np.arange(256).reshape(16, 16) % 255).astype(np.uint8))
    first.save(tmp_path / "first.png")
    mp4 = tmp_path / "i2v.mp4"
    assert main(["sample", "--checkpoint", str(run), "--prompt", "a cartoon rabbit", "--frames", "4",
                 "--image", str(tmp_path / "first.png"), "--out", str(mp4)]) == 0
    import av

    with av.open(str(mp4)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4
    contact = np.asarray(Image.open(mp4.with_suffix(".png")))
    assert np.abs(contact[2:18, 2:18].astype(int) - np.asarray(first).astype(int)).max() <= 1
    capsys.readouterr()
    # clear errors: too long, wrong image size, wrong output kind
    Image.new("L", (20, 16)).save(tmp_path / "wide.png")
    for extra, message in ((["--frames", "9"], "longer than this run's limit of 5 frames"),
                           (["--image", str(tmp_path / "wide.png")], "give a 16x16 image"),
                           (["--image", str(tmp_path / "missing.png")], "does not exist")):
        assert main(["sample", "--checkpoint", str(run), "--prompt", "x", *extra, "--out", str(tmp_path / "e.gif")]) == 2
        assert message in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(run), "--prompt", "x", "--frames", "5", "--out", str(tmp_path / "e.png")]) == 2
    assert "must end in .gif or .mp4" in capsys.readouterr().err
    # beyond the limit on request, with the history capped at the trained units
    assert main(["sample", "--checkpoint", str(run), "--prompt", "x", "--frames", "9", "--allow-longer",
                 "--out", str(tmp_path / "long.gif")]) == 0
    assert Image.open(tmp_path / "long.gif").n_frames == 9


def test_the_batcher_balances_histories_of_different_lengths():
    from pyraflow.plan import plan_report

    config = load_config(Path(__file__).parent.parent / "configs" / "clips.yaml", ["data.num_samples=120"])
    classes = example_classes(config)
    assert max(classes.segment_tokens) > 5 * min(classes.segment_tokens)  # lengths really vary
    report = plan_report(config, steps=400)
    assert report["tokens_per_step"]["max"] <= config.batching.token_budget
    assert report["tokens_per_step"]["cv"] <= 0.02
    for stage in report["schedule"]["stages"]:
        assert abs(stage["realised_ratio"] - stage["target_ratio"]) <= 0.01


def test_an_image_dataset_trains_beside_the_clips_as_unit_0(tmp_path, monkeypatch):
    """video.image_dataset: unit-0 examples take images and captions from it; later units keep their clips."""
    from PIL import Image

    import pyraflow.train.objective as objective
    from pyraflow.data.loader import BatchPlan
    from pyraflow.train import Trainer

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(((np.arange(256).reshape(16, 16) * (i + 1)) % 255).astype(np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a test pattern number {i}")
    config = load_config(None, TINY_VIDEO + ["video.image_dataset=image-folder", f"video.image_path={folder}",
                                             "video.image_dataset_share=1.0", "video.image_ratio=0.5",
                                             "train.text_dropout=0.0"])
    trainer = Trainer(config, tmp_path / "run", progress=False)
    assert len(trainer.images) == 3 and trainer.images.latents.shape[2] == 1
    real = objective.unit_examples
    calls = []
    monkeypatch.setattr(objective, "unit_examples",
                        lambda *a, **k: calls.append((a[1].clone(), a[3], list(a[6]))) or real(*a, **k))
    seen = []
    for _ in range(3):  # what a loader worker does with each planned batch
        planned = trainer.batcher.next_batch()
        seen.append(planned)
        plan = BatchPlan(planned.sample_ids, planned.step, planned.classes, {})
        trainer.builder(plan, [trainer.data.latent(i) for i in plan], [trainer.data.text(i) for i in plan])
    image_texts = [trainer.images.text(j)[0] for j in range(3)]
    counts = {0: 0, 1: 0}
    for batch, (clean, units, texts) in zip(seen, calls):
        for row, i in enumerate(batch.sample_ids):
            if int(units[row]) == 0:  # an image from the folder, with its caption
                counts[0] += 1
                assert any(torch.equal(clean[row, :, 0], trainer.images.latents[j, :, 0]) for j in range(3))
                assert any(torch.equal(texts[row][0], t) for t in image_texts)
            else:  # a clip unit: the clip as it was, with the clip's caption
                counts[1] += 1
                assert torch.equal(clean[row], trainer.data.latents[i])
                assert torch.equal(texts[row][0], trainer.data.text(i)[0])
    assert counts[0] > 0 and counts[1] > 0


def test_image_dataset_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="set video.unit_frames"):
        load_config(None, ["video.image_dataset=mnist"])
    with pytest.raises(ValueError, match="needs video.image_path"):
        load_config(None, TINY_VIDEO + ["video.image_dataset=image-folder"])
    with pytest.raises(ValueError, match="video.image_dataset='faces'"):
        load_config(None, TINY_VIDEO + ["video.image_dataset=faces"])
    with pytest.raises(ValueError, match="video.image_dataset_share"):
        load_config(None, TINY_VIDEO + ["video.image_dataset=mnist", "video.image_dataset_share=2"])
