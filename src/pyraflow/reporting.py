"""What a run leaves for people to read and look at: metrics.jsonl, TensorBoard events, a loss plot."""

from __future__ import annotations

import json
from pathlib import Path

from pyraflow.storage import atomic_path, write_text


class MetricsLog:
    """One JSON object per logged step in metrics.jsonl, mirrored to TensorBoard scalars."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        if resume_step and self.path.is_file():  # drop lines past the checkpoint we resumed from
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            # rewritten through a temporary file: a crash during the rewrite leaves the history as it was
            write_text(self.path, "".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)

    def log(self, metrics: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        step = metrics["step"]
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        self.writer.close()


def load_metrics(metrics_path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, in order."""
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    """Loss per stage and overall against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_metrics(metrics_path)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("loss_stage")})
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        steps, values = zip(*points)
        ax.plot(steps, _smooth(values), label=key.replace("loss_", ""), linewidth=2 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE (smoothed)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _smooth(values, weight: float = 0.9) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out
