"""Every backend equals attention computed segment by segment (the oracle in helpers), with and without temporal
causality, forward and backward."""

import pytest
import torch

from pyraflow.packing import Sample, pack
from helpers import CHANNELS, POOLED_DIM, TEXT_DIM, backend_attention, per_segment_attention, random_samples

HEADS, HEAD_DIM = 2, 8
# fp32 sums in another order differ by ~1e-6 between CPUs; a wrong mask or a leaked segment moves outputs by
# ~1e-1, so these bounds still catch every real error.
FORWARD_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
BACKENDS = ["grouped", "flash"]  # flex has no CPU backward: its forward is checked below


def split(layout, q, k, v):
    nt = layout.num_text
    return (q[:nt], k[:nt], v[:nt]), (q[nt:], k[nt:], v[nt:])


def run(q, k, v, layout, attention):
    """A backend on stream-ordered q/k/v (text tokens first), output in the same order."""
    out_text, out_visual = attention(*split(layout, q, k, v))
    return torch.cat([out_text, out_visual])


def qkv(layout, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    n = layout.num_text + layout.num_visual
    return [torch.randn(n, HEADS, HEAD_DIM, generator=g, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_backend_equals_per_segment_attention_forward_and_backward(backend, causal, seed):
    layout = pack(random_samples(seed, count=8, frames=(1, 3)), num_stages=3).layout
    q, k, v = qkv(layout, seed, requires_grad=True)
    out = run(q, k, v, layout, backend_attention(backend, layout, causal))
    expected = per_segment_attention(q, k, v, layout, causal)
    torch.testing.assert_close(out, expected, **FORWARD_TOL)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * w).sum(), (q, k, v))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, **GRAD_TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_flex_forward_on_cpu(causal):
    layout = pack(random_samples(3, count=6, frames=(1, 2)), num_stages=3).layout
    flex = backend_attention("flex", layout, causal)
    q, k, v = qkv(layout, 3)
    with torch.no_grad():
        torch.testing.assert_close(run(q, k, v, layout, flex), per_segment_attention(q, k, v, layout, causal),
                                   **FORWARD_TOL)
    with pytest.raises(ValueError, match="no backward on CPU"):
        run(*qkv(layout, 3, requires_grad=True), layout, flex)


@pytest.mark.parametrize("backend", BACKENDS + ["flex"])
def test_causal_mask_blocks_later_frames(backend):
    layout = pack(random_samples(4, count=3, frames=(4,)), num_stages=3).layout
    q, k, v = qkv(layout, 4)
    nt = layout.num_text
    later = nt + (layout.causal_index == 3).nonzero().flatten()  # visual tokens of the last frame
    earlier = torch.cat([torch.arange(nt), nt + (layout.causal_index < 3).nonzero().flatten()])
    k2, v2 = k.clone(), v.clone()
    k2[later] += 5.0
    v2[later] += 5.0
    for causal, unchanged in ((True, True), (False, False)):
        attention = backend_attention(backend, layout, causal)
        with torch.no_grad():
            a = run(q, k, v, layout, attention)[earlier]
            b = run(q, k2, v2, layout, attention)[earlier]
        assert torch.equal(a, b) == unchanged


def _clip(seed, unit, frames=3, side=8, stage=1, text_length=5):
    g = torch.Generator().manual_seed(seed)
    return Sample(stage, torch.randn(CHANNELS, frames, side, side, generator=g), torch.randn(text_length, TEXT_DIM, generator=g),
                  torch.randn(POOLED_DIM, generator=g), 300.0, unit=unit)


@pytest.mark.parametrize("backend", BACKENDS + ["flex"])
def test_clips_of_one_shape_with_other_causal_structure_are_attended_each_by_its_own_mask(backend):
    """A clip whose frames are each a causal step (unit None) and a clip that is one causal unit (unit 3) have the
    same shape; packed together, each must still equal attention over it alone."""
    samples = [_clip(0, None), _clip(1, 3), _clip(2, None, text_length=4), _clip(3, 3, text_length=4)]
    layout = pack(samples, num_stages=3).layout
    assert len(layout.groups) == 2  # the causal structure separates the groups
    q, k, v = qkv(layout, 9)
    with torch.no_grad():
        out = run(q, k, v, layout, backend_attention(backend, layout, True))
    torch.testing.assert_close(out, per_segment_attention(q, k, v, layout, True), **FORWARD_TOL)
