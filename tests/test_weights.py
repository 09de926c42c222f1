"""Model directories (pyraflow.weights): one file or shards with an index, streamed back in order and in full; every
way a directory can be damaged is a named error; no other module spells a weight file's name."""

import ast
import json
from pathlib import Path

import pytest
import torch

import pyraflow
from pyraflow import weights
from pyraflow.archs import build_model, load_model
from pyraflow.config import ModelConfig
from pyraflow.weights import MODEL, index_name, read_model_config, read_tensors, weight_files, write_weights


def tensors(n: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(16, 8, generator=generator) for i in range(n)}


def test_shards_hold_every_tensor_once_and_read_back_equal(tmp_path):
    state = tensors()
    one_tensor = next(iter(state.values())).numel() * 4
    write_weights(iter(state.items()), tmp_path / "sharded", MODEL, shard_bytes=int(2.5 * one_tensor))
    files = weight_files(tmp_path / "sharded", MODEL)
    index = json.loads((tmp_path / "sharded" / index_name(MODEL)).read_text())
    assert len(files) == 4 and not (tmp_path / "sharded" / MODEL).exists()
    assert [f.name for f in files] == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(index["weight_map"]) == sorted(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    back = dict(read_tensors(files))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # each shard holds exactly the tensors the index assigns to it
    for file in files:
        assert {k for k, v in index["weight_map"].items() if v == file.name} == set(dict(read_tensors([file])))
    write_weights(iter(state.items()), tmp_path / "single", MODEL, shard_bytes=10 * 2**20)
    assert weight_files(tmp_path / "single") == [tmp_path / "single" / MODEL]


def test_read_tensors_casts_one_tensor_at_a_time(tmp_path):
    state = tensors(3)
    write_weights(iter(state.items()), tmp_path, MODEL)
    read = read_tensors(weight_files(tmp_path), torch.bfloat16)
    name, first = next(read)  # a generator: the first tensor arrives before the others are read
    assert first.dtype == torch.bfloat16 and torch.equal(first, state[name].to(torch.bfloat16))


def test_a_model_directory_round_trips_in_bf16(tmp_path):
    config = ModelConfig(in_channels=1, width=32, depth=2, num_heads=2, text_dim=16, pooled_dim=16)
    model = build_model(config)
    weights.save_model(config, model.state_dict(), tmp_path, dtype=torch.bfloat16)
    loaded = load_model(tmp_path)
    assert loaded.config == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16).float()), name


def test_damaged_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        weight_files(tmp_path)
    (tmp_path / MODEL).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model.safetensors cannot be read as safetensors.*corrupt"):
        weights.load_tensors(tmp_path / MODEL)
    (tmp_path / index_name(MODEL)).write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors.*missing"):
        weight_files(tmp_path)
    (tmp_path / index_name(MODEL)).write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        weight_files(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"width": 32, "colour": "red"}))
    with pytest.raises(ValueError, match="unknown model fields \\['colour'\\]"):
        read_model_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"width": 32, "modulation": "per-token"}))
    with pytest.raises(ValueError, match="modulation.*no longer a setting"):
        read_model_config(tmp_path / "config.json")


def test_a_retired_field_at_its_only_value_is_dropped(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"width": 32, "modulation": "broadcast"}))
    assert read_model_config(tmp_path / "config.json") == {"width": 32}


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    weights.save_tensors({"a": torch.ones(2)}, tmp_path / MODEL)
    with pytest.raises(Exception):
        weights.save_tensors({"a": torch.ones(2), "b": "not a tensor"}, tmp_path / MODEL)
    assert torch.equal(weights.load_tensors(tmp_path / MODEL)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [MODEL]



def test_a_streamed_file_reads_back_as_safetensors_wrote_it(tmp_path):
    """The streamed writer's file (header from the specs, tensors appended one by one) is read by safetensors'
    own reader: every dtype a checkpoint holds, a scalar (AdamW's step), an empty and a non-contiguous tensor."""
    from safetensors.torch import load_file

    generator = torch.Generator().manual_seed(0)
    written = {"w": torch.randn(5, 3, generator=generator), "half": torch.randn(7, generator=generator).bfloat16(),
               "f16": torch.randn(2, 2, generator=generator).half(), "step": torch.tensor(12.0),
               "index": torch.arange(5), "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4),
               "strided": torch.randn(4, 6, generator=generator).t(), "f64": torch.randn(3, dtype=torch.float64)}
    sent = []

    def one_at_a_time():
        for tensor in written.values():
            sent.append(tensor)
            yield tensor

    weights.stream_tensors([(k, v.shape, v.dtype) for k, v in written.items()], one_at_a_time(), tmp_path / MODEL)
    back = load_file(str(tmp_path / MODEL))
    assert list(back) == list(written) and len(sent) == len(written)
    for name, tensor in written.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_a_streamed_write_that_fails_leaves_the_previous_file(tmp_path):
    weights.save_tensors({"a": torch.ones(2)}, tmp_path / MODEL)
    specs = [("a", torch.Size([2]), torch.float32), ("b", torch.Size([3]), torch.float32)]
    with pytest.raises(ValueError, match="b: got"):  # a tensor that is not what the header promised
        weights.stream_tensors(specs, iter([torch.zeros(2), torch.zeros(4)]), tmp_path / MODEL)
    with pytest.raises(ValueError):  # fewer tensors than the header lists
        weights.stream_tensors(specs, iter([torch.zeros(2)]), tmp_path / MODEL)
    assert torch.equal(weights.load_tensors(tmp_path / MODEL)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [MODEL]

def weight_file_literals() -> list[str]:
    """String constants in the package (outside pyraflow.weights) that are a whole weight-file name."""
    package = Path(pyraflow.__file__).parent
    found = []
    for path in package.rglob("*.py"):
        if path.name == "weights.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "\n" not in node.value \
                    and node.value.endswith(".safetensors") and not node.value.startswith("."):
                found.append(f"{path.relative_to(package)}: {node.value!r}")
    return found


def test_no_module_but_weights_spells_a_weight_file_name():
    assert weight_file_literals() == []
