"""Weight-only int8 for decoding: every linear layer and the output projection keep one int8 weight per
entry and one scale per output channel (a quarter of float32's bytes); activations stay in floating point
(bfloat16 into the matmul). Decoding one token at a time is bound by reading the weights, so reading a
quarter of them is faster (BENCHMARKS.md). The matmul is PyTorch's weight-only int8 kernel
(`torch._weight_int8pack_mm`: CPUs, CUDA and Apple GPUs).

    model = quantize_int8(model)      # in place; for inference only
"""
from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 rows times a bfloat16 scale per row (symmetric, per channel)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        # The scale is rounded up to bfloat16, so that no weight needs more than 127 steps.
        scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127 * (1 + 2**-8)).to(torch.bfloat16)
        steps = torch.round(weight / scale.float()[:, None]).clamp(-127, 127)
        self.register_buffer("weight_int8", steps.to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight the layer multiplies by, in float32 (for checks)."""
        return self.weight_int8.float() * self.scale.float()[:, None]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of model (the output projection included; the tied embedding keeps its
    float weights for the lookup) by an Int8Linear. In place; for inference only."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, Int8Linear(child.weight))
    return model.eval()
