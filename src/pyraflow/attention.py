"""Joint attention over packed segments, behind one interface with several backends.

A backend is built once per batch from the packing Layout (``build_attention``) and then called by every
block with the queries, keys and values of the text stream (all segments' text tokens, in segment order)
and of the visual stream, each (N, heads, head_dim); it returns the two streams' outputs. Attention is
joint (text + visual) inside a segment and never crosses segments.

Backends:
  grouped  segments with the same visual layout batched as (G, heads, L, head_dim) from contiguous views
           (no gathers); different text lengths are padded and masked per key. No N x N mask. CPU default.
  flex     FlexAttention with a document mask: one BlockMask per batch, compiled on CUDA (forward only on CPU).
  flash    flash-attn's varlen kernel over cu_seqlens (CUDA, fp16/bf16, when flash-attn is installed).
  prefix   video sampling with a history cache: a unit's tokens attend to cached text and history keys/values.

Under sequence parallelism (``SequenceShard``) each rank of a group holds a contiguous part of both streams; a
``ShardedAttention`` trades it for every token of 1/N of the heads, runs the backend above over the whole layout,
and trades back, so the backends themselves never see a split sequence.

Temporal-causal masking (optional, every backend): a visual token of causal step f sees its segment's text and
steps <= f; text sees only text, so text carries no information from later frames to earlier ones. (The released
Pyramid Flow models were trained with text at step 0, seeing the first frame too: ``text_step=0`` reproduces that.)

Index tensors are built on the host from the layout's metadata and moved to the device once per batch, so no
backend synchronises with the device while a step runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from pyraflow.config import ATTENTION_BACKENDS
from pyraflow.packing import Layout

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
VarlenKernel = Callable[..., torch.Tensor]  # flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)


class Attention(Protocol):
    def __call__(self, text: QKV, visual: QKV) -> tuple[torch.Tensor, torch.Tensor]: ...


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Pick the fastest backend that works on this device (``auto``), or check a forced one."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; use one of {', '.join(ATTENTION_BACKENDS)}.")
    if name == "auto":
        if device.type == "cuda":
            return "flash" if flash_available() and dtype in (torch.float16, torch.bfloat16) else "flex"
        return "grouped"
    if name == "flash" and not flash_available():
        raise ValueError("attention backend 'flash' needs CUDA and the flash-attn package; use 'auto' instead.")
    return name


def build_attention(layout: Layout, backend: str, causal: bool, device: torch.device,
                    varlen_kernel: VarlenKernel | None = None, text_step: int = -1) -> Attention:
    """The attention of one batch for a resolved backend name (see ``resolve_backend``). text_step: the causal step
    of text tokens (-1: text sees only text)."""
    if backend == "grouped":
        return GroupedAttention(layout, causal, device, text_step)
    if backend == "flex":
        return FlexAttention(layout, causal, device, text_step)
    if backend == "flash":
        return FlashAttention(layout, causal, device, varlen_kernel, text_step)
    raise ValueError(f"unknown attention backend {backend!r}; use one of {', '.join(ATTENTION_BACKENDS[1:])}.")


# ----- sequence parallelism (Ulysses) ---------------------------------------------------------------------

Exchange = Callable[[torch.Tensor, list[int]], torch.Tensor]


def split_sizes(tokens: int, parts: int) -> list[int]:
    """Contiguous parts of a stream as equal as they can be (the first ``tokens % parts`` one longer)."""
    return [tokens // parts + (i < tokens % parts) for i in range(parts)]


@dataclass(frozen=True)
class SequenceShard:
    """This rank's place in a sequence-parallel group and the group's three collectives, injected by the trainer
    (pyraflow.train.parallelize.sequence_shard) so that models and backends never import torch.distributed.

    to_heads(x, sizes): this rank's rows (sizes[rank], H, D) -> every rank's rows for H / ranks heads.
    to_sequence(y, sizes): the inverse. gather(x, sizes): every rank's rows, whole; its backward keeps this rank's
    rows of the gradient, which is right because every rank of the group computes the same loss from the whole."""

    rank: int
    ranks: int
    to_heads: Exchange
    to_sequence: Exchange
    gather: Exchange

    def span(self, tokens: int) -> tuple[list[int], int, int]:
        """Every rank's share of a stream of ``tokens``, and where this rank's starts and ends."""
        sizes = split_sizes(tokens, self.ranks)
        start = sum(sizes[: self.rank])
        return sizes, start, start + sizes[self.rank]


class ShardedAttention:
    """Any backend over a sequence split across a group: one exchange in (q, k, v of both streams together), the
    backend over the whole layout with this rank's heads, one exchange out."""

    def __init__(self, inner: Attention, shard: SequenceShard, text_sizes: list[int], visual_sizes: list[int]):
        self.inner, self.shard = inner, shard
        self.text_sizes, self.visual_sizes = text_sizes, visual_sizes
        self.sizes = [t + v for t, v in zip(text_sizes, visual_sizes)]  # each rank sends [its text; its visual]
        self.pieces = [n for pair in zip(text_sizes, visual_sizes) for n in pair]

    def __call__(self, text: QKV, visual: QKV) -> tuple[torch.Tensor, torch.Tensor]:
        local = torch.cat([torch.cat(text, dim=-1), torch.cat(visual, dim=-1)])  # (rows, H, 3 Dh)
        pieces = self.shard.to_heads(local, self.sizes).split(self.pieces)  # text_0, visual_0, text_1, ...
        text_qkv = torch.cat(pieces[0::2]).chunk(3, dim=-1)
        visual_qkv = torch.cat(pieces[1::2]).chunk(3, dim=-1)
        out_text, out_visual = self.inner(text_qkv, visual_qkv)
        texts, visuals = out_text.split(self.text_sizes), out_visual.split(self.visual_sizes)
        out = self.shard.to_sequence(torch.cat([p for pair in zip(texts, visuals) for p in pair]), self.sizes)
        return out.split([self.text_sizes[self.shard.rank], self.visual_sizes[self.shard.rank]])


# ----- helpers shared by the backends ------------------------------------------------------------------

def valid_keys(text_lengths: list[int], others: int) -> torch.Tensor:
    """(G, Lt + others) bool: each segment's text padded to the group's longest text Lt, then ``others``
    tokens that are all real."""
    lt = max(text_lengths)
    valid = torch.arange(lt + others)[None, :] < torch.tensor(text_lengths)[:, None]
    valid[:, lt:] = True
    return valid


def pad_positions(text_lengths: list[int], device: torch.device) -> torch.Tensor | None:
    """Each text row's place in the flat (G * Lt) grid of a group padded to its longest text; None when no
    lengths differ (no padding)."""
    lt = max(text_lengths)
    if min(text_lengths) == lt:
        return None
    return torch.cat([torch.arange(n) + j * lt for j, n in enumerate(text_lengths)]).to(device)


def text_batch(text: torch.Tensor, text_lengths: list[int], pad_index: torch.Tensor | None = None) -> torch.Tensor:
    """A group's text tokens (sum of lengths, H, Dh) -> (G, Lt, H, Dh), zero-padded where lengths differ:
    ``pad_index`` places each row in the flat (G * Lt) grid (GroupSlices.pad_index); None when none differ."""
    if pad_index is None:
        return text.view(len(text_lengths), -1, *text.shape[1:])
    grid = text.new_zeros(len(text_lengths) * max(text_lengths), *text.shape[1:])
    return grid.index_copy(0, pad_index, text).view(len(text_lengths), max(text_lengths), *text.shape[1:])


def joint_order(layout: Layout, text_step: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host tensors over the joint sequence ([text_b; visual_b] per segment): the stream index of each joint
    token (text stream first, then visual), its segment, and its causal step (text_step for text)."""
    nt = layout.num_text
    pieces, segment, causal = [], [], []
    for b in range(layout.num_segments):
        t0, t1 = layout.text_offsets[b], layout.text_offsets[b + 1]
        v0, v1 = layout.visual_offsets[b], layout.visual_offsets[b + 1]
        pieces += [torch.arange(t0, t1), torch.arange(nt + v0, nt + v1)]
        segment.append(torch.full((t1 - t0 + v1 - v0,), b))
        causal += [torch.full((t1 - t0,), text_step), layout.causal_index[v0:v1]]
    return torch.cat(pieces), torch.cat(segment), torch.cat(causal)


class JointOrder:
    """Moves the two streams into joint order and back (flex and flash attend over one joint sequence)."""

    def __init__(self, layout: Layout, device: torch.device, text_step: int = -1):
        joint, self.segment, self.causal = joint_order(layout, text_step)
        inverse = torch.empty_like(joint)
        inverse[joint] = torch.arange(len(joint))
        self.num_text = layout.num_text
        self.index, self.inverse = joint.to(device), inverse.to(device)

    def gather(self, text: QKV, visual: QKV) -> QKV:
        return tuple(torch.cat([t, v]).index_select(0, self.index) for t, v in zip(text, visual))  # type: ignore[return-value]

    def scatter(self, joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = joint.index_select(0, self.inverse)
        return out[: self.num_text], out[self.num_text :]


# ----- grouped ---------------------------------------------------------------------------------------

@dataclass
class GroupSlices:
    """One group: G segments, contiguous in both streams, same visual layout."""

    text: tuple[int, int]  # slice of the text stream
    visual: tuple[int, int]  # slice of the visual stream
    count: int  # G
    text_lengths: list[int]
    mask: torch.Tensor | None  # None, (G, 1, 1, L) key padding, or (G, 1, L, L) causal
    pad_index: torch.Tensor | None  # where lengths differ: each text row's place in the (G * Lt) padded grid

    @property
    def text_max(self) -> int:
        return max(self.text_lengths)


class GroupedAttention:
    """Each group as one (G, heads, L, head_dim) SDPA call, built from contiguous views and one cat."""

    def __init__(self, layout: Layout, causal: bool, device: torch.device, text_step: int = -1):
        self.groups: list[GroupSlices] = []
        for group in layout.groups:
            first, last = group.segments.start, group.segments.stop
            text_lengths = layout.text_lengths[first:last]
            count, lt, lv = len(text_lengths), max(text_lengths), group.visual_length
            valid = valid_keys(text_lengths, lv)
            if causal:  # the group signature includes the causal structure, so its first segment's holds for all
                v0 = layout.visual_offsets[first]
                step = torch.cat([torch.full((lt,), text_step), layout.causal_index[v0 : v0 + lv]])
                mask = (valid[:, None, :] & (step[None, :] <= step[:, None])[None]).unsqueeze(1)  # (G, 1, L, L)
            elif min(text_lengths) == lt:
                mask = None
            else:
                mask = valid[:, None, None, :]
            self.groups.append(GroupSlices(
                text=(layout.text_offsets[first], layout.text_offsets[last]),
                visual=(group.visual_start, group.visual_start + count * lv),
                count=count, text_lengths=text_lengths, mask=None if mask is None else mask.to(device),
                pad_index=pad_positions(text_lengths, device)))
        self.text_sizes = [g.text[1] - g.text[0] for g in self.groups]
        self.visual_sizes = [g.visual[1] - g.visual[0] for g in self.groups]

    def __call__(self, text: QKV, visual: QKV) -> tuple[torch.Tensor, torch.Tensor]:
        heads, dim = visual[0].shape[1:]
        # split (not slicing): its backward is one cat instead of a zero-filled copy per group
        text_parts = [t.split(self.text_sizes) for t in text]
        visual_parts = [v.split(self.visual_sizes) for v in visual]
        text_out, visual_out = [], []
        for i, g in enumerate(self.groups):
            joint = []
            for t, v in zip(text_parts, visual_parts):
                t_part = text_batch(t[i], g.text_lengths, g.pad_index)
                joint.append(torch.cat([t_part, v[i].view(g.count, -1, heads, dim)], dim=1).transpose(1, 2))
            o = F.scaled_dot_product_attention(*joint, attn_mask=g.mask).transpose(1, 2)  # (G, L, H, Dh)
            visual_out.append(o[:, g.text_max :].reshape(-1, heads, dim))
            text_o = o[:, : g.text_max].reshape(-1, heads, dim)
            # one gather (its backward one index_add) rather than a slice per segment, whose backward each
            # writes a zero-filled copy of the whole group
            text_out.append(text_o if g.pad_index is None else text_o.index_select(0, g.pad_index))
        return torch.cat(text_out), torch.cat(visual_out)


# ----- flex ------------------------------------------------------------------------------------------

_compiled_flex: Callable | None = None


class FlexAttention:
    """FlexAttention over the joint sequence with one document (and causal) BlockMask per batch."""

    def __init__(self, layout: Layout, causal: bool, device: torch.device, text_step: int = -1):
        from torch.nn.attention.flex_attention import create_block_mask

        self.order = JointOrder(layout, device, text_step)
        segment, step = self.order.segment.to(device), self.order.causal.to(device)

        def document(b, h, q, k):
            same = segment[q] == segment[k]
            return same & (step[k] <= step[q]) if causal else same

        n = len(segment)
        # compiled on CUDA: the eager path materialises an N x N mask to find the blocks
        self.block_mask = create_block_mask(document, None, None, n, n, device=str(device),
                                            _compile=device.type == "cuda")

    def __call__(self, text: QKV, visual: QKV) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in self.order.gather(text, visual))  # (1, H, N, Dh)
        return self.order.scatter(_flex(q, k, v, self.block_mask)[0].transpose(0, 1))


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
    with warnings.catch_warnings():  # eager on CPU is for checking, not speed
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=block_mask)


# ----- flash -----------------------------------------------------------------------------------------

class FlashAttention:
    """flash-attn varlen over the joint sequence. Temporal-causal attention needs no mask: each segment is cut
    into query chunks (its text, then each causal step) and every chunk attends to the prefix of its segment up
    to its own step, gathered as its own key sequence. All indices are built on the host, moved once."""

    def __init__(self, layout: Layout, causal: bool, device: torch.device, kernel: VarlenKernel | None = None,
                 text_step: int = -1):
        self.order = JointOrder(layout, device, text_step)
        self.kernel = kernel
        lengths = [t + v for t, v in zip(layout.text_lengths, layout.visual_lengths)]
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        if not causal:
            q_lengths, k_lengths, key_index = lengths, lengths, None
        else:
            step = self.order.causal
            q_lengths, k_lengths, pieces = [], [], []
            for b, length in enumerate(lengths):
                steps = step[starts[b] : starts[b] + length]
                _, counts = torch.unique_consecutive(steps, return_counts=True)
                ends = counts.cumsum(0).tolist()  # host tensor: no device sync
                q_lengths += counts.tolist()
                k_lengths += ends
                pieces += [torch.arange(starts[b], starts[b] + end) for end in ends]
            key_index = torch.cat(pieces).to(device)
        self.key_index = key_index
        self.cu_q = _offsets(q_lengths).to(device)
        self.cu_k = _offsets(k_lengths).to(device)
        self.max_q, self.max_k = max(q_lengths), max(k_lengths)

    def __call__(self, text: QKV, visual: QKV) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.order.gather(text, visual)
        if self.key_index is not None:
            k, v = k.index_select(0, self.key_index), v.index_select(0, self.key_index)
        kernel = self.kernel or _flash_varlen
        return self.order.scatter(kernel(q, k, v, self.cu_q, self.cu_k, self.max_q, self.max_k))


def _offsets(lengths: list[int]) -> torch.Tensor:
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)


# ----- prefix (history cache) ------------------------------------------------------------------------

@dataclass
class PrefixGroup:
    """Segments of one group whose text and history keys/values come from a PrefixCache."""

    text: tuple[int, int]  # slice of the cached text stream
    history: tuple[int, int]  # slice of the cached history (visual) stream
    visual: tuple[int, int]  # slice of the predicted tokens
    count: int
    text_lengths: list[int]
    mask: torch.Tensor | None  # (G, 1, 1, L) key padding where text lengths differ
    pad_index: torch.Tensor | None  # as GroupSlices.pad_index


class PrefixAttention:
    """Predicted video-unit tokens over [cached text; cached history; own unit].

    The predicted tokens of a unit all share one causal step above every history unit, so they see all of
    the prefix and all of their own unit: no mask beyond text padding.
    """

    def __init__(self, layout: Layout, prefix: Layout, device: torch.device):
        if layout.order != prefix.order or layout.text_lengths != prefix.text_lengths:
            raise ValueError("the prefix cache was built for other segments (order or text differs); build it from "
                             "the same samples, in the same order, as the unit being denoised.")
        if any(layout.history_lengths):
            raise ValueError("with a prefix cache, pack only the predicted latents (no history parts).")
        self.groups = []
        for group in layout.groups:
            first, last = group.segments.start, group.segments.stop
            history = {prefix.visual_lengths[b] for b in range(first, last)}
            if len(history) != 1:
                raise ValueError("segments of one group have histories of different lengths; give them equal histories.")
            text_lengths = layout.text_lengths[first:last]
            lt, lh, lv = max(text_lengths), history.pop(), group.visual_length
            mask = None if min(text_lengths) == lt else valid_keys(text_lengths, lh + lv)[:, None, None, :].to(device)
            self.groups.append(PrefixGroup(
                text=(layout.text_offsets[first], layout.text_offsets[last]),
                history=(prefix.visual_offsets[first], prefix.visual_offsets[last]),
                visual=(group.visual_start, group.visual_start + len(text_lengths) * lv),
                count=len(text_lengths), text_lengths=text_lengths, mask=mask,
                pad_index=pad_positions(text_lengths, device)))

    def __call__(self, visual: QKV, cached: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Predicted tokens (N, heads, head_dim) attend to cached (k_text, v_text, k_history, v_history) and themselves."""
        q, k, v = visual
        k_text, v_text, k_hist, v_hist = cached
        heads, dim = q.shape[1:]
        out = []
        for g in self.groups:
            def view(x, span):
                return x[span[0] : span[1]].reshape(g.count, -1, heads, dim)

            def text_part(x):
                return text_batch(x[g.text[0] : g.text[1]], g.text_lengths, g.pad_index)

            keys = torch.cat([text_part(k_text), view(k_hist, g.history), view(k, g.visual)], dim=1).transpose(1, 2)
            values = torch.cat([text_part(v_text), view(v_hist, g.history), view(v, g.visual)], dim=1).transpose(1, 2)
            o = F.scaled_dot_product_attention(view(q, g.visual).transpose(1, 2), keys, values, attn_mask=g.mask)
            out.append(o.transpose(1, 2).reshape(-1, heads, dim))
        return torch.cat(out)
