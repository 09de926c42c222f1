"""The reference's annotation jsonl as training data, and fine-tuning a converted fixture model on it (full and
LoRA), exported back to the reference's folder layout."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pyraflow.cli import main
from pyraflow.config import load_config
from pyraflow.data.pyramid_flow import PyramidFlowAnnotations
from pyraflow.train import run_training

FIXTURES = Path(__file__).parent.parent / "fixtures" / "pyramid-flow"
CHANNELS, TEXT_DIM, POOLED_DIM = 4, 32, 16  # the flux fixture model's: 16 = 4 latent channels x 2 x 2


def write_annotations(root: Path, bad: bool = True) -> Path:
    """A jsonl in the reference's layout: video rows with latents [1, C, T, H, W] and text-feature dicts (at three
    latent shapes), an image row with its features, and, with ``bad``, rows the reader must skip."""
    g = torch.Generator().manual_seed(0)
    rows = []
    shapes = [(1, 8, 8), (1, 8, 16), (3, 8, 8)] * 4
    for i, (t, h, w) in enumerate(shapes):
        latent, features = f"latents/{i}-latent.pt", f"text_feature/{i}-text.pt"
        (root / "latents").mkdir(parents=True, exist_ok=True)
        (root / "text_feature").mkdir(parents=True, exist_ok=True)
        torch.save(torch.randn(1, CHANNELS, t, h, w, generator=g).to(torch.bfloat16), root / latent)
        length = 2 + i % 5
        mask = torch.zeros(1, 8, dtype=torch.long)
        mask[0, :length] = 1
        torch.save({"prompt_embed": torch.randn(1, 8, TEXT_DIM, generator=g), "prompt_attention_mask": mask,
                    "pooled_prompt_embed": torch.randn(1, POOLED_DIM, generator=g)}, root / features)
        kind = {"video": f"videos/{i}.mp4"} if t > 1 else {"image": f"images/{i}.jpg"}
        rows.append({**kind, "text": f"caption {i}", "latent": latent, "text_fea": features})
    if bad:
        torch.save(torch.randn(1, CHANNELS + 1, 1, 8, 8), root / "latents" / "wrong.pt")
        rows += [{"video": "v.mp4", "text": "missing file", "latent": "latents/nope.pt", "text_fea": "text_feature/0-text.pt"},
                 {"video": "v.mp4", "text": "wrong channels", "latent": "latents/wrong.pt", "text_fea": "text_feature/0-text.pt"},
                 {"image": "i.jpg", "text": "no features extracted"}]
    path = root / "annotation" / "video_text.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    return path


def finetune_config(annotations: Path, init_from: Path, *extra: str):
    return load_config(None, [
        "data.dataset=pyramid-flow", f"data.path={annotations}", f"data.root={annotations.parent.parent}",
        "data.max_bad_fraction=0.5", "data.workers=0", "text.encoder=prepared", "text.max_tokens=8",
        "latent.kind=vae", f"latent.channels={CHANNELS}", "latent.downsample=8", "latent.scale=0.5", "latent.shift=0.1",
        "latent.video_scale=0.25", "latent.video_shift=-0.2",
        "model.arch=flux", f"model.in_channels={CHANNELS}", "model.patch_size=2", "model.width=128", "model.depth=1",
        "model.single_depth=1", "model.num_heads=2", f"model.text_dim={TEXT_DIM}", f"model.pooled_dim={POOLED_DIM}",
        "model.temporal_causal=true", "batching.token_budget=600", "train.steps=3", "train.warmup_steps=1",
        "train.log_every=1", "train.checkpoint_every=3", "train.sample_every=0", "train.ema_decay=0.5",
        "train.ema_warmup_steps=0", f"train.init_from={init_from}", *extra])


def test_rows_are_read_as_they_are_and_bad_ones_skipped_and_counted(tmp_path, caplog):
    annotations = write_annotations(tmp_path)
    config = finetune_config(annotations, FIXTURES / "flux" / "model")
    data = PyramidFlowAnnotations(config)
    assert len(data) == 12 and data.skipped == 4
    reasons = " ".join(reason for _, reason in data.bad)
    assert "missing" in reasons and "expected [1, 4, T, H, W]" in reasons and "extract them" in reasons
    assert "not JSON" in reasons
    assert "skipped video_text.jsonl:13" in caplog.text
    assert data.shapes == [(1, 8, 8), (1, 8, 16), (3, 8, 8)] and data.pool_sizes == [4, 4, 4]
    assert [b.name for b in data.buckets(8)] == ["64x64", "64x128", "64x64x3"]
    # latents normalised as the reference does: the first frame with (shift, scale), later frames with the video ones
    video = next(i for i in range(len(data)) if data.rows[i].shape[0] == 3)
    raw = torch.load(data.rows[video].latent)[0].float()
    latent = data.latent(video)
    assert torch.allclose(latent[:, :1], (raw[:, :1] - 0.1) * 0.5) and torch.allclose(latent[:, 1:], (raw[:, 1:] + 0.2) * 0.25)
    tokens, pooled = data.text(0)
    features = torch.load(data.rows[0].text_features)
    assert torch.equal(tokens, features["prompt_embed"][0][features["prompt_attention_mask"][0].bool()])
    assert torch.equal(pooled, features["pooled_prompt_embed"][0])


def test_too_many_bad_rows_is_an_error(tmp_path):
    annotations = write_annotations(tmp_path)
    with pytest.raises(ValueError, match="unusable .*data.max_bad_fraction"):
        PyramidFlowAnnotations(finetune_config(annotations, FIXTURES / "flux" / "model", "data.max_bad_fraction=0.1"))


def test_a_converted_fixture_fine_tunes_and_exports_back(tmp_path):
    annotations = write_annotations(tmp_path)
    base = tmp_path / "converted"
    assert main(["convert", "--from", "pyramid-flow", str(FIXTURES / "flux" / "model"), "--out", str(base)]) == 0
    run = tmp_path / "run"
    run_training(finetune_config(annotations, base), run, progress=False)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss"] == m["loss"] for m in metrics)
    trained = load_file(str(run / "checkpoints" / "latest" / "model.safetensors"))
    start = load_file(str(base / "model.safetensors"))
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # it trained from the released weights
    assert main(["convert", "--to", "pyramid-flow", str(run), "--raw", "--out", str(tmp_path / "export")]) == 0
    exported = load_file(str(tmp_path / "export" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["_class_name"] == "PyramidFluxTransformer"


def test_lora_trains_only_the_adapters_resumes_exactly_and_merges(tmp_path):
    annotations = write_annotations(tmp_path, bad=False)
    released = FIXTURES / "flux" / "model"
    lora = ["train.lora.rank=4", "train.lora.alpha=8", "train.lr=1e-2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(finetune_config(annotations, released, *lora, "train.steps=4", "train.checkpoint_every=2"), straight,
                 progress=False)
    run_training(finetune_config(annotations, released, *lora, "train.steps=4", "train.checkpoint_every=2"), resumed,
                 progress=False, max_steps=2)
    run_training(finetune_config(annotations, released, *lora, "train.steps=4", "train.checkpoint_every=2"), resumed,
                 progress=False, resume=True)
    adapters = load_file(str(straight / "checkpoints" / "latest" / "model.safetensors"))
    assert adapters and all("lora_" in name for name in adapters)  # checkpoints hold the adapters only
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapters.items())  # B starts at zero: it moved
    again = load_file(str(resumed / "checkpoints" / "latest" / "model.safetensors"))
    assert all(torch.equal(adapters[k], again[k]) for k in adapters)  # exact resume
    # merged: the base changes only where adapters sit, by exactly B @ A * alpha / rank
    assert main(["convert", "--merge-lora", str(straight), "--raw", "--out", str(tmp_path / "merged")]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(released / "diffusion_pytorch_model.safetensors"))
    assert merged.keys() == base.keys()
    for name in base:
        stem = name.removesuffix(".weight")
        if f"{stem}.lora_A.default.weight" in adapters:
            delta = adapters[f"{stem}.lora_B.default.weight"] @ adapters[f"{stem}.lora_A.default.weight"] * (8 / 4)
            assert torch.allclose(merged[name], base[name] + delta, atol=1e-6)
        else:
            assert torch.equal(merged[name], base[name]), name
    assert main(["convert", "--to", "pyramid-flow", str(straight), "--merge-lora", "--raw",
                 "--out", str(tmp_path / "merged-ref")]) == 0
    exported = load_file(str(tmp_path / "merged-ref" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[k], merged[k]) for k in merged)
