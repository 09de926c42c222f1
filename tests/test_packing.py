"""Packing: shapes, order, positions and input checks."""

import pytest
import torch

from pyraflow.packing import Sample, pack, patchify, token_positions, unpack, unpatchify
from helpers import CHANNELS, POOLED_DIM, TEXT_DIM, random_samples


def test_patchify_round_trip_for_images_and_video():
    for shape in [(3, 1, 8, 12), (2, 5, 4, 6)]:
        x = torch.randn(shape)
        tokens = patchify(x, 2)
        assert tokens.shape == (shape[1] * shape[2] // 2 * shape[3] // 2, shape[0] * 4)
        torch.testing.assert_close(unpatchify(tokens, shape, 2), x, rtol=0, atol=0)
    # token 0 is the top-left patch of frame 0, channel-major inside the patch
    x = torch.arange(2 * 1 * 4 * 4.0).reshape(2, 1, 4, 4)
    assert patchify(x, 2)[0].tolist() == [0, 1, 4, 5, 16, 17, 20, 21]


def test_coarse_tokens_sit_at_the_centre_of_the_fine_tokens_they_cover():
    fine = token_positions((1, 8, 8), downsample=1)  # 8x8 full-resolution tokens
    for d in (2, 4):
        coarse = token_positions((1, 8 // d, 8 // d), downsample=d)
        # independent: average the fine positions over each d x d block
        expected = fine.reshape(8 // d, d, 8 // d, d, 3).mean(dim=(1, 3)).reshape(-1, 3)
        torch.testing.assert_close(coarse, expected)


def test_pack_then_unpack_restores_every_sample_in_order():
    samples = random_samples(0, count=9, frames=(1, 3))
    batch = pack(samples, num_stages=3)
    restored = unpack(batch.visual, batch.layout)
    for s, r in zip(samples, restored):
        torch.testing.assert_close(r, s.latent, rtol=0, atol=0)
    lay = batch.layout
    assert lay.num_visual == sum(s.latent[0].numel() // 4 for s in samples)
    assert lay.num_text == sum(s.text.shape[0] for s in samples)
    assert lay.cu_seqlens()[-1] == lay.num_text + lay.num_visual
    # groups are contiguous runs of equal visual shape
    for g in lay.groups:
        assert len({lay.shapes[b][1:] for b in g.segments}) == 1


def test_per_frame_timesteps_make_one_conditioning_run_per_frame():
    samples = random_samples(1, count=4, frames=(3,), per_frame=True)
    batch = pack(samples, num_stages=3)
    assert batch.timestep.shape == (12,)
    # text follows each segment's first run (for video: the oldest history, fixed while a unit is denoised)
    assert batch.layout.text_run.tolist() == [0, 3, 6, 9]


def _sample(**kw):
    base = dict(stage=1, latent=torch.randn(CHANNELS, 1, 8, 8), text=torch.randn(5, TEXT_DIM),
                pooled=torch.randn(POOLED_DIM), timestep=500.0)
    return Sample(**{**base, **kw})


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(latent=torch.randn(CHANNELS + 1, 1, 8, 8)), "sample 1 .*channels"),
        (dict(text=torch.randn(5, TEXT_DIM + 1)), "sample 1 .*text width"),
        (dict(latent=torch.randn(CHANNELS, 1, 1, 1)), "sample 1 .*patches"),
        (dict(latent=torch.randn(CHANNELS, 8, 8)), "sample 1 .*expected \\(C, T, H, W\\)"),
        (dict(latent=torch.randn(CHANNELS, 2, 8, 8), timestep=torch.rand(3)), "sample 1 .*3 timesteps for 2 frames"),
        (dict(pooled=torch.randn(POOLED_DIM + 2)), "sample 1 .*pooled"),
        (dict(stage=5), "sample 1 .*stage"),
        (dict(text=torch.randn(0, TEXT_DIM)), "sample 1 .*L >= 1"),
    ],
)
def test_malformed_samples_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        pack([_sample(), _sample(**bad)], num_stages=3, channels=CHANNELS, text_dim=TEXT_DIM, pooled_dim=POOLED_DIM)


def test_empty_batch_is_refused():
    with pytest.raises(ValueError, match="empty batch"):
        pack([], num_stages=3)
