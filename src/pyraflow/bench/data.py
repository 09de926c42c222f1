"""``pyraflow bench --data``: does training from a prepared cache keep its memory flat as the dataset grows, and
does the step wait for data?

For each dataset size a synthetic cache of 16 x 32 x 32 latents (8 text tokens of width 384 each) is written in
the format ``pyraflow prepare`` writes; the demo's model (width 256, 6 blocks, patch 4) then trains from it through
the product Trainer and loader, each size in a fresh process. Reported per size: the peak memory of the training
process and its loader workers together (proportional set size, sampled every second from /proc, so pages the
forked workers share with the trainer count once), and the share of step time spent waiting for the next batch.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

LATENT = (16, 1, 32, 32)  # what SETTINGS make config.latent_shape()
TEXT_TOKENS = 8
SETTINGS = ["latent.kind=vae", "latent.channels=16", "latent.downsample=1", "data.image_size=32",
            "model.patch_size=4", "train.sample_every=0", "train.checkpoint_every=0", "train.precision=fp32"]


def write_synthetic_cache(directory: Path, config, samples: int, text_identity: str, latent_identity: str,
                          shard_size: int = 1024) -> None:
    """A finished cache of ``samples`` random latents (config.latent_shape()) and captions (TEXT_TOKENS states of
    config.model.text_dim), as ``pyraflow prepare`` would write it."""
    from pyraflow.data.cache import cache_meta, finish_cache, manifest_row, shard_tensors, write_shard
    from pyraflow.storage import write_json

    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "meta.json", cache_meta(config.data, text_identity, latent_identity))
    shape = config.latent_shape()
    g = torch.Generator().manual_seed(0)
    for index, first in enumerate(range(0, samples, shard_size)):
        n = min(shard_size, samples - first)
        lengths = torch.full((n,), TEXT_TOKENS)
        m = config.model
        tensors = shard_tensors(torch.randn(n, *shape, generator=g), torch.randn(n, TEXT_TOKENS, m.text_dim, generator=g),
                                lengths, torch.randn(n, m.pooled_dim, generator=g), config.data.text_dtype)
        rows = [manifest_row(f"synthetic-{first + i}", shape, f"synthetic {first + i}", "synthetic", None)
                for i in range(n)]
        write_shard(directory, index, tensors, rows)
    finish_cache(directory, samples, -(-samples // shard_size), [])


class TreeMemory:
    """Peak memory (PSS: shared pages split between the processes sharing them) of this process plus its children,
    sampled in a background thread."""

    def __init__(self, interval: float = 1.0):  # one reading walks the page tables: ~30 ms for the demo model
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            return 0

    def current(self) -> int:
        me = os.getpid()
        children = set()
        for task in os.listdir(f"/proc/{me}/task"):  # every thread's children (the loader forks from the main one)
            try:
                with open(f"/proc/{me}/task/{task}/children") as f:
                    children |= {int(pid) for pid in f.read().split()}
            except OSError:
                continue
        return self._pss(me) + sum(self._pss(pid) for pid in children)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(n: int, root: str, steps: int, warmup: int, workers: int, progress: bool) -> dict:
    """One dataset size: write its cache, train from it, measure (run in a fresh process)."""
    from pyraflow.config import load_config
    from pyraflow.latents import build_latent_space
    from pyraflow.text import load_text_encoder
    from pyraflow.train import Trainer

    cache = Path(root) / f"cache-{n}"
    config = load_config(None, SETTINGS + [f"data.cache={cache}", f"data.workers={workers}"])
    started = time.perf_counter()
    write_synthetic_cache(cache, config, n, load_text_encoder(config.text).identity,
                          build_latent_space(config.latent).identity)
    written = time.perf_counter() - started
    trainer = Trainer(config, Path(root) / f"run-{n}", progress=False)
    baseline = TreeMemory().current()
    with TreeMemory() as memory:
        metrics = [trainer.read_metrics(trainer.train_step()) for _ in tqdm(range(warmup + steps), desc=f"bench data {n}", disable=not progress)]
    trainer.close()
    timed = metrics[warmup:]
    step_s = sum(m["seconds"] for m in timed)
    return {
        "cache_gb": sum(f.stat().st_size for f in cache.iterdir()) / 1e9,
        "write_s": written,
        "peak_pss_mb": memory.peak / 2**20,
        "trainer_peak_rss_mb": _peak_rss() / 2**20,
        "pss_before_steps_mb": baseline / 2**20,
        "step_ms_median": 1000 * statistics.median(m["seconds"] for m in timed),
        "data_wait_fraction": sum(m["data_wait_seconds"] for m in timed) / step_s,
        "samples_read": sum(sum(m["samples_stage"]) for m in metrics),
    }


def _peak_rss() -> int:
    """The training process's own peak resident set (VmHWM, kept by the kernel: no sampling gaps)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _measure_into(queue, *args) -> None:
    queue.put(measure(*args))


def data_benchmark(sizes: tuple[int, ...] = (2000, 50000), steps: int = 60, warmup: int = 5, workers: int = 2,
                   directory: str | Path | None = None, progress: bool = True) -> dict:
    import multiprocessing

    if not os.path.isdir("/proc"):
        raise ValueError("pyraflow bench --data reads memory from /proc, which this system lacks (Linux only).")
    result = {"latent": list(LATENT), "text_tokens": TEXT_TOKENS, "workers": workers, "steps": steps, "warmup": warmup,
              "model": "the MNIST demo's (width 256, 6 blocks, patch 4)", "memory": "PSS of trainer + loader workers",
              "sizes": {}}
    context = multiprocessing.get_context("spawn")  # each size in a fresh process: nothing carried over
    with tempfile.TemporaryDirectory(dir=directory) as root:
        for n in sizes:
            queue = context.Queue()
            process = context.Process(target=_measure_into, args=(queue, n, root, steps, warmup, workers, progress))
            process.start()
            result["sizes"][str(n)] = queue.get()
            process.join()
            shutil.rmtree(Path(root) / f"cache-{n}")
    first, last = (result["sizes"][str(n)] for n in (sizes[0], sizes[-1]))
    result["peak_pss_difference_mb"] = last["peak_pss_mb"] - first["peak_pss_mb"]
    result["trainer_peak_rss_difference_mb"] = last["trainer_peak_rss_mb"] - first["trainer_peak_rss_mb"]
    return result


def format_data(result: dict) -> str:
    lines = [f"training from prepared caches ({'x'.join(map(str, result['latent']))} latents, {result['workers']} loader "
             f"workers, {result['steps']} timed steps):"]
    for n, r in result["sizes"].items():
        lines.append(f"  {int(n):>7,} samples ({r['cache_gb']:.2f} GB): peak memory (PSS, trainer + workers) "
                     f"{r['peak_pss_mb']:.0f} MB, trainer's peak RSS {r['trainer_peak_rss_mb']:.0f} MB, "
                     f"step {r['step_ms_median']:.0f} ms, waiting for data {100 * r['data_wait_fraction']:.1f}% of the step")
    lines.append(f"  difference: PSS {result['peak_pss_difference_mb']:+.0f} MB, "
                 f"trainer's peak RSS {result['trainer_peak_rss_difference_mb']:+.0f} MB")
    return "\n".join(lines)
