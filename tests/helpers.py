"""Small builders shared by the model-side tests."""

import torch

from pyraflow.model import ModelConfig, MultiStageMMDiT
from pyraflow.packing import Sample

TEXT_DIM, POOLED_DIM, CHANNELS = 24, 12, 3


def tiny_config(**overrides) -> ModelConfig:
    base = dict(in_channels=CHANNELS, patch_size=2, width=48, depth=3, num_heads=2, text_dim=TEXT_DIM,
                pooled_dim=POOLED_DIM)
    return ModelConfig(**{**base, **overrides})


def randomised_model(seed: int = 0, **overrides) -> MultiStageMMDiT:
    """A tiny model with every weight random (the real init zeroes gates, which would hide bugs)."""
    torch.manual_seed(seed)
    model = MultiStageMMDiT(tiny_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model


def random_samples(seed: int, count: int = 7, num_stages: int = 3, frames=(1,), per_frame=False) -> list[Sample]:
    """Random stages, text lengths and timesteps; latent side 4 * 2**stage."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        stage = int(torch.randint(0, num_stages, (1,), generator=g))
        side = 4 * 2**stage
        t = frames[int(torch.randint(0, len(frames), (1,), generator=g))]
        length = int(torch.randint(1, 9, (1,), generator=g))
        timestep = torch.rand(t if per_frame else (), generator=g) * 1000
        samples.append(Sample(stage, torch.randn(CHANNELS, t, side, side, generator=g),
                              torch.randn(length, TEXT_DIM, generator=g), torch.randn(POOLED_DIM, generator=g), timestep))
    return samples
