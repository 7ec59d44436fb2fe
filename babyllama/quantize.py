"""Weight-only int8 for decoding: every linear layer and the output projection keep one int8 weight per
entry and one scale per output channel (a quarter of float32's bytes); activations stay in floating point
(bfloat16 into the matmul). Decoding one token at a time is bound by reading the weights, so reading a
quarter of them is faster (BENCHMARKS.md). The matmul is PyTorch's weight-only int8 kernel
(`torch._weight_int8pack_mm`: CPUs, CUDA and Apple GPUs).

    left_float = quantize_int8(model)      # in place; for inference only

The kernel is only used where it is right: with an input width that is not a multiple of 32 its CPU
versions return wrong numbers or crash the process, so such layers keep their float weights.
"""
from __future__ import annotations

import torch
from torch import nn

KERNEL_WIDTH = 32  # the input widths the int8 kernel handles are multiples of this
ROUNDING_MARGIN = 2**-6  # relative: four times bfloat16's rounding of two values, the margin of a possible tie


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 rows times a bfloat16 scale per row (symmetric, per channel)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        if self.in_features % KERNEL_WIDTH:
            raise ValueError(f"int8 needs an input width that is a multiple of {KERNEL_WIDTH}, not {self.in_features}")
        # The scale is rounded up to bfloat16, so that no weight needs more than 127 steps.
        scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127 * (1 + 2**-8)).to(torch.bfloat16)
        steps = torch.round(weight / scale.float()[:, None]).clamp(-127, 127)
        self.register_buffer("weight_int8", steps.to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits (B, out) of hidden states h (B, in), for decoding. The kernel rounds its results
        to bfloat16, where near neighbours tie exactly: every logit close enough to its row's largest to
        be the largest before rounding is recomputed in float32 (the kernel's own products, summed without
        the final rounding), so rounding never decides which id is likeliest."""
        logits = self(h.float()).float()
        top = logits.amax(-1, keepdim=True)
        rows, ids = (logits >= top - ROUNDING_MARGIN * (top.abs() + 1)).nonzero(as_tuple=True)
        if len(ids) == len(logits):  # one candidate a row, its largest: rounding decides nothing
            return logits
        weights = self.weight_int8[ids].float() * self.scale[ids].float()[:, None]  # (K, in)
        exact = (weights * h.to(torch.bfloat16).float()[rows]).sum(-1)
        return logits.index_put((rows, ids), exact)

    def dequantized(self) -> torch.Tensor:
        """The weight the layer multiplies by, in float32 (for checks)."""
        return self.weight_int8.float() * self.scale.float()[:, None]


def quantize_int8(model: nn.Module) -> list[str]:
    """Replace every nn.Linear of model (the output projection included; the tied embedding keeps its
    float weights for the lookup) by an Int8Linear, except those whose input width the kernel does not
    handle; returns the names of those, left float. In place; puts the model in eval mode."""
    left_float = []
    for prefix, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                if child.in_features % KERNEL_WIDTH:
                    left_float.append(f"{prefix}.{name}" if prefix else name)
                else:
                    setattr(module, name, Int8Linear(child.weight))
    model.eval()
    return left_float
