"""Training end to end at tiny size: artefacts, sampling, exact resume after kill -9, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pyraflow.cli import main
from pyraflow.config import load_config
from pyraflow.training import TrainingStopped, run_training

TINY = ["model.width=32", "model.depth=2", "model.num_heads=2", "batching.token_budget=400", "train.log_every=1",
        "train.warmup_steps=2", "sample.steps=2", "sample.per_prompt=2",
        "sample.prompts=[a handwritten digit one, a handwritten digit seven]"]


def tiny(*extra):
    return load_config(None, TINY + list(extra))


def cli_args(*extra):
    return [a for item in TINY + list(extra) for a in ("--set", item)]


def test_a_tiny_run_writes_every_artefact_and_samples(tmp_path, capsys):
    out = tmp_path / "run"
    run_training(tiny("train.steps=4", "train.checkpoint_every=2", "train.sample_every=2"), out, progress=False)
    checkpoints = out / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} >= {"step-2", "step-4", "latest"}
    assert (checkpoints / "latest").resolve().name == "step-4"
    assert {p.name for p in (checkpoints / "step-4").iterdir()} == {
        "config.json", "model.safetensors", "ema.safetensors", "null_text.safetensors", "run.yaml", "trainer.pt"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("loss_stage" in " ".join(r) and r["tokens"] <= 400 for r in rows)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
    # sampling from the run: a grid, and the same seed gives the same image
    for name in ("a.png", "b.png"):
        assert main(["sample", "--checkpoint", str(out), "--prompt", "a handwritten digit three", "--num", "3",
                     "--steps", "2", "--seed", "5", "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert "time per stage" in capsys.readouterr().out


def _weights(run):
    return load_file(str(Path(run) / "checkpoints" / "latest" / "model.safetensors"))


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    settings = cli_args("train.steps=30", "train.checkpoint_every=3", "train.sample_every=0", "train.threads=1",
                        "sample.per_prompt=1")
    command = [sys.executable, "-m", "pyraflow", "train", "--quiet", *settings]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(command + ["--out", str(full)], check=True, env=env, capture_output=True)

    broken = tmp_path / "broken"
    process = subprocess.Popen(command + ["--out", str(broken)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (broken / "checkpoints" / "step-6").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = json.loads((broken / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert killed_at < 30
    subprocess.run(command + ["--out", str(broken), "--resume"], check=True, env=env, capture_output=True)

    a, b = _weights(full), _weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(full) == losses(broken)


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_torchrun_on_cpu(tmp_path, parallel):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pyraflow",
               "train", "--quiet", "--out", str(out),
               *cli_args("train.steps=4", "train.checkpoint_every=2", "train.sample_every=0", f"train.parallel={parallel}",
                         "sample.per_prompt=1")]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checksums = json.loads((out / "rank_checksums.json").read_text())
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4


def test_gradient_accumulation_takes_one_batch_per_micro_step(tmp_path):
    from pyraflow.training import Trainer

    trainer = Trainer(tiny("train.grad_accum=3", "train.sample_every=0"), tmp_path / "run", progress=False)
    metrics = trainer.train_step()
    assert trainer.step == 1 and trainer.batcher.step == 3
    assert sum(metrics["samples_stage"]) == trainer.batcher.consumed  # every sample of the 3 batches counted
    assert metrics["tokens"] > 400  # three budgets' worth of tokens in one optimizer step


def test_clear_errors(tmp_path, capsys):
    out = tmp_path / "run"
    run_training(tiny("train.steps=2", "train.checkpoint_every=2", "train.sample_every=0"), out, progress=False)

    def error(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "--prompt" in error(["sample", "--checkpoint", str(out), "--out", str(tmp_path / "x.png")])
    assert "does not exist" in error(["sample", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--out", "x.png"])
    assert "already holds a run" in error(["train", "--out", str(out), *cli_args("train.steps=3")])
    assert "differs from the run" in error(["train", "--out", str(out), "--resume", *cli_args("train.steps=3", "model.depth=3")])
    assert "no checkpoint to resume" in error(["train", "--out", str(tmp_path / "fresh"), "--resume", *cli_args()])
    latest = out / "checkpoints" / "latest"
    (latest / "ema.safetensors").write_bytes(b"garbage")
    assert "corrupt" in error(["sample", "--checkpoint", str(out), "--prompt", "x", "--out", str(tmp_path / "x.png")])
    (latest / "null_text.safetensors").unlink()
    assert "missing null_text.safetensors" in error(["sample", "--checkpoint", str(out), "--prompt", "x", "--out", "x.png"])


def test_non_finite_steps_are_skipped_then_the_run_stops_with_its_state_saved(tmp_path):
    out = tmp_path / "run"
    config = tiny("train.steps=50", "train.lr=1.0e+38", "train.warmup_steps=0", "train.grad_clip=0",
                  "train.max_bad_steps=3", "train.sample_every=0", "train.checkpoint_every=0")
    with pytest.raises(TrainingStopped, match="non-finite"):
        run_training(config, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped"] for r in rows) == 3
    assert (out / "checkpoints" / "latest" / "trainer.pt").is_file()


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_latest(tmp_path):
    from pyraflow.checkpoint import REQUIRED, write_checkpoint

    def good(directory):
        for name in REQUIRED:
            (directory / name).write_text("x")

    def crash(directory):
        (directory / "config.json").write_text("partial")
        raise OSError("disk full")

    write_checkpoint(tmp_path, 1, good, keep=3)
    with pytest.raises(OSError):
        write_checkpoint(tmp_path, 2, crash, keep=3)
    assert (tmp_path / "checkpoints" / "latest").resolve().name == "step-1"
    assert not (tmp_path / "checkpoints" / "step-2").exists()


def test_learning_rate_schedule():
    from pyraflow.training import TrainConfig, lr_factor

    tc = TrainConfig(steps=1000, warmup_steps=100, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(tc, 0) == pytest.approx(0.01) and lr_factor(tc, 99) == pytest.approx(1.0)
    assert lr_factor(tc, 100) == pytest.approx(1.0)
    assert lr_factor(tc, 550) == pytest.approx(0.55)  # half way through the decay: (1 + 0.1) / 2
    assert lr_factor(tc, 1000) == pytest.approx(0.1)
    assert lr_factor(TrainConfig(lr_schedule="constant"), 5000) == 1.0


def test_a_time_limit_stops_the_run_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    summary = run_training(tiny("train.steps=100000", "train.time_limit_minutes=0.05", "train.sample_every=0",
                                "train.checkpoint_every=0"), out, progress=False)
    assert 0 < summary["steps"] < 100000
    assert (out / "checkpoints" / f"step-{summary['steps']}").is_dir()
