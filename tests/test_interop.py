"""The released Pyramid Flow transformers: the reference's recorded outputs (tests/fixtures/pyramid-flow, made by the
reference's own code on randomised tiny models) reproduced by pyraflow's packed path, and conversion both ways."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pyraflow import convert, interop
from pyraflow.archs import load_model
from pyraflow.weights import MODEL, REFERENCE, index_name
from pyraflow.archs.sd3 import sincos_table
from pyraflow.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "pyramid-flow"
VARIANTS = ("flux", "mmdit")
CASES = ("image-3stage", "video-3stage", "video-history")


def case(variant: str, name: str):
    description = json.loads((FIXTURES / variant / f"case-{name}.json").read_text())
    # aligned copies: safetensors hands out views at arbitrary alignment (see the fixtures' README)
    tensors = {k: v.clone() for k, v in load_file(str(FIXTURES / variant / f"case-{name}.safetensors")).items()}
    sample = [[tensors[name] for name in column] for column in description["sample_nesting"]]
    inputs = (sample, tensors["encoder_hidden_states"], tensors["encoder_attention_mask"], tensors["pooled_projections"],
              tensors["timestep_ratio"])
    return inputs, [tensors[f"output.{c}"] for c in range(len(sample))], description


@pytest.mark.parametrize("backend", ["grouped", "flex", "flash"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_forward_reproduces_the_recorded_outputs(variant, backend, flash_on_cpu, parity):
    model = load_model(FIXTURES / variant / "model", attention=backend).eval()
    for name in CASES:
        inputs, expected, description = case(variant, name)
        with torch.no_grad():
            outputs = interop.reference_forward(model, *inputs)
        assert len(outputs) == len(expected)
        for c, (out, ref) in enumerate(zip(outputs, expected)):
            # the reference's own fp32-vs-fp64 gap is ~2e-6; the smallest output change of a wrong mask is 2.4e-3
            parity(f"transformer {variant} {name} ({backend})", out, ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropping_the_reference_semantics_breaks_parity(variant):
    """The fixtures can tell: text that cannot see the first frame, or history conditioned on its own timestep,
    change the outputs well beyond the tolerance."""
    model = load_model(FIXTURES / variant / "model", attention="grouped").eval()
    inputs, expected, _ = case(variant, "video-3stage")
    model.text_step = -1  # pyraflow's own rule: text sees only text
    with torch.no_grad():
        outputs = interop.reference_forward(model, *inputs)
    assert max((o - e).abs().max().item() for o, e in zip(outputs, expected)) > 1e-3


def test_history_follows_the_current_timestep():
    """The reference has one timestep per row: a history clip's own noise level must not change the output."""
    model = load_model(FIXTURES / "flux" / "model", attention="grouped").eval()
    (sample, text, mask, pooled, timestep), _, _ = case("flux", "video-history")
    samples = interop.reference_samples(sample, text, mask, pooled, timestep)
    from pyraflow.packing import pack, unpack

    def run(history_timestep):
        for s in samples:
            for part in s.history:
                part.timestep = history_timestep
        with torch.no_grad():
            return unpack(model(pack(samples, 1, 2)), pack(samples, 1, 2).layout)

    a, b = run(0.0), run(900.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_sd3_position_table_matches_the_stored_buffer():
    config = json.loads((FIXTURES / "mmdit" / "model" / "config.json").read_text())
    stored = load_file(str(FIXTURES / "mmdit" / "model" / "diffusion_pytorch_model.safetensors"))["pos_embed.pos_embed"]
    width = config["num_attention_heads"] * config["attention_head_dim"]
    table = sincos_table(width, config["pos_embed_max_size"], config["sample_size"] // config["patch_size"])
    assert torch.allclose(table[None], stored, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_then_import_gives_bit_identical_weights_and_the_reference_config(variant, tmp_path):
    released = FIXTURES / variant / "model"
    assert main(["convert", "--from", "pyramid-flow", str(released), "--out", str(tmp_path / "pf")]) == 0
    assert main(["convert", "--to", "pyramid-flow", str(tmp_path / "pf"), "--out", str(tmp_path / "ref")]) == 0
    # sharded export (a shard per few tensors), read back through the index
    assert main(["convert", "--to", "pyramid-flow", str(tmp_path / "pf"), "--out", str(tmp_path / "shards"),
                 "--shard-gb", "0.0005"]) == 0
    assert (tmp_path / "shards" / index_name(REFERENCE)).is_file()
    assert main(["convert", "--from", "pyramid-flow", str(tmp_path / "shards"), "--out", str(tmp_path / "pf2")]) == 0
    original = load_file(str(released / REFERENCE))
    for weights in (tmp_path / "ref" / REFERENCE, tmp_path / "pf2" / MODEL):
        again = load_file(str(weights))
        assert again.keys() == original.keys()
        assert all(torch.equal(again[k], original[k]) for k in original)
    exported = json.loads((tmp_path / "ref" / "config.json").read_text())
    recorded = json.loads((released / "config.json").read_text())
    exported.pop("_diffusers_version"), recorded.pop("_diffusers_version")
    recorded.pop("max_num_frames", None), exported.pop("max_num_frames", None)  # unused by the sd3 model
    assert exported == recorded


def test_a_converted_checkpoint_loads_to_the_same_outputs(tmp_path):
    convert.import_reference(FIXTURES / "mmdit" / "model", tmp_path / "pf", dtype=torch.bfloat16)
    released = load_model(FIXTURES / "mmdit" / "model").eval()
    converted = load_model(tmp_path / "pf").eval()
    inputs, _, _ = case("mmdit", "image-3stage")
    with torch.no_grad():
        a = interop.reference_forward(released, *inputs)
        b = interop.reference_forward(converted, *inputs)
    # the bf16 copy rounds the weights: close, not equal
    assert all(0 < (x - y).abs().max() < 0.1 for x, y in zip(a, b))


def test_bad_folders_are_named(tmp_path):
    folder = tmp_path / "released"
    shutil.copytree(FIXTURES / "flux" / "model", folder)
    config = json.loads((folder / "config.json").read_text())

    def write(**changes):
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    write(_class_name="UNet2DModel")
    with pytest.raises(ValueError, match="not a Pyramid Flow transformer"):
        convert.import_reference(folder, tmp_path / "out")
    write(num_layers=2)
    with pytest.raises(ValueError, match="missing \\['transformer_blocks.1"):
        convert.import_reference(folder, tmp_path / "out")
    write(patch_size=2)
    with pytest.raises(ValueError, match="only works with 1"):
        convert.import_reference(folder, tmp_path / "out")
    write()
    (folder / REFERENCE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="damaged|cannot be read"):
        load_model(folder)
    (folder / REFERENCE).unlink()
    (folder / index_name(REFERENCE)).write_text(json.dumps({"weight_map": {"x": "part-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="part-1.safetensors"):
        load_model(folder)
    assert not (tmp_path / "out" / MODEL).exists()  # nothing half-written
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        convert.export_reference(tmp_path, tmp_path / "x")
