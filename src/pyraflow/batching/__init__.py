"""Stage mixes, token-budget batches and the example classes they choose between."""

from pyraflow.batching.budget import ClassBatch, TokenBudgetBatcher
from pyraflow.batching.classes import ClassMix, ExampleClasses, example_classes, segment_tokens, unit_probabilities
from pyraflow.batching.mix import AdaptiveMix, MixSchedule, build_mix, ratio_array

__all__ = ["AdaptiveMix", "ClassBatch", "ClassMix", "ExampleClasses", "MixSchedule", "TokenBudgetBatcher",
           "build_mix", "example_classes", "ratio_array", "segment_tokens", "unit_probabilities"]
