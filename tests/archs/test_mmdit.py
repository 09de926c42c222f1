"""The MMDiT: packed equals alone (outputs and gradients) on every backend, causality, persistence, input checks."""

import pytest
import torch

from pyraflow.archs.base import RunBroadcast
from pyraflow.archs.mmdit import MultiStageMMDiT
from pyraflow.packing import Sample, pack, unpack
from helpers import CHANNELS, POOLED_DIM, TEXT_DIM, packed, randomised_model, random_samples, rel_err

TRAINABLE_BACKENDS = ["grouped", "flash"]  # flash through its kernel's contract in plain torch (conftest)


@pytest.mark.parametrize("backend", TRAINABLE_BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_forward_and_gradients_equal_each_sample_alone(backend, seed, flash_on_cpu):
    model = randomised_model(seed, attention=backend)
    samples = random_samples(seed, count=7, frames=(1, 2))
    for s in samples:
        s.latent.requires_grad_(True)
        s.text.requires_grad_(True)
    weights = [torch.randn(s.latent.shape, generator=torch.Generator().manual_seed(seed + i)) for i, s in enumerate(samples)]
    params = list(model.parameters())

    batch = packed(samples, model)
    outputs = unpack(model(batch), batch.layout)
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    grads = torch.autograd.grad(loss, params + [s.latent for s in samples] + [s.text for s in samples])

    alone_outputs, input_grads = [], []
    param_grads = [torch.zeros_like(p) for p in params]
    for s, w in zip(samples, weights):
        b = packed([s], model)
        o = unpack(model(b), b.layout)[0]
        alone_outputs.append(o.detach())
        g = torch.autograd.grad((o * w).sum(), params + [s.latent, s.text])
        param_grads = [acc + x for acc, x in zip(param_grads, g[: len(params)])]
        input_grads.append(g[len(params):])
    for o, a in zip(outputs, alone_outputs):
        assert rel_err(o.detach(), a) <= 1e-5
    for g, a in zip(grads[: len(params)], param_grads):
        assert rel_err(g, a) <= 1e-5
    n = len(samples)
    for i, (d_latent, d_text) in enumerate(input_grads):
        assert rel_err(grads[len(params) + i], d_latent) <= 1e-5
        assert rel_err(grads[len(params) + n + i], d_text) <= 1e-5


def test_flex_inference_matches_grouped():
    samples = random_samples(5, count=5)
    model = randomised_model(5, attention="grouped")
    with torch.no_grad():
        expected = model(packed(samples, model))
        model.config.attention = "flex"
        torch.testing.assert_close(model(packed(samples, model)), expected, rtol=1e-5, atol=1e-5)


def test_many_text_lengths_use_the_gather_path_with_the_same_result():
    assert RunBroadcast([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], torch.device("cpu")).index is not None
    assert RunBroadcast([4, 4, 4, 16, 16], torch.device("cpu")).index is None
    samples = random_samples(6, count=12)
    for i, s in enumerate(samples):  # twelve distinct text lengths
        s.text = torch.randn(i + 1, TEXT_DIM)
    model = randomised_model(6, attention="grouped")
    batch = packed(samples, model)
    out = unpack(model(batch), batch.layout)
    for s, o in zip(samples, out):
        b = packed([s], model)
        assert rel_err(o, unpack(model(b), b.layout)[0]) <= 1e-5


def test_per_frame_timesteps_condition_each_frame():
    model = randomised_model(7)
    g = torch.Generator().manual_seed(7)
    latent, text, pooled = torch.randn(CHANNELS, 3, 8, 8, generator=g), torch.randn(4, TEXT_DIM, generator=g), torch.randn(POOLED_DIM, generator=g)
    same = model(packed([Sample(1, latent, text, pooled, torch.full((3,), 300.0))], model))
    scalar = model(packed([Sample(1, latent, text, pooled, 300.0)], model))
    torch.testing.assert_close(same, scalar)
    varied = model(packed([Sample(1, latent, text, pooled, torch.tensor([10.0, 300.0, 900.0]))], model))
    assert not torch.allclose(varied, scalar)


@pytest.mark.parametrize("backend", TRAINABLE_BACKENDS + ["flex"])
def test_temporal_causal_model_ignores_later_frames(backend, flash_on_cpu):
    g = torch.Generator().manual_seed(8)
    latent = torch.randn(CHANNELS, 4, 8, 8, generator=g)
    text, pooled = torch.randn(5, TEXT_DIM, generator=g), torch.randn(POOLED_DIM, generator=g)
    later = latent.clone()
    later[:, 3] += torch.randn(CHANNELS, 8, 8, generator=g)
    frames_before = slice(0, 3)

    def run(model, x):
        batch = packed([Sample(1, x, text, pooled, 400.0)], model)
        with torch.no_grad():
            return unpack(model(batch), batch.layout)[0]

    for causal, unchanged in ((True, True), (False, False)):
        model = randomised_model(8, attention=backend, temporal_causal=causal)
        a, b = run(model, latent), run(model, later)
        assert torch.equal(a[:, frames_before], b[:, frames_before]) == unchanged


def test_save_and_load_round_trip(tmp_path):
    model = randomised_model(9, attention="grouped")
    batch = packed(random_samples(9), model)
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors"}
    loaded = MultiStageMMDiT.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))
    assert loaded.config == model.config


def test_corrupt_or_missing_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        MultiStageMMDiT.from_pretrained(tmp_path)
    randomised_model(0).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        MultiStageMMDiT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        MultiStageMMDiT.from_pretrained(tmp_path)


def test_init_makes_every_block_start_as_identity():
    torch.manual_seed(0)
    model = MultiStageMMDiT(randomised_model(0).config)  # real init
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda block, inputs, outputs: seen.append((inputs[:2], outputs)))
    out = model(packed(random_samples(10), model))
    assert len(seen) == len(model.blocks)
    for (text_in, visual_in), (text_out, visual_out) in seen:
        assert visual_in.abs().max() > 0 and text_in.abs().max() > 0
        assert torch.equal(visual_out, visual_in) and torch.equal(text_out, text_in)  # zero gates: x + 0 * f(x)
    assert torch.count_nonzero(out) == 0  # and a zero output layer


def test_model_refuses_a_batch_packed_for_another_shape():
    model = randomised_model(12)
    batch = pack(random_samples(12), num_stages=3, patch_size=2)
    batch.text = torch.randn(batch.text.shape[0], TEXT_DIM + 1)
    with pytest.raises(ValueError, match="text tokens are 25 wide; the model expects 24"):
        model(batch)


@pytest.mark.parametrize("backend", TRAINABLE_BACKENDS + ["flex"])
def test_clips_of_one_shape_with_other_causal_structure_equal_each_alone(backend, flash_on_cpu):
    """unit=None (a causal step per frame) and unit=3 (one step) clips of one shape, packed together."""
    model = randomised_model(14, attention=backend, temporal_causal=True)
    g = torch.Generator().manual_seed(14)
    contents = [(torch.randn(CHANNELS, 3, 8, 8, generator=g), torch.randn(5, TEXT_DIM, generator=g),
                 torch.randn(POOLED_DIM, generator=g)) for _ in range(2)]
    samples = [Sample(1, *content, 300.0, unit=unit) for content in contents for unit in (None, 3)]
    batch = packed(samples, model)
    with torch.no_grad():
        together = unpack(model(batch), batch.layout)
        for s, t in zip(samples, together):
            alone = packed([s], model)
            torch.testing.assert_close(t, unpack(model(alone), alone.layout)[0], rtol=1e-5, atol=1e-5)
    # same content, other causal structure: the outputs differ, so a shared mask would show
    assert not torch.allclose(together[0], together[1], atol=1e-3)


def test_rope_rotates_each_pair_by_its_angle_and_scores_depend_on_relative_position():
    import math

    from pyraflow.archs.base import apply_rope, rope_tables

    g = torch.Generator().manual_seed(0)
    axes, theta = [4, 6, 6], 100.0
    positions = torch.randn(5, 3, generator=g) * 4
    q, k = torch.randn(2, 5, 2, 16, generator=g)
    # independent computation: a 2x2 rotation per pair (x[2i], x[2i+1]) with angle pos[axis] * theta^(-j/dim)
    expected = torch.empty_like(q)
    for n in range(5):
        pair = 0
        for axis, dim in enumerate(axes):
            for j in range(0, dim, 2):
                a = positions[n, axis].item() * theta ** (-j / dim)
                c, s = math.cos(a), math.sin(a)
                x1, x2 = q[n, :, 2 * pair], q[n, :, 2 * pair + 1]
                expected[n, :, 2 * pair], expected[n, :, 2 * pair + 1] = c * x1 - s * x2, s * x1 + c * x2
                pair += 1
    torch.testing.assert_close(apply_rope(q, rope_tables(positions, axes, theta)), expected, rtol=1e-5, atol=1e-5)
    # q.k after RoPE is unchanged when every position moves by the same offset
    scores = lambda p: torch.einsum("nhd,mhd->hnm", apply_rope(q, rope_tables(p, axes, theta)),
                                    apply_rope(k, rope_tables(p, axes, theta)))
    shifted = scores(positions + torch.tensor([3.0, -2.0, 7.5]))
    torch.testing.assert_close(shifted, scores(positions), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores(positions * 2), scores(positions), atol=1e-2)  # a change in relative position shows
