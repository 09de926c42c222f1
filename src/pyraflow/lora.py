"""Low-rank adapters through peft: injected into a model with everything else frozen, counted, folded back.

A LoRA run's checkpoints hold only the adapters (and their EMA); the base is read again from train.init_from
(pyraflow.archs.training_model), so a resume and sampling rebuild the same model. ``merge_adapters`` folds them
into the base weights for export.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pyraflow.config import LoraConfig

# The attention projections of each architecture (q, k, v and output of both streams), peft's name endings.
DEFAULT_TARGETS = {
    "mmdit": ["qkv", "proj"],
    "flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    "mmdit-sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
}
ADAPTER = "lora_"  # every adapter tensor's name has it (lora_A, lora_B)


def add_adapters(model: nn.Module, lora: LoraConfig) -> None:
    """Inject adapters in place (peft) and freeze everything else."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    targets = lora.targets or DEFAULT_TARGETS[model.config.arch]
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not any(name == t or name.endswith("." + t) for name in names for t in targets):
        raise ValueError(f"train.lora.targets={targets} names no linear layer of model.arch={model.config.arch!r}; "
                         f"its layers end in e.g. {sorted({n.rsplit('.', 1)[-1] for n in names})[:8]}.")
    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, target_modules=targets,
                            lora_dropout=lora.dropout)
    inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(ADAPTER in name)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain layer back: the model of the merged weights, with
    the architecture's own parameter names."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    model.requires_grad_(True)
    return model


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def adapter_norm(model: nn.Module) -> float:
    """Sum of |lora_B| (zero at the start: peft initialises B to zero, so the adapted model starts as the base)."""
    return float(sum(p.abs().sum() for name, p in model.named_parameters() if "lora_B" in name))
