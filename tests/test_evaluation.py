"""Evaluation numbers against independent computations."""

import numpy as np
import pytest
import torch

from pyraflow.evaluation import frechet_distance, motion_statistics


def test_frechet_distance_matches_the_formula_through_eigenvalues():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.7
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) = sum of the square roots of the eigenvalues of S_a S_b (real, >= 0 for SPD S_a, S_b)
    trace_root = np.sqrt(np.clip(np.linalg.eigvals(cov_a @ cov_b).real, 0, None)).sum()
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # fewer samples than dimensions (singular covariances) still gives a finite, non-negative number
    assert 0 <= frechet_distance(a[:4], b[:4]) < float("inf")


def test_motion_statistics_of_known_videos():
    still = torch.zeros(2, 1, 5, 4, 4)  # (B, C, T, H, W)
    ramp = torch.arange(5, dtype=torch.float32).view(1, 1, 5, 1, 1).expand(2, 1, 5, 4, 4) * 0.1
    assert motion_statistics(still)["consecutive_frame_change"] == pytest.approx(0.0)
    assert motion_statistics(ramp)["consecutive_frame_change"] == pytest.approx(0.1, rel=1e-5)
    two = torch.stack([torch.zeros(1, 5, 4, 4), torch.ones(1, 5, 4, 4)])  # two still videos, 1 apart
    assert motion_statistics(two) == pytest.approx({"consecutive_frame_change": 0.0, "unrelated_frame_change": 1.0})


def test_high_frequency_energy_sees_speckle_not_smooth_shapes():
    import torch

    from pyraflow.evaluation import high_frequency_energy

    flat = torch.full((2, 1, 16, 16), -1.0)
    assert high_frequency_energy(flat) == 0.0
    ramp = torch.linspace(-1, 1, 16).repeat(2, 1, 16, 1)  # a smooth gradient: only its border differs from its blur
    speckled = flat.clone()
    speckled[:, :, ::3, ::3] = 1.0
    assert high_frequency_energy(speckled) > 20 * high_frequency_energy(ramp) > 0


@pytest.mark.parametrize("size", [32, 64])
def test_eval_scores_a_digit_run_at_its_size(tmp_path, monkeypatch, size):
    """FID, the stage report and digit accuracy at any image size (the classifier sees every size at 32 x 32)."""
    import pyraflow.evaluation as evaluation
    from pyraflow.config import load_config
    from pyraflow.train import run_training

    trained = evaluation.train_digit_classifier
    monkeypatch.setattr(evaluation, "train_digit_classifier", lambda images, labels: trained(images, labels, epochs=1))
    config = load_config(None, [f"data.image_size={size}", "model.width=32", "model.depth=2", "model.num_heads=2",
                                "train.steps=2", "train.sample_every=0", "train.checkpoint_every=2",
                                "batching.token_budget=600", "sample.per_prompt=1"])
    run_training(config, tmp_path / "run", progress=False)
    result = evaluation.evaluate(tmp_path / "run", num=20, steps=1, progress=False, stages=tmp_path / "stages.png")
    assert result["fid_efficientnet_lite0"] > 0 and 0 <= result["digit_accuracy"] <= 1
    assert result["classifier_heldout_accuracy"] > 0.8  # the 32 x 32 classifier, one epoch
    assert len(result["stages"]) == 3 and (tmp_path / "stages.png").is_file()
    matched = result["caption_match"]  # the same 20 samples, against the 4,500 training digits at 16 x 16
    assert matched["num_samples"] == 20 and 0 <= matched["top1"] <= matched["top5"] <= 1
    assert 0.09 < matched["chance_top1"] < 0.11  # ten digits, about equally many of each


def brute_force_match(samples, prompts, pictures, captions, side=16, top=5):
    """Independent: block means by reshape, distances in float64 by loops over pictures, chance by math.comb."""
    from math import comb

    def small(x):
        b, c, h, w = x.shape
        return x.double().reshape(b, c, side, h // side, side, w // side).mean((3, 5)).flatten(1)

    a, r = small(samples), small(pictures)
    top1 = topk = 0
    ranks = []
    for i, prompt in enumerate(prompts):
        distances = [float(((a[i] - r[j]) ** 2).sum()) for j in range(len(r))]
        order = sorted(range(len(r)), key=distances.__getitem__)
        top1 += captions[order[0]] == prompt
        topk += any(captions[j] == prompt for j in order[:top])
        if prompt in captions:
            ranks.append(next(k for k, j in enumerate(order) if captions[j] == prompt))
    n = len(captions)
    chance1 = sum(captions.count(p) / n for p in prompts) / len(prompts)
    chancek = sum(1 - comb(n - captions.count(p), top) / comb(n, top) for p in prompts) / len(prompts)
    # the expected first position of m marked items among n shuffled ones, summed over positions
    chance_rank = [sum(comb(n - k - 1, captions.count(p) - 1) * k for k in range(n)) / comb(n, captions.count(p))
                   for p in prompts if p in captions]
    return (top1 / len(prompts), topk / len(prompts), chance1, chancek, sum(ranks) / len(ranks),
            sum(chance_rank) / len(chance_rank))


def test_caption_match_agrees_with_a_brute_force_nearest_neighbour_search():
    from pyraflow.evaluation import caption_match

    g = torch.Generator().manual_seed(0)
    captions = [f"glyph {i % 23}" for i in range(40)]  # some captions name two pictures
    pictures = torch.rand(40, 3, 32, 32, generator=g) * 0.2  # close together, so noise moves samples between them
    picks = torch.randint(0, 40, (30,), generator=g)
    samples = (pictures[picks] + torch.randn(30, 3, 32, 32, generator=g)).clamp(-1, 1)
    prompts = [captions[i] for i in picks.tolist()]
    prompts[:3] = ["a caption no picture has"] * 3
    result = caption_match(samples, prompts, pictures, captions)
    top1, top5, chance1, chance5, rank, chance_rank = brute_force_match(samples, prompts, pictures, captions)
    assert 0 < top1 < 1 and top1 < top5 and rank > 0  # the case is not trivial
    assert (result["top1"], result["top5"], result["rank_mean"]) == pytest.approx((top1, top5, rank))
    assert (result["chance_top1"], result["chance_top5"]) == pytest.approx((chance1, chance5))
    assert result["chance_rank_mean"] == pytest.approx(chance_rank)
    assert result["num_samples"] == 30


def test_caption_match_finds_exact_pictures_and_not_shuffled_ones():
    from pyraflow.evaluation import caption_match

    g = torch.Generator().manual_seed(1)
    pictures = torch.rand(50, 1, 16, 16, generator=g) * 2 - 1
    captions = [f"picture {i}" for i in range(50)]
    exact = caption_match(pictures, captions, pictures, captions)
    assert (exact["top1"], exact["rank_mean"], exact["chance_rank_mean"]) == (1.0, 0.0, 24.5)
    shuffled = captions[1:] + captions[:1]  # every sample prompted with another picture's caption
    assert caption_match(pictures, shuffled, pictures, captions)["top1"] == 0.0
    # pictures of several sizes (native-shape runs) compare at 16 x 16 alike
    mixed = [torch.nn.functional.interpolate(pictures[:20], size=(32, 64)), pictures[20:]]
    assert caption_match(mixed, captions, pictures, captions)["top1"] == 1.0
    with pytest.raises(ValueError, match="channels"):
        caption_match(pictures.repeat(1, 3, 1, 1), captions, pictures, captions)


def test_eval_of_a_run_with_heldout_captions_matches_extra_samples_of_training_captions(tmp_path):
    """Emoji: FID's prompts are held-out captions, so caption match samples training captions of its own."""
    from pyraflow.data.emoji import DEFAULT_FONT

    if not DEFAULT_FONT.is_file():
        pytest.skip(f"{DEFAULT_FONT} missing: apt-get install fonts-noto-color-emoji")
    from pyraflow.config import load_config
    from pyraflow.evaluation import evaluate
    from pyraflow.train import run_training

    config = load_config("configs/emoji.yaml", ["data.image_size=16", "model.patch_size=2", "model.width=32",
                                                "model.depth=1", "model.num_heads=2", "train.steps=1",
                                                "train.sample_every=0", "train.checkpoint_every=1",
                                                "batching.token_budget=400", "sample.per_prompt=1"])
    run_training(config, tmp_path / "run", progress=False)
    result = evaluate(tmp_path / "run", num=4, match=6, steps=1, progress=False)
    matched = result["caption_match"]
    assert matched["num_samples"] == 6 and matched["reference"].startswith("1825 training pictures")
    assert matched["chance_top1"] == pytest.approx(1 / 1825)
    assert "206 held-out emoji" in result["fid_reference"]
    assert "caption_match" not in evaluate(tmp_path / "run", num=4, match=0, steps=1, progress=False)
