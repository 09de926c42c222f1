"""Regional compilation: compiled blocks compute what eager ones do (forward, backward, the history cache), packed
batches of other layouts and sizes reuse the first compilation, and ``auto`` follows the toolchain."""

import copy

import pytest
import torch

import pyraflow.compilation as compilation
from pyraflow.compilation import compilations, compile_blocks, resolve_compile
from pyraflow.config import SampleConfig, TrainConfig
from pyraflow.packing import Sample, unpack
from helpers import packed, randomised_model, random_samples, rel_err


def forward_backward(model, samples, seed=0):
    """Outputs per sample and the gradients of a random projection of them (parameters, latents, text)."""
    for s in samples:
        s.latent.requires_grad_(True)
        s.text.requires_grad_(True)
    batch = packed(samples, model)
    out = model(batch)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    inputs = list(model.parameters()) + [s.latent for s in samples] + [s.text for s in samples]
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    return [o.detach() for o in unpack(out, batch.layout)], grads


def fresh(samples):
    return [Sample(s.stage, s.latent.detach().clone(), s.text.detach().clone(), s.pooled, s.timestep) for s in samples]


def test_compiled_blocks_equal_eager_and_each_sample_alone_and_do_not_recompile(compiling):
    eager = randomised_model(3, temporal_causal=True)
    compiled = compile_blocks(copy.deepcopy(eager))
    before = compilations()
    for seed, count in ((3, 7), (4, 9)):  # the second batch: other stages, text lengths, clips and token count
        samples = random_samples(seed, count=count, frames=(1, 2))
        out_c, grads_c = forward_backward(compiled, fresh(samples), seed)
        out_e, grads_e = forward_backward(eager, fresh(samples), seed)
        for a, b in zip(out_c, out_e):
            assert rel_err(a, b) <= 1e-5
        for a, b in zip(grads_c, grads_e):
            assert rel_err(a, b) <= 1e-5
        for s, o in zip(samples, out_c):  # packed and compiled equals each sample alone, eager
            batch = packed(fresh([s]), eager)
            assert rel_err(o, unpack(eager(batch), batch.layout)[0].detach()) <= 1e-5
        if seed == 3:
            first = compilations() - before
    # two kinds of block (the last one's text is pre-only), each compiled as the halves around attention
    assert 1 <= first <= 4
    assert compilations() - before == first  # the second layout reused them: no recompilation


@pytest.mark.slow
def test_compiled_history_cache_path_equals_eager(compiling):
    eager = randomised_model(5, temporal_causal=True).eval()
    compiled = compile_blocks(copy.deepcopy(eager))
    samples = random_samples(6, count=4, frames=(3,))
    history = [Sample(s.stage, s.latent[:, :2], s.text, s.pooled, s.timestep) for s in samples]
    unit = [Sample(s.stage, s.latent[:, 2:], s.text, s.pooled, s.timestep) for s in samples]
    with torch.no_grad():
        outs = []
        for model in (eager, compiled):
            cache = model.prefix_cache(packed(history, model))
            batch = packed(unit, model)
            context = model.prepare(batch.layout, torch.device("cpu"), prefix=cache)
            outs.append(model(batch, context, prefix=cache))
    assert rel_err(outs[1], outs[0]) <= 1e-5


def test_auto_follows_the_toolchain_and_true_without_one_is_refused(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("PYRAFLOW_NO_COMPILE", "1")
    assert resolve_compile("auto", cpu) is False  # switched off in the environment: eager, said in the log
    monkeypatch.delenv("PYRAFLOW_NO_COMPILE")
    monkeypatch.setattr(compilation.shutil, "which", lambda name: None)
    assert resolve_compile("auto", cpu) is False
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        resolve_compile(True, cpu)
    assert resolve_compile(False, cpu) is False
    monkeypatch.setattr(compilation.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert resolve_compile("auto", cpu) is True


def test_compile_settings_are_checked():
    assert TrainConfig(compile="false").compile is False and SampleConfig(compile="TRUE").compile is True
    for bad in ("yes", 1, 0, None):
        with pytest.raises(ValueError, match="auto, true or false"):
            TrainConfig(compile=bad)
