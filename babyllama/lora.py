"""LoRA: low-rank adapters on chosen linear layers of model.py, trained while the rest stays frozen,
saved on their own, and merged back into a plain checkpoint with the seed's state-dict names."""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) * B(A(dropout(x))), with B zero at start so training starts from base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        w = self.base.weight
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
            linear.weight.copy_((w.float() + delta).to(w.dtype))
        return linear


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], dropout: float = 0.0) -> int:
    """Wrap every linear layer whose name ends in one of targets (e.g. wq, wv, w1) and freeze every
    other parameter. Returns the number of wrapped layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    if wrapped == 0:
        raise ValueError(f"no linear layer is named one of {targets} (try wq, wk, wv, wo, w1, w2, w3)")
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: small enough to keep many of."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if ".lora_" in k}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain Linear with the adapter added in; the state dict then has
    the seed's names again."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def base_of(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by the linear layer under it (the adapters dropped): the base model."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.base)
    return model
