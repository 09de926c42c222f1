"""Small builders and oracles shared by the tests."""

import numpy as np
import torch
import torch.nn.functional as F

from pyraflow.config import ModelConfig
from pyraflow.archs.mmdit import MultiStageMMDiT
from pyraflow.packing import Sample, pack

TEXT_DIM, POOLED_DIM, CHANNELS = 24, 12, 3


def tiny_config(**overrides) -> ModelConfig:
    base = dict(in_channels=CHANNELS, patch_size=2, width=48, depth=3, num_heads=2, text_dim=TEXT_DIM,
                pooled_dim=POOLED_DIM)
    return ModelConfig(**{**base, **overrides})


def randomised_model(seed: int = 0, **overrides) -> MultiStageMMDiT:
    """A tiny model with every weight random (the real init zeroes gates, which would hide bugs)."""
    torch.manual_seed(seed)
    model = MultiStageMMDiT(tiny_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model


def random_samples(seed: int, count: int = 7, num_stages: int = 3, frames=(1,), per_frame=False) -> list[Sample]:
    """Random stages, text lengths and timesteps; latent side 4 * 2**stage."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        stage = int(torch.randint(0, num_stages, (1,), generator=g))
        side = 4 * 2**stage
        t = frames[int(torch.randint(0, len(frames), (1,), generator=g))]
        length = int(torch.randint(1, 9, (1,), generator=g))
        timestep = torch.rand(t if per_frame else (), generator=g) * 1000
        samples.append(Sample(stage, torch.randn(CHANNELS, t, side, side, generator=g),
                              torch.randn(length, TEXT_DIM, generator=g), torch.randn(POOLED_DIM, generator=g), timestep))
    return samples


def packed(samples, model):
    """Samples packed for a model of tiny_config's shape (3 stages)."""
    cfg = model.config
    return pack(samples, num_stages=3, patch_size=cfg.patch_size, channels=cfg.in_channels, text_dim=cfg.text_dim,
                pooled_dim=cfg.pooled_dim)


def rel_err(a, b):
    """|a - b| / |b|, the tolerance measure of the packed-equals-alone tests."""
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def make_images(folder, n=5, size=(40, 30)):
    """``n`` random RGB PNGs of ``size`` (width, height) in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


# ----- attention oracles: written from the definition, not from the backends ------------------------------

def per_segment_attention(q, k, v, layout, causal):
    """Stream-ordered q/k/v (text tokens first, then visual): gather each segment's [text; visual] tokens and
    attend alone (with a causal mask from the layout's causal steps); output in the same order."""
    out = torch.empty_like(q)
    nt = layout.num_text
    for b in range(layout.num_segments):
        idx = torch.cat([torch.arange(layout.text_offsets[b], layout.text_offsets[b + 1]),
                         nt + torch.arange(layout.visual_offsets[b], layout.visual_offsets[b + 1])])
        mask = None
        if causal:
            text_len = layout.text_offsets[b + 1] - layout.text_offsets[b]
            step = torch.cat([torch.full((text_len,), -1),
                              layout.causal_index[layout.visual_offsets[b]:layout.visual_offsets[b + 1]]])
            mask = step[None, :] <= step[:, None]
        o = F.scaled_dot_product_attention(*(x[idx].transpose(0, 1) for x in (q, k, v)), attn_mask=mask)
        out[idx] = o.transpose(0, 1)
    return out


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """flash-attn's varlen contract in plain torch: sequence i is q[cu_q[i]:cu_q[i+1]] against k[cu_k[i]:cu_k[i+1]]."""
    out = []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        out.append(F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1)).transpose(0, 1))
    return torch.cat(out)


def backend_attention(backend, layout, causal, device=torch.device("cpu")):
    """A product backend for ``layout``; flash runs through ``reference_varlen`` off-GPU."""
    from pyraflow.attention import build_attention

    return build_attention(layout, backend, causal, device, varlen_kernel=reference_varlen)


def tiny_text_encoder(folder):
    """A randomly initialised 32-wide BERT with a word-level vocabulary, saved where text.encoder can load it."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "synthetic", "picture", "number"] + [str(i) for i in range(100)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    return folder


def one_rank_fsdp_bf16_run(tmp_path, steps: int = 20):
    """``pyraflow train`` under torchrun on one rank with FSDP2 in bf16, from a synthetic prepared cache of 16-channel
    latents (no VAE at hand) and a tiny local text encoder; checks it trains and records its precision."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pyraflow.bench.data import write_synthetic_cache
    from pyraflow.config import load_config
    from pyraflow.latents import build_latent_space
    from pyraflow.text import load_text_encoder

    encoder = tiny_text_encoder(tmp_path / "encoder")
    settings = [f"text.encoder={encoder}", "model.text_dim=32", "model.pooled_dim=32", "model.width=64",
                "model.depth=2", "model.num_heads=2", "latent.kind=vae", "latent.channels=16", "latent.downsample=1",
                "data.image_size=32", "model.patch_size=4", f"data.cache={tmp_path / 'cache'}", "data.text_dtype=bfloat16",
                "train.parallel=fsdp", "train.precision=bf16", f"train.steps={steps}", "train.checkpoint_every=10",
                "train.sample_every=0", "batching.token_budget=1024", "text.max_tokens=8"]
    config = load_config(None, settings)
    write_synthetic_cache(tmp_path / "cache", config, 300, load_text_encoder(config.text).identity,
                          build_latent_space(config.latent).identity)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "pyraflow",
               "train", "--quiet", "--out", str(run), *[a for s in settings for a in ("--set", s)]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert json.loads((run / "summary.json").read_text())["precision"] == "bf16"
    assert (run / "checkpoints" / f"step-{steps}" / "optimizer.safetensors").is_file()
    return result


def check_split_models(out, extra: list[str] = ()) -> list[dict]:
    """Run tests/train/torchrun_sequence.py's ``models`` check on two ranks (gloo on the CPU, NCCL where each rank has
    a GPU) and assert what it measured: every architecture split over the two ranks gives the whole model's output,
    and gradients summed over the group, within 1e-5 of their size; each rank keeps under 0.6 of the activations."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "train" / "torchrun_sequence.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(out), "models", *extra]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert set(report) == {"mmdit", "flux", "mmdit-sd3"}
        for arch in report.values():
            assert arch["history"] > 0 and arch["forward"] < 1e-5 and arch["backward"] < 1e-5, report
            assert arch["saved_ratio"] < 0.6, report
    return reports
