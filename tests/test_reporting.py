"""metrics.jsonl: appended while training, cut back to the checkpoint on resume, and never lost to a crash."""

import json
import signal
import subprocess
import sys

from pyraflow.reporting import MetricsLog, load_metrics

KILL_DURING_REWRITE = """
import os, pathlib, signal, sys
from pyraflow import reporting

real_write = pathlib.Path.write_text

def half_then_kill(self, text, *args, **kwargs):  # the process dies half-way through writing the new history
    real_write(self, text[: len(text) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

pathlib.Path.write_text = half_then_kill
reporting.MetricsLog(pathlib.Path(sys.argv[1]), resume_step=int(sys.argv[2]))
"""


def history(steps: int) -> list[dict]:
    return [{"step": s, "loss": 1.0 / s} for s in range(1, steps + 1)]


def test_a_resume_drops_the_rows_past_its_checkpoint_and_appends(tmp_path):
    log = MetricsLog(tmp_path)
    for row in history(30):
        log.log(row)
    log.close()
    log = MetricsLog(tmp_path, resume_step=20)
    log.log({"step": 21, "loss": 0.5})
    log.close()
    assert load_metrics(tmp_path / "metrics.jsonl") == history(20) + [{"step": 21, "loss": 0.5}]


def test_a_kill_during_the_resume_rewrite_loses_no_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in history(2000)))
    before = path.read_text()
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_REWRITE, str(tmp_path), "1000"], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert path.read_text() == before  # the whole history, as it was before the resume began
    log = MetricsLog(tmp_path, resume_step=1000)  # the resume run again after the crash
    log.close()
    assert load_metrics(path) == history(1000)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["metrics.jsonl"]
