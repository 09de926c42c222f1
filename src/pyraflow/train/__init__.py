"""Training: the objective, the Trainer (one optimizer step, EMA, state), the loop around it, checkpoints and
data parallelism."""

from pyraflow.train.loop import run_training, sample_prompts, train
from pyraflow.train.trainer import Trainer, TrainingStopped

__all__ = ["Trainer", "TrainingStopped", "run_training", "sample_prompts", "train"]
