"""Layouts pyraflow is compared against, kept only for ``pyraflow bench``: they compute what the product
computes, the way other implementations do, on pyraflow's own kernels.

  DenseMaskAttention   one SDPA over the whole packed sequence with a dense N x N block-diagonal mask.
  RowAttention         the reference's rows: R alike rows of consecutive segments (e.g. [1, 2, 1] columns),
                       each row's [text; visual] concatenated in place, one dense mask per row.
  per_token_modulation adaLN vectors gathered to every token (as the reference does) instead of broadcast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyraflow.attention import QKV, JointOrder, joint_order
from pyraflow.archs.base import Context, RunBroadcast
from pyraflow.packing import Layout


class DenseMaskAttention:
    """SDPA over the joint sequence with a dense (N, N) boolean mask: same segment (and causal step)."""

    def __init__(self, layout: Layout, causal: bool, device: torch.device):
        self.order = JointOrder(layout, device)
        _, segment, step = joint_order(layout)
        mask = segment[:, None] == segment[None, :]
        if causal:
            mask &= step[None, :] <= step[:, None]
        self.mask = mask.to(device)

    def __call__(self, text: QKV, visual: QKV) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in self.order.gather(text, visual))  # (1, H, N, Dh)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)[0].transpose(0, 1)
        return self.order.scatter(o)


class RowAttention:
    """The packed segments, in their order, form ``rows`` alike rows (pack with ``keep_order=True``). As in the
    reference, each row's text and visual tokens are concatenated in place (no gather) and attend under one
    dense block-diagonal mask per row (every row has row 0's block structure)."""

    def __init__(self, layout: Layout, rows: int, device: torch.device):
        n_seg = layout.num_segments
        if rows < 1 or n_seg % rows:
            raise ValueError(f"{n_seg} segments do not split into {rows} rows of equal segment counts.")
        per_row = n_seg // rows
        lengths = [(layout.text_lengths[b], layout.visual_lengths[b]) for b in range(n_seg)]
        for r in range(1, rows):
            if lengths[r * per_row : (r + 1) * per_row] != lengths[:per_row]:
                raise ValueError(f"row {r} has other segment lengths than row 0; rows must be alike.")
        segment = torch.cat([torch.full((t,), b) for b, (t, _) in enumerate(lengths[:per_row])]
                            + [torch.full((v,), b) for b, (_, v) in enumerate(lengths[:per_row])])
        self.rows = rows
        self.mask = (segment[:, None] == segment[None, :]).to(device)

    def __call__(self, text: QKV, visual: QKV) -> tuple[torch.Tensor, torch.Tensor]:
        heads, dim = visual[0].shape[1:]
        row_text = text[0].shape[0] // self.rows
        q, k, v = (torch.cat([t.view(self.rows, -1, heads, dim), x.view(self.rows, -1, heads, dim)], dim=1).transpose(1, 2)
                   for t, x in zip(text, visual))  # (R, H, L, Dh)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask).transpose(1, 2)  # (R, L, H, Dh)
        out_text, out_visual = o.split([row_text, o.shape[1] - row_text], dim=1)
        return out_text.reshape(-1, heads, dim), out_visual.reshape(-1, heads, dim)


def per_token_modulation(context: Context, device: torch.device) -> Context:
    """The context with adaLN vectors gathered to every token (no broadcast over groups)."""
    context.visual = RunBroadcast(context.layout.run_lengths, device, max_blocks=0)
    context.text = RunBroadcast(context.layout.text_lengths, device, max_blocks=0)
    return context
