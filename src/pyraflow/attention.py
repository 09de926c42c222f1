"""Joint attention over packed segments, behind one interface with several backends.

Every backend takes queries, keys and values of the text stream (all segments' text tokens, in
segment order) and of the visual stream, each (N, heads, head_dim), plus an AttentionPlan built once
per batch from the packing Layout, and returns the two streams' outputs.
Attention is joint (text + visual) inside a segment and never crosses segments.

Backends:
  reference  SDPA over the whole sequence with a dense block-diagonal boolean mask (simple, O(N^2) mask).
  grouped    segments with the same visual shape batched as (G, heads, L, head_dim), built from
             contiguous views (no gathers); different text lengths are padded and masked per key.
             No dense N x N mask. The default on CPU.
  flex       FlexAttention with a document mask (compiled on CUDA; eager on CPU, forward and backward).
  flash      flash-attn's varlen kernel over cu_seqlens (CUDA, fp16/bf16, when flash-attn is installed).

Temporal-causal masking (optional, all backends): a visual token of frame f sees its segment's text and
frames <= f; text sees only text. Text therefore carries no information from later frames to earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from pyraflow.packing import Layout

BACKENDS = ("auto", "reference", "grouped", "flex", "flash")


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Pick the fastest backend that works on this device (``auto``), or check a forced one."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; use one of {', '.join(BACKENDS)}.")
    if name == "auto":
        if device.type == "cuda":
            return "flash" if flash_available() and dtype in (torch.float16, torch.bfloat16) else "flex"
        return "grouped"
    if name == "flash" and not flash_available():
        raise ValueError("attention backend 'flash' needs CUDA and the flash-attn package; use 'auto' instead.")
    return name


@dataclass
class AttentionPlan:
    """Index tensors for one batch and one backend; built once, used by every block."""

    backend: str
    causal: bool
    num_tokens: int
    joint: torch.Tensor | None = None  # (N,) stream index of each joint-order token
    joint_inverse: torch.Tensor | None = None  # (N,) joint position of each stream token
    dense_mask: torch.Tensor | None = None  # reference: (N, N) bool
    groups: list["GroupSlices"] = field(default_factory=list)  # grouped
    text_sizes: list[int] = field(default_factory=list)  # grouped: text tokens per group
    visual_sizes: list[int] = field(default_factory=list)  # grouped: visual tokens per group
    block_mask: object | None = None  # flex
    flash: dict | None = None  # flash: cu_seqlens and, for causal, the query-chunk/key-prefix layout
    rows: int | None = None  # reference's row layout: R rows of consecutive segments, each [text; visual]


def _joint_order(layout: Layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stream indices in joint order ([text_b; visual_b] per segment), segment id and frame per joint token."""
    nt = layout.num_text
    pieces, segment, frame = [], [], []
    for b in range(layout.num_segments):
        t0, t1 = layout.text_offsets[b], layout.text_offsets[b + 1]
        v0, v1 = layout.visual_offsets[b], layout.visual_offsets[b + 1]
        pieces += [torch.arange(t0, t1), torch.arange(nt + v0, nt + v1)]
        segment.append(torch.full((t1 - t0 + v1 - v0,), b))
        frame += [torch.full((t1 - t0,), -1), layout.frame[v0:v1]]
    return torch.cat(pieces).to(device), torch.cat(segment).to(device), torch.cat(frame).to(device)


def build_plan(layout: Layout, backend: str, causal: bool, device: torch.device) -> AttentionPlan:
    n = layout.num_text + layout.num_visual
    plan = AttentionPlan(backend=backend, causal=causal, num_tokens=n)
    if backend == "grouped":
        _build_grouped(plan, layout, device)
        return plan
    joint, segment, frame = _joint_order(layout, device)
    plan.joint = joint
    plan.joint_inverse = torch.empty_like(joint)
    plan.joint_inverse[joint] = torch.arange(n, device=device)
    if backend == "reference":
        mask = segment[:, None] == segment[None, :]
        if causal:
            mask &= frame[None, :] <= frame[:, None]
        plan.dense_mask = mask
    elif backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def document(b, h, q, k):
            same = segment[q] == segment[k]
            return same & (frame[k] <= frame[q]) if causal else same

        plan.block_mask = create_block_mask(document, None, None, n, n, device=str(device))
    elif backend == "flash":
        plan.flash = _flash_layout(layout, segment, frame, causal, device)
    else:
        raise ValueError(f"unknown attention backend {backend!r}.")
    return plan


@dataclass
class GroupSlices:
    """One group of the grouped backend: G segments, contiguous in both streams, same visual length."""

    text: tuple[int, int]  # slice of the text stream
    visual: tuple[int, int]  # slice of the visual stream
    count: int  # G
    text_lengths: list[int]
    mask: torch.Tensor | None  # None, (G, 1, 1, L) key padding, or (G, 1, L, L) causal

    @property
    def text_max(self) -> int:
        return max(self.text_lengths)

    @property
    def padded(self) -> bool:
        return min(self.text_lengths) != self.text_max


def build_row_plan(layout: Layout, rows: int, device: torch.device) -> AttentionPlan:
    """The reference implementation's layout, for comparison: the packed segments, in their order, form
    ``rows`` alike rows (e.g. one low, two mid, one high stage each; pack with ``keep_order=True``). As in the
    reference, each row's text and visual tokens are concatenated in place (no gather) and attend under one
    dense block-diagonal mask per row."""
    n_seg = layout.num_segments
    if rows < 1 or n_seg % rows:
        raise ValueError(f"{n_seg} segments do not split into {rows} rows of equal segment counts.")
    per_row = n_seg // rows
    lengths = [(layout.text_lengths[b], layout.visual_lengths[b]) for b in range(n_seg)]
    for r in range(1, rows):
        if lengths[r * per_row : (r + 1) * per_row] != lengths[:per_row]:
            raise ValueError(f"row {r} has other segment lengths than row 0; rows must be alike.")
    # every row has row 0's block structure: its texts, then its visual tokens
    segment = torch.cat([torch.full((t,), b) for b, (t, _) in enumerate(lengths[:per_row])]
                        + [torch.full((v,), b) for b, (_, v) in enumerate(lengths[:per_row])])
    plan = AttentionPlan(backend="reference", causal=False, num_tokens=layout.num_text + layout.num_visual, rows=rows)
    plan.dense_mask = (segment[:, None] == segment[None, :]).to(device)
    return plan


def _valid_keys(text_lengths: list[int], others: int) -> torch.Tensor:
    """(G, Lt + others) bool: each segment's text padded to the group's longest text Lt, then ``others``
    tokens that are all real."""
    lt = max(text_lengths)
    valid = torch.arange(lt + others)[None, :] < torch.tensor(text_lengths)[:, None]
    valid[:, lt:] = True
    return valid


def _text_batch(text: torch.Tensor, text_lengths: list[int], padded: bool) -> torch.Tensor:
    """A group's text tokens (sum of lengths, H, Dh) -> (G, Lt, H, Dh), zero-padded where lengths differ."""
    if padded:
        return torch.nn.utils.rnn.pad_sequence(text.split(text_lengths), batch_first=True)
    return text.view(len(text_lengths), -1, *text.shape[1:])


def _build_grouped(plan: AttentionPlan, layout: Layout, device: torch.device) -> None:
    for group in layout.groups:
        first, last = group.segments.start, group.segments.stop
        text_lengths = layout.text_lengths[first:last]
        count, lt, lv = len(text_lengths), max(text_lengths), group.visual_length
        valid = _valid_keys(text_lengths, lv)
        if plan.causal:
            v0 = layout.visual_offsets[first]
            frame = torch.cat([torch.full((lt,), -1), layout.frame[v0 : v0 + lv]])
            mask = (valid[:, None, :] & (frame[None, :] <= frame[:, None])[None]).unsqueeze(1)  # (G, 1, L, L)
        elif min(text_lengths) == lt:
            mask = None
        else:
            mask = valid[:, None, None, :]
        plan.groups.append(
            GroupSlices(
                text=(layout.text_offsets[first], layout.text_offsets[last]),
                visual=(group.visual_start, group.visual_start + count * lv),
                count=count,
                text_lengths=text_lengths,
                mask=None if mask is None else mask.to(device),
            )
        )
    plan.text_sizes = [g.text[1] - g.text[0] for g in plan.groups]
    plan.visual_sizes = [g.visual[1] - g.visual[0] for g in plan.groups]


def _grouped(text: tuple[torch.Tensor, ...], visual: tuple[torch.Tensor, ...], plan: AttentionPlan):
    """Each group as one (G, heads, L, head_dim) SDPA call, built from contiguous views and one cat."""
    heads, dim = visual[0].shape[1:]
    # split (not slicing): its backward is one cat instead of a zero-filled copy per group
    text_parts = [t.split(plan.text_sizes) for t in text]
    visual_parts = [v.split(plan.visual_sizes) for v in visual]
    text_out, visual_out = [], []
    for i, g in enumerate(plan.groups):
        joint = []
        for t, v in zip(text_parts, visual_parts):
            t_part = _text_batch(t[i], g.text_lengths, g.padded)
            joint.append(torch.cat([t_part, v[i].view(g.count, -1, heads, dim)], dim=1).transpose(1, 2))
        o = F.scaled_dot_product_attention(*joint, attn_mask=g.mask).transpose(1, 2)  # (G, L, H, Dh)
        visual_out.append(o[:, g.text_max :].reshape(-1, heads, dim))
        if g.padded:
            text_out += [o[j, :n] for j, n in enumerate(g.text_lengths)]
        else:
            text_out.append(o[:, : g.text_max].reshape(-1, heads, dim))
    return torch.cat(text_out), torch.cat(visual_out)


@dataclass
class PrefixGroup:
    """Segments of one group whose text and history keys/values come from a PrefixCache."""

    text: tuple[int, int]  # slice of the cached text stream
    history: tuple[int, int]  # slice of the cached history (visual) stream
    visual: tuple[int, int]  # slice of the predicted tokens
    count: int
    text_lengths: list[int]
    mask: torch.Tensor | None  # (G, 1, 1, L) key padding where text lengths differ


@dataclass
class PrefixPlan:
    """Attention of predicted video-unit tokens over [text; history; own unit] with text and history cached."""

    groups: list[PrefixGroup]


def build_prefix_plan(layout: Layout, prefix: Layout, device: torch.device) -> PrefixPlan:
    """Match each group of ``layout`` (the unit being denoised) with its segments in the cached ``prefix``.

    The predicted tokens of a unit all share one causal index above every history unit, so they see all
    of the prefix and all of their own unit: no mask beyond text padding.
    """
    if layout.order != prefix.order or layout.text_lengths != prefix.text_lengths:
        raise ValueError("the prefix cache was built for other segments (order or text differs); build it from "
                         "the same samples, in the same order, as the unit being denoised.")
    if any(layout.history_lengths):
        raise ValueError("with a prefix cache, pack only the predicted latents (no history parts).")
    groups = []
    for group in layout.groups:
        first, last = group.segments.start, group.segments.stop
        history = {prefix.visual_lengths[b] for b in range(first, last)}
        if len(history) != 1:
            raise ValueError("segments of one group have histories of different lengths; give them equal histories.")
        text_lengths = layout.text_lengths[first:last]
        lt, lh, lv = max(text_lengths), history.pop(), group.visual_length
        mask = None if min(text_lengths) == lt else _valid_keys(text_lengths, lh + lv)[:, None, None, :].to(device)
        groups.append(PrefixGroup(
            text=(layout.text_offsets[first], layout.text_offsets[last]),
            history=(prefix.visual_offsets[first], prefix.visual_offsets[last]),
            visual=(group.visual_start, group.visual_start + len(text_lengths) * lv),
            count=len(text_lengths), text_lengths=text_lengths, mask=mask,
        ))
    return PrefixPlan(groups)


def attend_prefixed(visual: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                    plan: PrefixPlan) -> torch.Tensor:
    """Predicted tokens (N, heads, head_dim) attend to cached (k_text, v_text, k_history, v_history) and themselves."""
    q, k, v = visual
    k_text, v_text, k_hist, v_hist = cached
    heads, dim = q.shape[1:]
    out = []
    for g in plan.groups:
        def view(x, span):
            return x[span[0] : span[1]].reshape(g.count, -1, heads, dim)

        def text_part(x):
            return _text_batch(x[g.text[0] : g.text[1]], g.text_lengths, g.mask is not None)

        keys = torch.cat([text_part(k_text), view(k_hist, g.history), view(k, g.visual)], dim=1).transpose(1, 2)
        values = torch.cat([text_part(v_text), view(v_hist, g.history), view(v, g.visual)], dim=1).transpose(1, 2)
        o = F.scaled_dot_product_attention(view(q, g.visual).transpose(1, 2), keys, values, attn_mask=g.mask)
        out.append(o.transpose(1, 2).reshape(-1, heads, dim))
    return torch.cat(out)


def _flash_layout(layout: Layout, segment: torch.Tensor, frame: torch.Tensor, causal: bool, device: torch.device) -> dict:
    """cu_seqlens for flash-attn varlen. Temporal-causal attention is expressed without a mask: each
    segment is split into query chunks (its text, then each frame) and every chunk attends to a prefix
    of its segment (text + frames up to its own), gathered as its own key sequence."""
    cu = layout.cu_seqlens().to(device)
    lengths = (cu[1:] - cu[:-1]).tolist()
    if not causal:
        return {"cu_q": cu, "cu_k": cu, "max_q": max(lengths), "max_k": max(lengths), "key_index": None}
    q_lengths, k_index = [], []
    for b in range(layout.num_segments):
        start = int(cu[b])
        seg_frames = frame[start : start + lengths[b]]
        ids = torch.unique_consecutive(seg_frames)
        for f in ids.tolist():
            members = (seg_frames == f).nonzero().flatten()
            q_lengths.append(members.numel())
            prefix_end = int(members[-1]) + 1
            k_index.append(torch.arange(start, start + prefix_end, device=device))
    k_lengths = [k.numel() for k in k_index]
    cu_q = F.pad(torch.tensor(q_lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(torch.tensor(k_lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)
    return {"cu_q": cu_q, "cu_k": cu_k, "max_q": max(q_lengths), "max_k": max(k_lengths), "key_index": torch.cat(k_index)}


_compiled_flex: Callable | None = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    if torch.is_grad_enabled() and q.requires_grad:
        raise ValueError(
            "attention backend 'flex' has no backward on CPU; train on CPU with 'grouped' (or 'auto'), "
            "and keep 'flex' for CUDA training or CPU inference."
        )
    import warnings

    with warnings.catch_warnings():  # eager on CPU is for checking, not speed
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=block_mask)


def _rows(text: tuple[torch.Tensor, ...], visual: tuple[torch.Tensor, ...], plan: AttentionPlan):
    """The reference's row layout: per row [text; visual] concatenated in place, one dense mask per row."""
    heads, dim = visual[0].shape[1:]
    row_text = text[0].shape[0] // plan.rows
    q, k, v = (torch.cat([t.view(plan.rows, -1, heads, dim), x.view(plan.rows, -1, heads, dim)], dim=1).transpose(1, 2)
               for t, x in zip(text, visual))  # (R, H, L, Dh)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.dense_mask).transpose(1, 2)  # (R, L, H, Dh)
    out_text, out_visual = o.split([row_text, o.shape[1] - row_text], dim=1)
    return out_text.reshape(-1, heads, dim), out_visual.reshape(-1, heads, dim)


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)


def attend(
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    visual: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    plan: AttentionPlan,
    varlen_fn: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment-local joint attention.

    text: (q, k, v) of all text tokens, each (Nt, heads, head_dim); visual: the same for (Nv, ...).
    Returns (text output, visual output) in the same layout. varlen_fn replaces flash-attn's kernel
    (same signature) so the flash layout can be checked off-GPU.
    """
    if plan.backend == "grouped":
        return _grouped(text, visual, plan)
    if plan.backend == "reference" and plan.rows:
        return _rows(text, visual, plan)
    nt = text[0].shape[0]
    qj, kj, vj = (torch.cat([t, v]).index_select(0, plan.joint) for t, v in zip(text, visual))  # joint order
    if plan.backend == "reference":
        o = F.scaled_dot_product_attention(
            qj.transpose(0, 1).unsqueeze(0), kj.transpose(0, 1).unsqueeze(0), vj.transpose(0, 1).unsqueeze(0),
            attn_mask=plan.dense_mask,
        )[0].transpose(0, 1)
    elif plan.backend == "flex":
        o = _flex(
            qj.transpose(0, 1).unsqueeze(0), kj.transpose(0, 1).unsqueeze(0), vj.transpose(0, 1).unsqueeze(0),
            plan.block_mask,
        )[0].transpose(0, 1)
    elif plan.backend == "flash":
        f = plan.flash
        if f["key_index"] is not None:
            kj, vj = kj.index_select(0, f["key_index"]), vj.index_select(0, f["key_index"])
        o = (varlen_fn or _flash_varlen)(qj, kj, vj, f["cu_q"], f["cu_k"], f["max_q"], f["max_k"])
    else:
        raise ValueError(f"unknown attention backend {plan.backend!r}.")
    o = o.index_select(0, plan.joint_inverse)
    return o[:nt], o[nt:]
