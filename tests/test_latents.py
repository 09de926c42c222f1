"""Latent spaces: pixels, and a tiny randomly initialised AutoencoderKL built from a config."""

import pytest
import torch

from pyraflow.config import LatentConfig
from pyraflow.latents import build_latent_space


def test_pixel_space_round_trip():
    space = build_latent_space(LatentConfig(scale=2.0, shift=0.5))
    x = torch.rand(2, 1, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(space.encode(x), (x - 0.5) * 2.0)
    torch.testing.assert_close(space.decode(space.encode(x)), x)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, scaling_factor=0.5, shift_factor=0.1)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def test_autoencoder_kl_images_and_video(tiny_vae):
    config = LatentConfig(kind="vae", path=str(tiny_vae))
    assert config.resolved_channels(3) == 4 and config.resolved_downsample() == 2
    space = build_latent_space(config)
    assert space.scale == 0.5 and space.shift == 0.1
    image = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z_image, z_video = space.encode(image), space.encode(video)
    assert z_image.shape == (2, 4, 1, 8, 8) and z_video.shape == (1, 4, 5, 8, 8)
    assert space.decode(z_video).shape == video.shape
    # scaling: latents are (mean - shift) * scale of the VAE's own posterior, frame by frame
    raw = space.vae.encode(video[:, :, 2]).latent_dist.mean
    torch.testing.assert_close(z_video[:, :, 2], (raw - 0.1) * 0.5, rtol=1e-4, atol=1e-5)


def test_bad_latent_configs(tmp_path):
    with pytest.raises(ValueError, match="needs latent.path"):
        LatentConfig(kind="vae")
    with pytest.raises(ValueError, match="no config.json"):
        LatentConfig(kind="vae", path=str(tmp_path)).resolved_channels(3)


def test_the_released_causal_vae_as_a_latent_space():
    """latent.kind=pyramid-flow-vae: the tiny released VAE's posterior means, normalised as the flux pipeline does
    (interop.vae.normalise, checked bit for bit against the reference there); frames through its 8x time."""
    from pathlib import Path

    from pyraflow.interop.vae import FIRST_FRAME, LATER_FRAMES, load_vae, normalise

    folder = Path(__file__).parent / "fixtures" / "pyramid-flow-pipeline" / "released" / "pyramid-flow-miniflux-tiny"
    (shift, scale), (video_shift, video_scale) = FIRST_FRAME["flux"], LATER_FRAMES
    config = LatentConfig(kind="pyramid-flow-vae", path=str(folder / "causal_video_vae"), scale=scale, shift=shift,
                          video_scale=video_scale, video_shift=video_shift)
    assert config.resolved_channels(3) == 16 and config.resolved_downsample() == 8
    space = build_latent_space(config)
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latent = space.encode(video)
    assert latent.shape == (1, 16, 2, 4, 4)
    mean, _ = load_vae(folder).encode(video)
    assert torch.equal(latent, normalise(mean, "flux"))
    assert space.decode(latent).shape == video.shape
    with pytest.raises(ValueError, match="needs latent.path"):
        LatentConfig(kind="pyramid-flow-vae")
    with pytest.raises(ValueError, match="needs latent.scale, shift, video_scale and video_shift"):
        LatentConfig(kind="pyramid-flow-vae", path=str(folder / "causal_video_vae"))
