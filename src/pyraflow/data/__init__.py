"""Data: datasets of captioned images and clips, their encoding into latents and text states, and the cache
``pyraflow prepare`` writes."""

from pyraflow.data.cache import load_cache, prepare
from pyraflow.data.datasets import RawSample, caption_for_digit, check_bad_files, fit_image, iterate_samples, read_image
from pyraflow.data.sources import build_dataset, planned_size, resolve_buckets
from pyraflow.data.encoded import EncodedData, encode_dataset, encode_samples

__all__ = ["EncodedData", "RawSample", "build_dataset", "caption_for_digit", "check_bad_files", "encode_dataset",
           "encode_samples", "fit_image", "iterate_samples", "load_cache", "planned_size", "prepare", "read_image", "resolve_buckets"]
