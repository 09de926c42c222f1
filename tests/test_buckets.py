"""Any size in one batch: bucket shapes, pictures brought to their bucket, (stage, bucket) classes drawing from
their own pools, the plan over five buckets, packed == alone across aspect ratios and stages, sampling at any size,
and a bucketed run end to end."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from pyraflow.batching import TokenBudgetBatcher, example_classes
from pyraflow.config import Bucket, auto_aspects, load_config, make_buckets, nearest_bucket, parse_aspect
from pyraflow.data.datasets import cover_crop
from pyraflow.packing import Sample, pack, unpack
from helpers import CHANNELS, POOLED_DIM, TEXT_DIM, randomised_model

FIVE = ["data.dataset=scenes", "data.channels=3", "data.aspect_buckets=[1:2, 2:3, 1:1, 3:2, 2:1]",
        "model.patch_size=2", "batching.token_budget=4096"]


def test_buckets_keep_the_area_and_halve_cleanly():
    buckets = make_buckets([0.5, 0.75, 1.0, 4 / 3, 2.0], resolution=64, multiple=8, frames=[1])
    assert len(buckets) == 5 and buckets == sorted(buckets, key=lambda b: b.aspect)
    for b in buckets:
        assert b.height % 8 == 0 and b.width % 8 == 0
        assert abs(b.height * b.width - 64 * 64) / (64 * 64) < 0.2
    assert Bucket(64, 64) in buckets and parse_aspect("3:4") == 0.75 and parse_aspect(2) == 2.0
    with pytest.raises(ValueError, match="not a ratio"):
        parse_aspect("wide")
    # the nearest bucket in log aspect ratio: 100x300 (1:3) is closest to 1:2; 310x300 to 1:1
    assert nearest_bucket(100, 300, buckets) == 0 and buckets[0].aspect < 0.6  # the 1:2 bucket (88x48 once rounded)
    assert buckets[nearest_bucket(310, 300, buckets)].aspect == 1.0
    clips = make_buckets([1.0], 32, 8, frames=[5, 9])
    assert buckets_frames(clips, nearest_bucket(32, 32, clips, frames=7)) == 5  # a 7-frame clip fits only 5
    assert auto_aspects([(200, 100)] * 50 + [(100, 100)] * 49 + [(100, 310)]) == [1.0, 2.0]  # 1% of 1:3 is noise


def buckets_frames(buckets, i):
    return buckets[i].frames


def test_a_picture_covers_its_bucket_and_is_cropped_only_by_the_rounding():
    x = np.tile(np.linspace(0, 255, 90, dtype=np.uint8), (45, 1))  # a 90 x 45 horizontal ramp (2:1)
    out = cover_crop(Image.fromarray(x), 24, 48, 1)
    assert out.shape == (1, 24, 48)
    assert out[0, :, 0].max() < -0.9 and out[0, :, -1].min() > 0.9  # the whole ramp survives: no side cut off


def test_yaml_reads_ratios_as_ratios_not_base_60_numbers():
    config = load_config(None, FIVE)
    assert config.data.aspect_buckets == ["1:2", "2:3", "1:1", "3:2", "2:1"]
    assert [b.name for b in config.buckets()] == ["48x24", "40x24", "32x32", "24x40", "24x48"]
    with pytest.raises(ValueError, match="outside 1:10"):
        load_config(None, ["data.aspect_buckets=[20]"])


def test_classes_draw_from_their_own_buckets_with_the_datas_shares():
    config = load_config(None, FIVE)
    buckets = config.buckets()
    counts = [50, 20, 130, 40, 10]
    classes = example_classes(config, buckets, counts)
    assert len(classes.stages) == 3 * 5
    starts = np.cumsum([0] + counts)
    batcher = TokenBudgetBatcher(config.batching, classes.segment_tokens, classes.mix, counts, 0, 1, classes.names(),
                                 classes.buckets, lambda pool, local: [int(starts[pool]) + i for i in local])
    seen = np.zeros(5)
    for _ in range(500):
        batch = batcher.next_batch()
        for i, c in zip(batch.sample_ids, batch.classes):
            b = classes.buckets[c]
            assert starts[b] <= i < starts[b + 1]  # a class's samples come from its bucket
            seen[b] += 1
    np.testing.assert_allclose(seen / seen.sum(), np.asarray(counts) / sum(counts), atol=0.005)
    state = batcher.state_dict()
    expected = [batcher.next_batch().sample_ids for _ in range(20)]
    again = TokenBudgetBatcher(config.batching, classes.segment_tokens, classes.mix, counts, 0, 1, classes.names(),
                               classes.buckets, lambda pool, local: [int(starts[pool]) + i for i in local])
    again.load_state_dict(state)
    assert [again.next_batch().sample_ids for _ in range(20)] == expected


def test_plan_over_five_buckets_holds_tokens_mix_and_shares():
    from pyraflow.plan import plan_report

    report = plan_report(load_config(None, FIVE), steps=2000)
    assert report["tokens_per_step"]["cv"] <= 0.02 and report["tokens_per_step"]["max"] <= 4096
    for stage in report["schedule"]["stages"]:
        assert abs(stage["realised_ratio"] - stage["target_ratio"]) <= 0.005
    assert len(report["per_bucket"]) == 5
    for bucket in report["per_bucket"]:
        assert abs(bucket["realised_share"] - bucket["data_share"]) <= 0.01


BACKENDS = ["grouped", "flash"]


@pytest.mark.parametrize("backend", BACKENDS + ["flex"])
def test_three_aspect_ratios_at_three_stages_packed_equal_each_alone(backend, flash_on_cpu):
    model = randomised_model(21, attention=backend)
    g = torch.Generator().manual_seed(21)
    samples = []
    for height, width in ((16, 8), (16, 16), (8, 16)):  # portrait, square, landscape at full resolution
        for stage in range(3):
            d = 2 ** (2 - stage)
            samples.append(Sample(stage, torch.randn(CHANNELS, 1, height // d * 2, width // d * 2, generator=g),
                                  torch.randn(int(torch.randint(2, 7, (1,), generator=g)), TEXT_DIM, generator=g),
                                  torch.randn(POOLED_DIM, generator=g), float(torch.rand((), generator=g) * 1000)))
    trainable = backend != "flex"  # flex has no backward on CPU
    for s in samples:
        s.latent.requires_grad_(trainable)
    params = list(model.parameters())
    weights = [torch.randn(s.latent.shape, generator=g) for s in samples]
    with torch.set_grad_enabled(trainable):
        batch = pack(samples, 3, 2)
        together = unpack(model(batch), batch.layout)
        assert len({s.latent.shape[2:] for s in samples}) == 9 and len(batch.layout.groups) == 9  # 9 shapes, 9 groups
        for s, t in zip(samples, together):
            alone = pack([s], 3, 2)
            torch.testing.assert_close(t, unpack(model(alone), alone.layout)[0], rtol=1e-5, atol=1e-5)
        if trainable:
            grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(together, weights)), params)
            expected = [torch.zeros_like(p) for p in params]
            for s, w in zip(samples, weights):
                alone = pack([s], 3, 2)
                one = torch.autograd.grad((unpack(model(alone), alone.layout)[0] * w).sum(), params)
                expected = [a + b for a, b in zip(expected, one)]
            for a, b in zip(grads, expected):  # relative to the gradient's norm, as in test_model (fp32 sum order)
                assert ((a - b).norm() / b.norm().clamp(min=1e-30)).item() <= 1e-5


def test_sampling_at_any_size_the_pyramid_can_halve(tmp_path, capsys):
    from pyraflow.cli import main
    from pyraflow.train import run_training

    run = tmp_path / "run"
    run_training(load_config(None, ["model.width=32", "model.depth=2", "model.num_heads=2", "batching.token_budget=400",
                                    "train.steps=2", "train.sample_every=0", "sample.steps=1"]), run, progress=False)
    out = tmp_path / "wide.png"
    assert main(["sample", "--checkpoint", str(run), "--prompt", "a handwritten digit four", "--num", "2",
                 "--height", "16", "--width", "48", "--device", "cpu", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 + 2 * 50, 2 + 18)  # two 48-wide, 16-tall samples in one row
    assert main(["sample", "--checkpoint", str(run), "--prompt", "x", "--height", "30", "--width", "20",
                 "--out", str(tmp_path / "bad.png")]) == 2
    assert "the nearest size is 32x16 (--height 32 --width 16)" in capsys.readouterr().err


def test_a_bucketed_run_trains_from_its_own_cache_and_draws_three_shapes(tmp_path):
    from pyraflow.train import run_training

    config = load_config(None, FIVE + ["model.width=32", "model.depth=2", "model.num_heads=2", "text.max_tokens=12",
                                       "batching.token_budget=1200", "train.steps=3", "train.sample_every=0",
                                       "sample.steps=1", "sample.per_prompt=1", "sample.prompts=[a tabby cat]"])
    run = tmp_path / "run"
    run_training(config, run, progress=False)
    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == ["step-000003-24x48.png", "step-000003-32x32.png", "step-000003-48x24.png"]
    assert Image.open(run / "samples" / "step-000003-48x24.png").size == (2 + 26, 2 + 50)  # a portrait sample
    assert (run / "cache" / "complete.json").is_file()  # prepared in the run directory, read row by row
    assert math.isclose(sum(1 for _ in (run / "cache").glob("shard-*.jsonl")), 5)  # a shard per bucket
    from pyraflow.evaluation import evaluate

    scores = evaluate(run, num=6, steps=1, progress=False)  # samples at their training pictures' buckets
    assert sum(b["samples"] for b in scores["per_bucket"].values()) == 6 and scores["fid_efficientnet_lite0"] > 0
    matched = scores["caption_match"]
    assert matched["num_samples"] == 6 and 0 <= matched["top1"] <= matched["top5"] <= 1
    assert "caption_match" not in evaluate(run, num=6, steps=1, progress=False, match=0)
