"""Small builders and oracles shared by the tests."""

import numpy as np
import torch
import torch.nn.functional as F

from pyraflow.config import ModelConfig
from pyraflow.model import MultiStageMMDiT
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


def make_images(folder, n=5, size=(40, 30)):
    """``n`` random RGB PNGs of ``size`` (width, height) in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


# ----- attention oracles: written from the definition, not from the backends ------------------------------

def per_segment_attention(q, k, v, layout, causal):
    """Stream-ordered q/k/v (text tokens first, then visual): gather each segment's [text; visual] tokens and
    attend alone (with a causal mask from the layout's causal steps); output in the same order."""
    out = torch.empty_like(q)
    nt = layout.num_text
    for b in range(layout.num_segments):
        idx = torch.cat([torch.arange(layout.text_offsets[b], layout.text_offsets[b + 1]),
                         nt + torch.arange(layout.visual_offsets[b], layout.visual_offsets[b + 1])])
        mask = None
        if causal:
            text_len = layout.text_offsets[b + 1] - layout.text_offsets[b]
            step = torch.cat([torch.full((text_len,), -1),
                              layout.causal_index[layout.visual_offsets[b]:layout.visual_offsets[b + 1]]])
            mask = step[None, :] <= step[:, None]
        o = F.scaled_dot_product_attention(*(x[idx].transpose(0, 1) for x in (q, k, v)), attn_mask=mask)
        out[idx] = o.transpose(0, 1)
    return out


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """flash-attn's varlen contract in plain torch: sequence i is q[cu_q[i]:cu_q[i+1]] against k[cu_k[i]:cu_k[i+1]]."""
    out = []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        out.append(F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1)).transpose(0, 1))
    return torch.cat(out)


def backend_attention(backend, layout, causal, device=torch.device("cpu")):
    """A product backend for ``layout``; flash runs through ``reference_varlen`` off-GPU."""
    from pyraflow.attention import build_attention

    return build_attention(layout, backend, causal, device, varlen_kernel=reference_varlen)
