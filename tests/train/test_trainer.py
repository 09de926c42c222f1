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
from pyraflow.train import Trainer, TrainingStopped, run_training
from helpers import one_rank_fsdp_bf16_run

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
        "config.json", "model.safetensors", "ema.safetensors", "null_text.safetensors", "run.yaml", "trainer.pt",
        "optimizer.safetensors"}
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


def _weights(run, name="model"):
    return load_file(str(Path(run) / "checkpoints" / "latest" / f"{name}.safetensors"))


def kill_9_then_resume(tmp_path, launcher: list[str], settings: list[str]) -> None:
    """Run once uninterrupted; run again, kill -9 the whole process group after the step-6 checkpoint, resume; the
    final weights (model and EMA) and every logged loss must be equal, bit for bit."""
    command = launcher + ["train", "--quiet", *cli_args(*settings)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(command + ["--out", str(full)], check=True, env=env, capture_output=True, timeout=600)

    broken = tmp_path / "broken"
    process = subprocess.Popen(command + ["--out", str(broken)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (broken / "checkpoints" / "step-6").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # the launcher, every rank and every loader worker
    process.wait()
    killed_at = json.loads((broken / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert killed_at < 30
    subprocess.run(command + ["--out", str(broken), "--resume"], check=True, env=env, capture_output=True, timeout=600)

    for name in ("model", "ema"):
        a, b = _weights(full, name), _weights(broken, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = lambda run: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(full) == losses(broken)


RESUME_SETTINGS = ["train.steps=30", "train.checkpoint_every=3", "train.sample_every=0", "sample.per_prompt=1"]


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    kill_9_then_resume(tmp_path, [sys.executable, "-m", "pyraflow"], RESUME_SETTINGS + ["train.threads=1"])


@pytest.mark.slow
def test_kill_9_then_resume_of_a_compiled_run_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.delenv("PYRAFLOW_NO_COMPILE")  # the runs' processes compile
    kill_9_then_resume(tmp_path, [sys.executable, "-m", "pyraflow"],
                       RESUME_SETTINGS + ["train.threads=1", "train.compile=true", "sample.compile=false"])


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_kill_9_then_resume_of_a_two_rank_run_equals_the_uninterrupted_run(tmp_path, parallel):
    """Per-rank random draws, the loader's position and (sharded) optimizer state all resume exactly."""
    kill_9_then_resume(tmp_path, TORCHRUN + ["-m", "pyraflow"], RESUME_SETTINGS + [f"train.parallel={parallel}"])


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_9_then_resume_of_a_sequence_parallel_run_equals_the_uninterrupted_run(tmp_path):
    """Two ranks splitting each batch's sequence (FSDP2 over both): the group's shared batches, the sharded state and
    the exchange resume exactly."""
    kill_9_then_resume(tmp_path, TORCHRUN + ["-m", "pyraflow"],
                       RESUME_SETTINGS + ["train.parallel=fsdp", "train.sequence_parallel=2"])


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_sequence_parallel_run_trains_as_a_single_process_does(tmp_path, parallel):
    """Two ranks in one sequence-parallel group train on the batches a single process trains on: the same logged
    losses and token counts, and the same weights after 4 steps within 1e-5 (fp32; only the order of sums differs)."""
    settings = ["train.steps=4", "train.checkpoint_every=4", "train.sample_every=0", "sample.per_prompt=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, "-m", "pyraflow"],
            "split": TORCHRUN + ["-m", "pyraflow"]}
    for name, launcher in runs.items():
        extra = [f"train.parallel={parallel}", "train.sequence_parallel=2"] if name == "split" else []
        result = subprocess.run(launcher + ["train", "--quiet", "--out", str(tmp_path / name), *cli_args(*settings, *extra)],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in runs}
    assert [r["step"] for r in rows["split"]] == [1, 2, 3, 4]
    for a, b in zip(rows["one"], rows["split"]):
        assert a["tokens"] == b["tokens"] and a["samples_stage"] == b["samples_stage"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)  # AdamW would hide a gradient's scale
    for name in ("model", "ema"):
        a, b = _weights(tmp_path / "one", name), _weights(tmp_path / "split", name)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name
    # a checkpoint records its group size: resuming with another (here: a record changed by hand) is refused
    state_file = tmp_path / "one" / "checkpoints" / "latest" / "trainer.pt"
    torch.save({**torch.load(state_file, weights_only=False), "sequence_parallel": 2}, state_file)
    with pytest.raises(ValueError, match="written with train.sequence_parallel=2 .* resume with the same value"):
        Trainer(tiny(*settings, "train.steps=6"), tmp_path / "one", resume=True, progress=False)


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_torchrun_on_cpu(tmp_path, parallel):
    """``pyraflow train`` under torchrun ends cleanly; the ranks hold the same weights (checked by a worker that
    trains through the same Trainer and loop)."""
    settings = TINY + ["train.steps=4", "train.checkpoint_every=2", "train.sample_every=0", f"train.parallel={parallel}",
                       "sample.per_prompt=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "cli"
    command = TORCHRUN + ["-m", "pyraflow", "train", "--quiet", "--out", str(out), *cli_args(*settings[len(TINY):])]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4
    worker = tmp_path / "worker"
    result = torchrun_worker(worker, settings)
    assert result.returncode == 0, result.stderr[-3000:]
    checksums = json.loads((worker / "rank_checksums.json").read_text())
    assert len(checksums) == 2 and checksums[0] == checksums[1]


@pytest.mark.distributed
def test_fsdp2_in_bf16_on_one_rank_from_prepared_latents(tmp_path):
    """The path of a GPU run, on the CPU: torchrun with one rank still shards (FSDP2 with its bf16 mixed-precision
    policy), latents come from a cache with no VAE at hand, text from a local Hugging Face encoder."""
    result = one_rank_fsdp_bf16_run(tmp_path)
    assert "cannot decode" in result.stderr  # no VAE: the grid is skipped with a reason, not a crash


def torchrun_worker(out, settings, env=None, timeout=300):
    command = TORCHRUN + [str(Path(__file__).with_name("torchrun_train.py")), str(out), *settings]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          timeout=timeout)


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_failing_rank_ends_the_job_promptly_naming_itself(tmp_path, parallel):
    settings = TINY + ["train.steps=50", "train.checkpoint_every=0", "train.sample_every=0", f"train.parallel={parallel}"]
    started = time.monotonic()
    result = torchrun_worker(tmp_path / "run", settings, {"FAIL_RANK": "1", "FAIL_STEP": "3"}, timeout=180)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "rank 1 of 2 failed: RuntimeError: injected failure" in result.stderr, result.stderr[-3000:]
    assert elapsed < 120  # start-up, 3 steps and the teardown, far from the collective timeout


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_finished_torchrun_jobs_always_exit_zero(tmp_path, parallel):
    """Five identical 2-rank jobs: every one exits 0 (an unclean teardown aborted some at interpreter exit)."""
    settings = TINY + ["train.steps=4", "train.checkpoint_every=2", "train.sample_every=0", f"train.parallel={parallel}",
                       "sample.per_prompt=1"]
    codes = []
    for attempt in range(5):
        result = subprocess.run(TORCHRUN + ["-m", "pyraflow", "train", "--quiet", "--out", str(tmp_path / f"run{attempt}"),
                                            *cli_args(*settings[len(TINY):])],
                                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
        codes.append((result.returncode, result.stderr[-500:]))
    assert [c for c, _ in codes] == [0] * 5, codes


def test_gradient_accumulation_takes_one_batch_per_micro_step(tmp_path):
    trainer = Trainer(tiny("train.grad_accum=3", "train.sample_every=0"), tmp_path / "run", progress=False)
    metrics = trainer.read_metrics(trainer.train_step())
    trainer.close()
    # the loader plans ahead; the position a checkpoint saves is that after the third consumed batch
    assert trainer.step == 1 and trainer.position["step"] == 3
    assert sum(metrics["samples_stage"]) == sum(trainer.position["consumed"])  # every sample of the 3 batches counted
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


def test_a_checkpoint_with_the_older_optimizer_pickle_resumes_exactly(tmp_path):
    """Checkpoints written before optimizer.safetensors hold AdamW's state as one optimizer.pt (torch's full state
    dict, keyed by parameter name): a run continues from them as from its own checkpoints."""
    settings = ("train.steps=4", "train.checkpoint_every=2", "train.sample_every=0", "train.threads=1")
    run_training(tiny(*settings), tmp_path / "full", progress=False)
    old = tmp_path / "old"
    run_training(tiny(*settings), old, max_steps=2, progress=False)
    latest = old / "checkpoints" / "latest"
    stored, trainer_state = load_file(latest / "optimizer.safetensors"), torch.load(latest / "trainer.pt", weights_only=False)
    groups = trainer_state.pop("optimizer_groups")
    state: dict = {}
    for key, value in stored.items():
        name, _, entry = key.rpartition(".")
        state.setdefault(name, {})[entry] = value
    torch.save({"state": state, "param_groups": groups}, latest / "optimizer.pt")
    torch.save(trainer_state, latest / "trainer.pt")
    (latest / "optimizer.safetensors").unlink()
    run_training(tiny(*settings), old, resume=True, progress=False)
    for name in ("model", "ema"):
        a, b = _weights(tmp_path / "full", name), _weights(old, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name

    (old / "checkpoints" / "latest" / "optimizer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no optimizer.safetensors"):
        run_training(tiny("train.steps=6", *settings[1:]), old, resume=True, progress=False)


def test_non_finite_steps_are_skipped_then_the_run_stops_with_its_state_saved(tmp_path):
    out = tmp_path / "run"
    config = tiny("train.steps=50", "train.lr=1.0e+38", "train.warmup_steps=0", "train.grad_clip=0",
                  "train.max_bad_steps=3", "train.sample_every=0", "train.checkpoint_every=0", "train.log_every=4")
    with pytest.raises(TrainingStopped, match="non-finite"):
        run_training(config, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the device is read at logging steps: the run stops at the first one after 3 bad steps in a row
    last = rows[-1]
    assert last["step"] % 4 == 0 and last["worst_bad_run"] >= 3 and last["bad_steps"] >= 3 and last["skipped"]
    state = torch.load(out / "checkpoints" / "latest" / "trainer.pt", weights_only=False)
    assert state["bad_steps"] == last["bad_steps"] and state["step"] == last["step"]
    # skipped steps were not taken: AdamW counted only the finite ones
    optimizer = load_file(out / "checkpoints" / "latest" / "optimizer.safetensors")
    counts = {float(value) for key, value in optimizer.items() if key.endswith(".step")}
    assert counts == {last["step"] - last["bad_steps"]}


def test_a_time_limit_stops_the_run_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    summary = run_training(tiny("train.steps=100000", "train.time_limit_minutes=0.05", "train.sample_every=0",
                                "train.checkpoint_every=0"), out, progress=False)
    assert 0 < summary["steps"] < 100000
    assert (out / "checkpoints" / f"step-{summary['steps']}").is_dir()


@pytest.mark.parametrize("arch", ["flux", "mmdit-sd3"])
def test_the_released_architectures_train_and_sample_in_a_run_of_our_own(tmp_path, arch):
    """model.arch flux / mmdit-sd3 through the token-budget batcher, checkpoints and sampling, from scratch."""
    out = tmp_path / "run"
    extra = ["model.patch_size=2"] + (["model.single_depth=1"] if arch == "flux" else ["model.sample_size=32"])
    run_training(tiny("train.steps=2", "train.checkpoint_every=2", f"model.arch={arch}", *extra), out, progress=False)
    weights = _weights(out)
    assert any(name.startswith("transformer_blocks.0.attn.add_q_proj") for name in weights)  # the reference's names
    assert main(["sample", "--checkpoint", str(out), "--prompt", "a handwritten digit three", "--num", "2",
                 "--steps", "2", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 100


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """Between fetching batches, a step converts no tensor to a Python value (on a GPU each would wait for the
    queue); metrics are read at logging steps only. The batcher and loader (host work) run unwatched."""
    trainer = Trainer(tiny("train.grad_accum=2", "train.sample_every=0"), tmp_path / "run", progress=False)
    trainer.read_metrics(trainer.train_step())  # the loader's start-up, outside the watch
    reads, watching = [], [False]
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def watched(self, *args, _name=name, _original=original, **kwargs):
            if watching[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, watched)
    fetch = trainer._next_batch

    def unwatched_fetch():
        watching[0] = False
        try:
            return fetch()
        finally:
            watching[0] = True

    monkeypatch.setattr(trainer, "_next_batch", unwatched_fetch)
    watching[0] = True
    step = trainer.train_step()
    watching[0] = False
    trainer.close()
    assert reads == []
    metrics = trainer.read_metrics(step)  # the metrics are all there, read afterwards
    assert metrics["loss"] > 0 and sum(metrics["samples_stage"]) > 0 and metrics["grad_norm"] > 0


def test_the_ema_follows_its_formula_step_by_step(tmp_path):
    """EMA_s = d_s EMA_{s-1} + (1 - d_s) W_s with d_s = decay * min(1, s / warmup) for the s-th update (from 0),
    computed in float64 from the weights after each step."""
    trainer = Trainer(tiny("train.ema_decay=0.9", "train.ema_warmup_steps=3", "train.steps=6"), tmp_path / "run",
                      progress=False)
    expected = [p.detach().double().clone() for p in trainer.params]
    try:
        for s in range(6):
            trainer.train_step()
            decay = 0.9 * min(1.0, s / 3)
            expected = [decay * e + (1 - decay) * p.detach().double() for e, p in zip(expected, trainer.params)]
    finally:
        trainer.close()
    assert any(not torch.allclose(e, p.detach().double(), atol=1e-4) for e, p in zip(expected, trainer.params))
    for e, ema in zip(expected, trainer.ema):
        torch.testing.assert_close(ema.double(), e, atol=1e-6, rtol=0)


def sharded_start(tmp_path, expected: Path, settings: list[str]) -> list[dict]:
    out = tmp_path / "start"
    command = TORCHRUN + [str(Path(__file__).with_name("torchrun_start.py")), str(out), str(expected), *TINY,
                          "train.parallel=fsdp", *settings]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "start.json").read_text())


@pytest.mark.distributed
def test_a_sharded_run_starts_from_the_stored_weights_and_a_fresh_one_as_a_single_process_would(tmp_path):
    """FSDP2 builds the model empty and fills each rank's rows: from train.init_from's file every weight (and the
    EMA) equals the stored one; a fresh model equals the single-process initialisation of the same seed."""
    from pyraflow.archs import build_model, training_model
    from pyraflow.weights import MODEL, save_model, save_tensors

    config = tiny()
    generator = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in build_model(config.model).state_dict().items()}
    save_model(config.model, state, tmp_path / "base")
    for rank in sharded_start(tmp_path / "from-file", tmp_path / "base" / MODEL, [f"train.init_from={tmp_path / 'base'}"]):
        assert rank["weights_max_diff"] == 0 and rank["ema_max_diff"] == 0 and rank["compared"] == rank["trained"] == len(state)
    torch.manual_seed(config.train.seed)
    save_tensors(training_model(config, load_base=False).state_dict(), tmp_path / "fresh.safetensors")
    for rank in sharded_start(tmp_path / "fresh", tmp_path / "fresh.safetensors", []):
        assert rank["weights_max_diff"] == 0 and rank["compared"] == len(state)


def test_fresh_adapters_of_a_sharded_run_follow_peft_and_repeat_per_tensor():
    from pyraflow.train.trainer import fresh_adapter

    name, shape = "blocks.0.visual.qkv.lora_A.default.weight", torch.Size([64, 256])
    a = fresh_adapter(name, shape, 0)
    assert torch.equal(a, fresh_adapter(name, shape, 0))  # every rank draws the same tensor
    assert not torch.equal(a, fresh_adapter(name, shape, 1)) and not torch.equal(a, fresh_adapter(name + "x", shape, 0))
    bound = 1 / 256**0.5  # Kaiming-uniform with a = sqrt(5), as peft initialises lora_A
    assert a.abs().max() <= bound and a.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)
    assert not fresh_adapter(name.replace("lora_A", "lora_B"), shape, 0).any()


def test_a_sharded_run_lets_go_of_its_model_before_it_destroys_the_process_group(tmp_path, monkeypatch):
    """FSDP's state and its module hold each other (and the group) in reference cycles; left to the interpreter's
    exit, their collection tears the group's threads down while Python finalises, which can abort a rank.
    run_training (a one-rank world in this process, as torchrun describes it) frees the model first."""
    import gc
    import socket
    import weakref

    import torch.distributed as dist

    import pyraflow.train.loop as loop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    models, alive_at_destroy = [], []

    class Recorded(loop.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            models.append(weakref.ref(self.model))

    destroy = dist.destroy_process_group
    monkeypatch.setattr(loop, "Trainer", Recorded)
    monkeypatch.setattr(dist, "destroy_process_group",
                        lambda *a, **k: (alive_at_destroy.append(models[0]() is not None), destroy(*a, **k)))
    gc.disable()  # only the collection the code asks for
    try:
        loop.run_training(tiny("train.parallel=fsdp", "train.steps=1", "train.sample_every=0"), tmp_path / "run",
                          progress=False)
    finally:
        gc.enable()
    assert len(models) == 1 and alive_at_destroy == [False] and not dist.is_initialized()
