"""Initial weights: every parameter drawn by its kind from a generator of its own, so a sharded run that fills each
rank's rows from ``initial_value`` holds exactly the single-process model."""

import math

import pytest
import torch
import torch.nn as nn

from pyraflow.archs import build_model, parameters_on_meta
from pyraflow.config import ModelConfig

ARCHS = [ModelConfig(width=64, depth=2, num_heads=2),
         ModelConfig(arch="mmdit-sd3", width=64, depth=2, num_heads=2),
         ModelConfig(arch="flux", width=64, depth=1, single_depth=1, num_heads=2, patch_size=2)]


@pytest.mark.parametrize("config", ARCHS, ids=lambda c: c.arch)
def test_a_model_built_on_meta_gives_every_tensor_of_the_built_one(config):
    torch.manual_seed(5)
    built = build_model(config)
    torch.manual_seed(5)
    with parameters_on_meta():
        empty = build_model(config)
    names = [name for name, _ in built.named_parameters()]
    assert names == [name for name, _ in empty.named_parameters()] and set(built.init_kinds()) == set(names)
    for name, parameter in reversed(list(built.named_parameters())):  # any order, any subset: a rank's own tensors
        assert torch.equal(empty.initial_value(name), parameter.detach()), name
    drawn = next(name for name, kind in built.init_kinds().items() if kind == "xavier")
    torch.manual_seed(6)  # another seed, other weights
    assert not torch.equal(build_model(config).get_parameter(drawn), built.get_parameter(drawn))

def xavier_bound(layer: nn.Module) -> float:
    weight = layer.weight
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    return math.sqrt(6 / (fan_in + fan_out))


def test_each_kind_follows_its_formula():
    """Against the formulas, from the layers' own shapes: Xavier-uniform U(-a, a) with a = sqrt(6 / (fan_in + fan_out))
    (std a / sqrt(3)), normal(0, 0.02) conditioning MLPs, zero adaLN and output layers, unit norm scales."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=256, depth=2, num_heads=4))
    qkv = model.blocks[0].visual.qkv
    bound = xavier_bound(qkv)
    assert qkv.weight.abs().max() <= bound and qkv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    assert not qkv.bias.any()
    conditioning = model.time_mlp[0].weight
    assert conditioning.std().item() == pytest.approx(0.02, rel=0.02) and abs(conditioning.mean().item()) < 1e-3
    for layer in (model.visual_out, model.final_modulation, model.blocks[1].text.modulation):
        assert not layer.weight.any() and not layer.bias.any()
    norms = [p for name, p in model.named_parameters() if "norm" in name]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    assert not torch.equal(model.blocks[0].visual.qkv.weight, model.blocks[1].visual.qkv.weight)


def test_the_patch_convolution_is_xavier_over_its_flattened_view():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="mmdit-sd3", width=256, depth=1, num_heads=4))
    conv = model.pos_embed.proj
    bound = xavier_bound(conv)  # fan_in = in_channels * k * k, as xavier_uniform_ on weight.view(out, -1)
    assert conv.weight.abs().max() <= bound
    assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
