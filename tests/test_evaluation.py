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
