"""Sampling: the pyramidal sampler (stages, jumps, guidance, video units) and the Pipeline of a trained run or a
released Pyramid Flow folder."""

from pyraflow.sample.loading import load_pipeline
from pyraflow.sample.pipeline import Pipeline, default_device
from pyraflow.sample.sampler import denoise_cascade, model_device, sample_pyramid, sample_video

__all__ = ["Pipeline", "default_device", "denoise_cascade", "load_pipeline", "model_device", "sample_pyramid",
           "sample_video"]
