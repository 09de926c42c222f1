"""Regional compilation: each transformer block's forward compiled (torch.compile, inductor) with dynamic token
counts, attention left eager between the two compiled halves.

Why regional: the blocks are where the elementwise work is (norms, adaLN modulation, RoPE, GELU, gated residuals),
they repeat, and they share one code object, so a model of any depth compiles each region once. Why attention
stays outside: the packed backends walk the batch's segment layout in Python (groups, masks, cu_seqlens), which
changes every batch; traced, every new layout would be a recompilation. ``attend`` is the one call that dynamo
skips, so a block compiles into the work before attention and the work after it, with no guard on the layout.

Inside compiled blocks the per-run modulation vectors reach their tokens through one index gather
(``RunBroadcast(..., max_blocks=0)``), which inductor fuses into the elementwise kernel that reads them, instead
of the eager path's Python loop over blocks of equal-length runs: the gather costs no extra pass over memory there.

``auto`` decides from the device and the toolchain, never from a timing: inductor needs a C++ compiler on the CPU
and Triton on CUDA. ``PYRAFLOW_NO_COMPILE=1`` in the environment makes ``auto`` eager (the test suite sets it).
"""

from __future__ import annotations

import logging
import os
import shutil

import torch

log = logging.getLogger("pyraflow.compilation")

def _call(attention, *streams):
    return attention(*streams)


attend = _call
"""``attend(attention, *streams)`` = ``attention(*streams)``: every block calls its attention through this name, which
``compile_blocks`` rebinds to a version dynamo skips (run eagerly inside a compiled block; see the module
docstring). Bound lazily because importing dynamo costs seconds of start-up that eager runs need not pay."""


def toolchain(device: torch.device) -> tuple[bool, str]:
    """Whether inductor can generate kernels for ``device`` here, and why (for the run's log)."""
    if os.environ.get("PYRAFLOW_NO_COMPILE") == "1":
        return False, "PYRAFLOW_NO_COMPILE=1 in the environment"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # pragma: no cover - torch builds without the helper
            return False, "Triton is not importable"
        return (True, "CUDA with Triton") if has_triton() else (False, "CUDA without Triton (pip install triton)")
    if device.type == "cpu":
        from torch._inductor import config as inductor_config

        compiler = inductor_config.cpp.cxx[-1] or "g++"
        found = shutil.which(compiler) or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        return (True, f"CPU with C++ compiler {found}") if found else (
            False, "CPU without a C++ compiler (apt-get install g++)")
    return False, f"no inductor backend for device type {device.type!r}"


def resolve_compile(setting: str | bool, device: torch.device, key: str = "train.compile") -> bool:
    """True to compile: as configured (a setting the config has checked), or for ``auto`` when the device's
    toolchain is there. Logs the decision."""
    available, why = toolchain(device)
    if setting is True and not available:
        raise ValueError(f"{key}=true, but compilation cannot run here: {why}; set {key}=false (or auto).")
    enabled = available if setting == "auto" else bool(setting)
    log.info("%s=%s: %s (%s)", key, setting, "blocks compiled" if enabled else "eager", why)
    return enabled


def compile_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Compile every block's forward (and the history-cache path, where the block has one) in place. The modules,
    their parameters and state-dict names stay as they are, so DDP, FSDP2 hooks, checkpoints and LoRA see the same
    model. Token counts are dynamic from the first compilation, so batches of every size share it. Idempotent."""
    global attend
    if getattr(model, "compiled", False):
        return model
    attend = torch.compiler.disable(_call)
    for block in model.blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
        if hasattr(block, "forward_prefixed"):
            block.forward_prefixed = torch.compile(block.forward_prefixed, dynamic=True)
    model.compiled = True
    return model


def reset_compilations() -> None:
    """Forget every compiled frame (dynamo's caches): the next compiled call compiles afresh. Benchmarks call this
    between sections, so no section runs eager because earlier ones filled the per-function cache (8 entries)."""
    import torch._dynamo

    torch._dynamo.reset()


def compilations() -> int:
    """Frames compiled so far in this process (each compilation and each recompilation counts one)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])
