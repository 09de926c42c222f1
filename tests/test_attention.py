"""Every backend equals attention computed segment by segment, with and without temporal causality."""

import pytest
import torch
import torch.nn.functional as F

from pyraflow.attention import attend, build_plan
from pyraflow.packing import pack
from helpers import random_samples

HEADS, HEAD_DIM = 2, 8
# fp32 sums in a different order differ by ~1e-6 between CPUs (CI saw 1.7e-6 on one gradient entry); a wrong
# mask or a leaked segment moves outputs by ~1e-1, so these bounds still catch every real error.
FORWARD_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def split(layout, q, k, v):
    nt = layout.num_text
    return (q[:nt], k[:nt], v[:nt]), (q[nt:], k[nt:], v[nt:])


def run(q, k, v, layout, plan):
    """attend() on stream-ordered q/k/v (text tokens first), output in the same order."""
    out_text, out_visual = attend(*split(layout, q, k, v), plan, varlen_fn=reference_varlen)
    return torch.cat([out_text, out_visual])


def qkv(layout, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    n = layout.num_text + layout.num_visual
    return [torch.randn(n, HEADS, HEAD_DIM, generator=g, requires_grad=requires_grad) for _ in range(3)]


def per_segment(q, k, v, layout, causal):
    """Independent computation: gather each segment's [text; visual] tokens and attend alone."""
    out = torch.empty_like(q)
    nt = layout.num_text
    for b in range(layout.num_segments):
        idx = torch.cat([torch.arange(layout.text_offsets[b], layout.text_offsets[b + 1]),
                         nt + torch.arange(layout.visual_offsets[b], layout.visual_offsets[b + 1])])
        mask = None
        if causal:
            text_len = layout.text_offsets[b + 1] - layout.text_offsets[b]
            frame = torch.cat([torch.full((text_len,), -1),
                               layout.frame[layout.visual_offsets[b]:layout.visual_offsets[b + 1]]])
            mask = frame[None, :] <= frame[:, None]
        o = F.scaled_dot_product_attention(*(x[idx].transpose(0, 1) for x in (q, k, v)), attn_mask=mask)
        out[idx] = o.transpose(0, 1)
    return out


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """flash-attn's varlen contract, in plain torch: sequence i is q[cu_q[i]:cu_q[i+1]] against k[cu_k[i]:cu_k[i+1]]."""
    out = []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        out.append(F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1)).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["reference", "grouped", "flash"])
@pytest.mark.parametrize("seed", [0, 1])
def test_backend_equals_per_segment_attention_forward_and_backward(backend, causal, seed):
    layout = pack(random_samples(seed, count=8, frames=(1, 3)), num_stages=3).layout
    plan = build_plan(layout, backend, causal, torch.device("cpu"))
    q, k, v = qkv(layout, seed, requires_grad=True)
    out = run(q, k, v, layout, plan)
    expected = per_segment(q, k, v, layout, causal)
    torch.testing.assert_close(out, expected, **FORWARD_TOL)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * w).sum(), (q, k, v))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, **GRAD_TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_flex_forward_on_cpu(causal):
    layout = pack(random_samples(3, count=6, frames=(1, 2)), num_stages=3).layout
    plan = build_plan(layout, "flex", causal, torch.device("cpu"))
    q, k, v = qkv(layout, 3)
    with torch.no_grad():
        torch.testing.assert_close(run(q, k, v, layout, plan), per_segment(q, k, v, layout, causal), **FORWARD_TOL)
    with pytest.raises(ValueError, match="no backward on CPU"):
        run(*qkv(layout, 3, requires_grad=True), layout, plan)


@pytest.mark.parametrize("backend", ["reference", "grouped", "flash"])
def test_causal_mask_blocks_later_frames(backend):
    layout = pack(random_samples(4, count=3, frames=(4,)), num_stages=3).layout
    q, k, v = qkv(layout, 4)
    nt = layout.num_text
    later = nt + (layout.frame == 3).nonzero().flatten()  # visual tokens of the last frame
    earlier = torch.cat([torch.arange(nt), nt + (layout.frame < 3).nonzero().flatten()])
    k2, v2 = k.clone(), v.clone()
    k2[later] += 5.0
    v2[later] += 5.0
    for causal, unchanged in ((True, True), (False, False)):
        plan = build_plan(layout, backend, causal, torch.device("cpu"))
        a = run(q, k, v, layout, plan)[earlier]
        b = run(q, k2, v2, layout, plan)[earlier]
        assert torch.equal(a, b) == unchanged


def test_row_plan_of_the_reference_layout_equals_per_segment_attention():
    from pyraflow.attention import build_row_plan
    from pyraflow.packing import Sample

    g = torch.Generator().manual_seed(7)
    samples = [Sample(stage, torch.randn(3, 1, side, side, generator=g), torch.randn(5, 24, generator=g),
                      torch.randn(12, generator=g), 100.0)
               for _ in range(2) for stage, side in ((0, 4), (1, 8), (1, 8), (2, 16))]
    layout = pack(samples, num_stages=3, keep_order=True).layout  # two rows of [low, mid, mid, high]
    assert layout.order == list(range(8)) and len(layout.groups) == 6  # runs of equal consecutive segments
    plan = build_row_plan(layout, 2, torch.device("cpu"))
    q, k, v = qkv(layout, 7, requires_grad=True)
    out, expected = run(q, k, v, layout, plan), per_segment(q, k, v, layout, False)
    torch.testing.assert_close(out, expected, **FORWARD_TOL)
    w = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((expected * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, **GRAD_TOL)
    with pytest.raises(ValueError, match="rows must be alike"):
        build_row_plan(pack(samples[:4] + samples[4:][::-1], num_stages=3, keep_order=True).layout, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="do not split"):
        build_row_plan(layout, 3, torch.device("cpu"))
