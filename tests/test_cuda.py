"""On a CUDA GPU (benchmarks/gpu_check.sh runs these; elsewhere they are skipped, saying why): flex and flash
against the per-segment oracle, forward and backward, with and without temporal causality; the model packed vs
alone on flex; sampling that stays on the device; bf16 training with FSDP2 through torchrun on one rank.

Only packages the GPU image ships are needed (no MiniLM, MNIST or VAE): text comes from a tiny random BERT saved
to a temporary folder, data from a synthetic prepared cache.
"""

import pytest
import torch

from pyraflow.attention import build_attention, flash_available
from pyraflow.packing import pack, unpack
from helpers import check_split_models, one_rank_fsdp_bf16_run, per_segment_attention, randomised_model, random_samples

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")]
DEVICE = torch.device("cuda")
HEADS, HEAD_DIM = 2, 16


def qkv(layout, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    n = layout.num_text + layout.num_visual
    return [torch.randn(n, HEADS, HEAD_DIM, generator=g, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend, dtype, tol", [("flex", torch.float32, 2e-5), ("flex", torch.bfloat16, 3e-2),
                                                 ("flash", torch.bfloat16, 3e-2)])
def test_cuda_backends_equal_per_segment_attention_forward_and_backward(backend, dtype, tol, causal):
    if backend == "flash" and not flash_available():
        pytest.skip("flash-attn is not installed")
    layout = pack(random_samples(0, count=9, frames=(1, 3)), num_stages=3).layout
    attention = build_attention(layout, backend, causal, DEVICE)
    q, k, v = qkv(layout, dtype)
    nt = layout.num_text
    out = torch.cat(attention((q[:nt], k[:nt], v[:nt]), (q[nt:], k[nt:], v[nt:])))
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    expected = per_segment_attention(q32, k32, v32, layout, causal)
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    w = torch.randn_like(expected)
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * w).sum(), (q32, k32, v32))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a.float(), b, rtol=10 * tol, atol=10 * tol)


def test_the_model_on_flex_gives_each_sample_what_it_gives_it_alone():
    model = randomised_model(1, attention="flex", temporal_causal=True).to(DEVICE)
    samples = random_samples(1, count=7, frames=(1, 2))
    batch = pack(samples, 3, 2).to(DEVICE)
    together = unpack(model(batch), batch.layout)
    for s, t in zip(samples, together):
        alone = pack([s], 3, 2).to(DEVICE)
        torch.testing.assert_close(t, unpack(model(alone), alone.layout)[0], rtol=1e-4, atol=1e-4)
    sum(t.square().sum() for t in together).backward()  # compiled flex has a backward
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_sampling_stays_on_the_device_and_repeats_with_a_seed():
    from pyraflow.config import ScheduleConfig
    from pyraflow.sample import sample_pyramid
    from pyraflow.schedule import PyramidSchedule
    from pyraflow.text import TextEmbedding

    model = randomised_model(2).to(DEVICE).eval()
    g = torch.Generator().manual_seed(0)
    text = TextEmbedding(torch.randn(3, 5, 24, generator=g), torch.tensor([5, 3, 4]), torch.randn(3, 12, generator=g))
    null = TextEmbedding(torch.zeros(1, 1, 24), torch.tensor([1]), torch.zeros(1, 12))
    schedule = PyramidSchedule(ScheduleConfig(stages=3))
    runs = []
    for _ in range(2):
        latents, _ = sample_pyramid(model, schedule, text, null, (3, 1, 16, 16), [2, 2, 2], 3.0,
                                    torch.Generator(device=DEVICE).manual_seed(7))
        runs.append(latents)
    assert runs[0].device.type == "cuda" and torch.equal(runs[0], runs[1])
    with pytest.raises(RuntimeError):  # a CPU generator for CUDA noise is refused, not silently moved
        sample_pyramid(model, schedule, text, null, (3, 1, 16, 16), [1, 1, 1], 1.0, torch.Generator().manual_seed(7))


def test_bf16_training_with_fsdp2_on_one_rank_under_torchrun(tmp_path):
    one_rank_fsdp_bf16_run(tmp_path)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="sequence parallelism needs two CUDA GPUs; this machine "
                    "has fewer")
def test_every_architecture_split_over_two_gpus_computes_what_it_computes_whole(tmp_path):
    """The CPU test's check on NCCL: the real all_to_all exchange, flex attention on each GPU."""
    check_split_models(tmp_path)


def test_a_training_step_never_waits_for_the_gpu(tmp_path):
    """CUDA's sync debug mode raises at any device-to-host wait inside the step (batches fetched outside it)."""
    from pyraflow.bench.data import write_synthetic_cache
    from pyraflow.config import load_config
    from pyraflow.latents import build_latent_space
    from pyraflow.text import load_text_encoder
    from pyraflow.train import Trainer
    from helpers import tiny_text_encoder

    encoder = tiny_text_encoder(tmp_path / "encoder")
    config = load_config(None, [f"text.encoder={encoder}", "model.text_dim=32", "model.pooled_dim=32", "model.width=64",
                                "model.depth=2", "model.num_heads=2", "latent.kind=vae", "latent.channels=16",
                                "latent.downsample=1", "data.image_size=32", "model.patch_size=4",
                                f"data.cache={tmp_path / 'cache'}", "train.sample_every=0", "train.compile=false",
                                "batching.token_budget=1024", "text.max_tokens=8"])
    write_synthetic_cache(tmp_path / "cache", config, 100, load_text_encoder(config.text).identity,
                          build_latent_space(config.latent).identity)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.read_metrics(trainer.train_step())
    fetch = trainer._next_batch

    def fetch_unwatched():
        torch.cuda.set_sync_debug_mode("default")
        try:
            return fetch()
        finally:
            torch.cuda.set_sync_debug_mode("error")

    trainer._next_batch = fetch_unwatched
    torch.cuda.set_sync_debug_mode("error")
    try:
        step = trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        trainer.close()
    assert trainer.read_metrics(step)["loss"] > 0


def test_compiled_blocks_equal_eager_on_the_gpu(compiling):
    import copy

    from pyraflow.compilation import compile_blocks

    eager = randomised_model(4, temporal_causal=True).to(DEVICE)
    compiled = compile_blocks(copy.deepcopy(eager))
    batch = pack(random_samples(4, count=7, frames=(1, 2)), 3, 2).to(DEVICE)
    a, b = eager(batch), compiled(batch)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    ga = torch.autograd.grad(a.square().sum(), list(eager.parameters()))
    gb = torch.autograd.grad(b.square().sum(), list(compiled.parameters()))
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)


def test_offloaded_bf16_sampling_of_a_released_folder_leaves_nothing_on_the_gpu_between_parts():
    pytest.importorskip("transformers")
    from pathlib import Path

    from pyraflow.sample.released import load_released

    folder = Path(__file__).parent / "fixtures" / "pyramid-flow-pipeline" / "released" / "pyramid-flow-sd3-tiny"
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    pipe = load_released(folder, device=DEVICE, precision="bf16", offload=True, steps=[1, 1, 1])
    assert torch.cuda.memory_allocated() <= base + 2**20  # every part waits on the CPU
    pixels, _ = pipe.generate(["a cat"], seed=0, size=(64, 64))
    assert torch.isfinite(pixels).all() and pixels.device.type == "cpu"
    assert torch.cuda.memory_allocated() <= base + 2**20
