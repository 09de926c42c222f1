"""The equal-compute quality study: how it sizes runs, what it reads from their metrics, its FLOP and sampling-compute
arithmetic (against numbers worked out here by hand), where two FID curves cross, and one whole tiny study."""

import json
from pathlib import Path

import pytest

from pyraflow.bench import study
from pyraflow.cli import main
from pyraflow.config import load_config

EMOJI = Path(__file__).resolve().parents[2] / "configs" / "emoji.yaml"


def test_the_quality_study_sizes_a_run_by_its_median_timed_step(tmp_path, monkeypatch):
    """steps_in times real training steps of a throwaway run (here on a clock that advances 0.25 s per reading,
    so every timed step takes 0.25 s) and returns the steps that fit in the minutes; the throwaway run is removed."""
    import itertools
    import types

    clock = itertools.count(0.0, 0.25)
    monkeypatch.setattr(study, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    config = load_config(None, ["model.width=32", "model.depth=2", "model.num_heads=2", "batching.token_budget=400",
                                "train.sample_every=0", "train.checkpoint_every=0"])
    assert study.steps_in(config, minutes=1.5, out_dir=tmp_path / "calibration") == 360
    # one reading per untimed step, two per timed one: every step ran
    assert next(clock) == 0.25 * (study.CALIBRATION_WARMUP_STEPS + 2 * study.CALIBRATION_STEPS)
    assert not (tmp_path / "calibration").exists()


def test_the_study_reports_throughput_from_a_runs_metrics(tmp_path):
    config = load_config(None, ["data.image_size=64", "model.patch_size=4"])
    assert study.visual_tokens_per_stage(config) == [16, 64, 256]  # 64 px, patch 4: 4x4, 8x8, 16x16 tokens
    rows = [{"step": 10, "seconds": 9.0, "samples_stage": [9, 9, 9], "loss_stage0": 9.0},  # the first: left out
            {"step": 20, "seconds": 1.0, "samples_stage": [2, 4, 2], "loss_stage0": 0.5, "loss_stage2": 0.3},
            {"step": 30, "seconds": 3.0, "samples_stage": [1, 2, 1], "loss_stage0": 0.4, "loss_stage2": 0.2}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    t = study.throughput(tmp_path, config)
    assert t["samples_per_s"] == 12 / 4 and t["step_s_logged"] == 2.0
    assert t["visual_tokens_per_s"] == (2 * 16 + 4 * 64 + 2 * 256 + 16 + 2 * 64 + 256) / 4
    assert t["stage_loss_last"] == {0: 0.4, 2: 0.2}


def hand_forward_flops(width: int, depth: int, text: int, visual: int, mlp_ratio: float = 4.0) -> float:
    """One forward pass over one sample, written out: per block and token q/k/v (3 d^2), the output projection (d^2)
    and the MLP (2 * d * mlp_ratio * d) multiply-adds, 2 FLOPs each; the last block's text keeps only q/k/v;
    attention 4 * L^2 * d per block."""
    per_token = 2 * (3 + 1 + 2 * mlp_ratio) * width * width
    tokens = text + visual
    return depth * tokens * per_token - text * (per_token - 6 * width * width) + 4 * tokens ** 2 * width * depth


def test_throughput_counts_the_model_flops_of_the_logged_samples(tmp_path):
    config = load_config(None, ["data.image_size=64", "model.patch_size=8", "model.width=64", "model.depth=2",
                                "text.max_tokens=8"])
    assert study.visual_tokens_per_stage(config) == [4, 16, 64]
    per_stage = [hand_forward_flops(64, 2, 8, v) for v in (4, 16, 64)]
    assert study.forward_flops_per_stage(config) == pytest.approx(per_stage, rel=1e-12)
    rows = [{"step": 1, "seconds": 5.0, "samples_stage": [9, 9, 9]},
            {"step": 2, "seconds": 1.0, "samples_stage": [2, 4, 2]},
            {"step": 3, "seconds": 1.0, "samples_stage": [0, 0, 3]}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    step2 = 3 * (2 * per_stage[0] + 4 * per_stage[1] + 2 * per_stage[2])
    step3 = 3 * 3 * per_stage[2]
    assert study.throughput(tmp_path, config)["gflop_per_step"] == pytest.approx((step2 + step3) / 2 / 1e9)


def test_flat_is_given_the_full_resolution_steps_that_cost_what_the_pyramids_sampling_costs():
    pyramid = load_config(EMOJI, ["model.patch_size=4", "sample.steps=10"])
    flat = load_config(EMOJI, ["model.patch_size=4"] + study.FLAT)
    d, depth, text = pyramid.model.width, pyramid.model.depth, pyramid.text.max_tokens
    pyramid_cost = 10 * sum(hand_forward_flops(d, depth, text, v) for v in (16, 64, 256))
    expected = round(pyramid_cost / hand_forward_flops(d, depth, text, 256))
    assert study.equal_compute_steps(flat, pyramid) == expected
    assert 10 < expected < 30  # cheaper than 30 full-resolution steps, dearer than the last stage's 10
    counterpart = study.pyramid_counterpart(flat, pyramid)  # flat's own config with the pyramid's stages and steps
    assert counterpart.schedule.stages == 3 and counterpart.model.patch_size == 4
    assert study.sampling_flops(counterpart) == pytest.approx(study.sampling_flops(pyramid))


def test_arms_are_named_settings_and_equal_samples_caps_batches_at_a_full_resolution_batch():
    base = load_config(EMOJI, ["model.patch_size=8"])
    full = base.text.max_tokens + 64  # 64 px, patch 8: 8 x 8 tokens at full resolution
    assert study.arm_settings("equal-samples", base) == [f"batching.max_samples={base.batching.token_budget // full}"]
    assert study.arm_settings("flat", base) == study.FLAT
    for name in study.ARMS:  # every named arm's settings are valid overrides
        load_config(EMOJI, study.arm_settings(name, base))
    mix = load_config(EMOJI, ["batching.mix.ratio=25-50-25"] + study.arm_settings("50-30-20", base)).batching.mix
    assert mix.ratio == [0.5, 0.3, 0.2]
    with pytest.raises(ValueError, match="unknown study arm 'flatt'.*--arm NAME"):
        study.arm_settings("flatt", base)


def test_minutes_to_reach_interpolates_between_checkpoints():
    curve = [(1.0, 100.0), (2.0, 50.0), (3.0, 40.0)]
    assert study.minutes_to_reach(curve, 75.0) == pytest.approx(1.5)
    assert study.minutes_to_reach(curve, 100.0) == 1.0
    assert study.minutes_to_reach(curve, 45.0) == pytest.approx(2.5)
    assert study.minutes_to_reach(curve, 30.0) is None


def test_the_summary_finds_where_flat_and_the_best_pyramid_reach_each_other():
    def run(curve, flat=False):
        return {"fid_efficientnet_lite0": curve[-1][1], "curve": [{"minutes": m, "fid": f} for m, f in curve],
                **({"equal_sampling_compute_steps": 15} if flat else {})}

    runs = {"25-50-25": [run([(2, 300), (4, 200)]), run([(2, 320), (4, 220)])],  # mean (2, 310), (4, 210)
            "uniform": [run([(2, 330), (4, 260)])],
            "flat": [run([(2, 400), (4, 250)], flat=True)]}  # a flat run is known by its equal-compute scoring
    result = study.summarise(runs, {})
    c = result["crossing"]
    assert (c["flat"], c["pyramid"], result["best_fid"]) == ("flat", "25-50-25", "25-50-25")
    assert c["pyramid_minutes_to_flat_final"] == pytest.approx(2 + 2 * (310 - 250) / (310 - 210))
    assert c["flat_minutes_to_pyramid_final"] is None
    assert result["variants"]["25-50-25"]["curve_mean"] == [(2, 310), (4, 210)]
    assert "caption_match_crossing" not in result  # no curve point has one


def test_the_summary_times_caption_match_by_the_own_pictures_rank():
    """Caption match is timed by its mean rank (lower is better), also where both arms' top-1 is 0; a checkpoint some
    run has no rank for (a study rescored at a few checkpoints) is left out of the mean curve."""
    def run(curve, flat=False):
        return {"fid_efficientnet_lite0": 1.0, "curve": [{"minutes": m, "fid": 1.0, "caption_match": 0.0,
                                                          "caption_match_rank": r} for m, r in curve],
                **({"equal_sampling_compute_steps": 15} if flat else {})}

    runs = {"25-50-25": [run([(2, 900), (3, None), (4, 300)]), run([(2, 700), (3, 600), (4, 500)])],
            "flat": [run([(2, 1000), (3, 900), (4, 650)], flat=True)]}
    result = study.summarise(runs, {})
    assert result["variants"]["25-50-25"]["caption_match_rank_curve_mean"] == [(2, 800), (4, 400)]
    c = result["caption_match_crossing"]
    assert (c["flat_final_rank"], c["pyramid_final_rank"]) == (650, 400)
    assert (c["flat_final_top1"], c["pyramid_final_top1"]) == (0.0, 0.0)
    assert c["pyramid_minutes_to_flat_final"] == pytest.approx(2 + 2 * (800 - 650) / (800 - 400))
    assert c["flat_minutes_to_pyramid_final"] is None


def test_the_study_plot_has_one_panel_per_study(tmp_path):
    from PIL import Image

    def one(name):
        return {"config": name, "variants": {"flat": {"curve_mean": [(1, 300), (2, 200)], "runs": [
            {"curve": [{"minutes": 1, "fid": 300}, {"minutes": 2, "fid": 200}]}]}}}

    study.plot_score_curves([one("a.yaml")], tmp_path / "one.png")
    study.plot_score_curves([one("a.yaml"), one("b.yaml"), one("c.yaml")], tmp_path / "three.png")
    one_width, three_width = Image.open(tmp_path / "one.png").width, Image.open(tmp_path / "three.png").width
    assert three_width == pytest.approx(3 * one_width, rel=0.02)



def test_the_study_plot_draws_the_caption_match_rank_and_names_a_missing_curve(tmp_path):
    """--metric caption_match_rank plots each arm's rank curve (a checkpoint without a rank left out of a run's
    faint line); an arm that recorded none is a named error, not an empty panel."""
    import matplotlib.pyplot as plt

    drawn = []
    real_plot = plt.Axes.plot

    def recording(ax, *args, **kwargs):
        drawn.append([list(a) for a in args[:2]])
        return real_plot(ax, *args, **kwargs)

    ranked = {"config": "emoji.yaml", "variants": {"flat": {
        "curve_mean": [(1, 300), (2, 200)], "caption_match_rank_curve_mean": [(1, 900), (2, 400)],
        "runs": [{"curve": [{"minutes": 1, "fid": 300, "caption_match_rank": 900},
                            {"minutes": 1.5, "fid": 250, "caption_match_rank": None},
                            {"minutes": 2, "fid": 200, "caption_match_rank": 400}]}]}}}
    plt.Axes.plot = recording
    try:
        study.plot_score_curves([ranked], tmp_path / "rank.png", metric="caption_match_rank")
    finally:
        plt.Axes.plot = real_plot
    assert drawn == [[[1, 2], [900, 400]], [[1, 2], [900, 400]]]
    unranked = {"config": "mnist.yaml", "variants": {"flat": {"curve_mean": [(1, 300)], "runs": []}}}
    with pytest.raises(ValueError, match="arm flat has no caption_match_rank curve"):
        study.plot_score_curves([unranked], tmp_path / "none.png", metric="caption_match_rank")

def test_bench_study_arguments_are_checked(capsys):
    assert main(["bench", "--only-study"]) == 2
    assert "--only-study goes with --full" in capsys.readouterr().err
    assert main(["bench", "--full", "--only-study", "--arm", "lonely"]) == 2
    assert "give a name and at least one KEY=VALUE" in capsys.readouterr().err
    assert main(["bench", "--full", "--only-study", "--variants", "flatt"]) == 2
    assert "unknown study arm 'flatt'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_study_scores_every_checkpoint_and_flat_at_the_pyramids_sampling_compute(tmp_path, monkeypatch):
    """Two arms of a tiny MNIST model, a few seconds each: each run's curve has one point per checkpoint, in order of
    steps and minutes, and flat is also scored at the pyramid's sampling compute. (The time-limit guard is widened:
    a run of two seconds on a busy machine would otherwise stop before its steps.)"""
    monkeypatch.setattr(study, "TIME_LIMIT_SLACK", 100.0)
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {width: 32, depth: 2, num_heads: 2}\nbatching: {token_budget: 400}\n")
    result = study.quality_study(tmp_path / "runs", minutes=0.03, num_eval=10, progress=False,
                                 config_path=str(config), variants=["25-50-25"],
                                 arms={"flat-lr": ["flat", "train.lr=2e-3"]}, checkpoints=2)
    assert set(result["variants"]) == {"25-50-25", "flat-lr"}
    for row in result["variants"].values():
        (run,) = row["runs"]
        steps = [p["step"] for p in run["curve"]]
        assert len(steps) == 2 and steps[-1] == run["steps"] and steps[0] < steps[1]
        assert 0 < run["curve"][0]["minutes"] < run["curve"][1]["minutes"]
    flat_run = result["variants"]["flat-lr"]["runs"][0]
    assert flat_run["equal_sampling_compute_steps"] == study.equal_compute_steps(
        load_config(str(config), study.FLAT), load_config(str(config)))
    assert flat_run["equal_sampling_steps"]["steps"] == 30
    assert result["arms"]["flat-lr"] == study.FLAT + ["train.lr=2e-3"]
    assert result["crossing"]["flat"] == "flat-lr"
    assert all(0 <= p["caption_match"] <= 1 and p["caption_match_rank"] >= 0
               for row in result["variants"].values() for p in row["runs"][0]["curve"])
    assert result["caption_match_crossing"]["flat"] == "flat-lr"


def test_the_block_noise_off_arm_samples_jumps_with_independent_noise():
    """Inside independent_jump_noise the sampler's jump adds noise uncorrelated within 2x2 blocks; outside, the
    block noise has the -gamma correlation of its formula (both checked on many draws)."""
    import torch

    from pyraflow.config import ScheduleConfig
    from pyraflow.schedule import PyramidSchedule

    schedule = PyramidSchedule(ScheduleConfig(stages=2))
    a, b = schedule.jump_coefficients(1)
    x = torch.zeros(20000, 1, 1, 1)  # the upsampled part is zero: what the jump adds is b * its noise

    def block_correlation(jumped):
        n = jumped.reshape(-1, 4) / b
        return float((n[:, 0] * n[:, 1]).mean())

    generator = torch.Generator().manual_seed(0)
    assert block_correlation(schedule.jump(x, 1, generator)) == pytest.approx(-1 / 3, abs=0.03)
    with study.independent_jump_noise():
        assert block_correlation(schedule.jump(x, 1, generator)) == pytest.approx(0.0, abs=0.03)
    assert block_correlation(schedule.jump(x, 1, generator)) == pytest.approx(-1 / 3, abs=0.03)


def test_studies_of_the_same_config_merge_seed_by_seed():
    def study_of(seed, fid):
        run = {"seed": seed, "fid_efficientnet_lite0": fid, "curve": [{"minutes": 1.0, "fid": fid}]}
        return {"config": "c.yaml", "overrides": [], "minutes_per_variant": 7, "eval_samples": 200, "seeds": [seed],
                "arms": {"flat": study.FLAT}, "variants": {"flat": {"runs": [run]}}}

    merged = study.merge_studies([study_of(0, 300.0), study_of(1, 200.0)])
    assert merged["seeds"] == [0, 1] and merged["variants"]["flat"]["fid_mean"] == 250.0
    other = study_of(1, 200.0) | {"minutes_per_variant": 5}
    with pytest.raises(ValueError, match="different minutes_per_variant"):
        study.merge_studies([study_of(0, 300.0), other])


def test_training_minutes_count_every_step_between_logged_rows():
    rows = [{"step": 10, "seconds": 0.6}, {"step": 20, "seconds": 1.2}, {"step": 25, "seconds": 0.6}]
    assert study.training_minutes_at(rows, 20) == pytest.approx((10 * 0.6 + 10 * 1.2) / 60)
    assert study.training_minutes_at(rows, 25) == pytest.approx((10 * 0.6 + 10 * 1.2 + 5 * 0.6) / 60)
    assert study.training_minutes_at(rows, 5) == pytest.approx(5 * 0.6 / 60)  # a step before the first row
    assert study.training_minutes_at(rows, 15) == pytest.approx((10 * 0.6 + 5 * 1.2) / 60)
    assert study.training_minutes_at(rows, 30) == pytest.approx((10 * 0.6 + 10 * 1.2 + 10 * 0.6) / 60)  # after the last
