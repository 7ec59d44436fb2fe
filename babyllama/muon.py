"""Muon for the transformer's weight matrices, AdamW for everything else, in one optimizer.

Muon (Keller Jordan, 2024) keeps a momentum of each matrix's gradient and steps along its nearest
semi-orthogonal matrix (all singular values ~1), found by a few Newton-Schulz iterations: every
direction of the update moves as much, instead of the few largest ones dominating. The step is scaled
to the RMS an AdamW step would have (0.2 * sqrt(max(rows, cols))), so `--lr` and `--weight_decay` mean
the same for both kinds of parameter. Embeddings, the output layer, norms and biases stay on AdamW.

The iterations run in float32 by default: a bfloat16 matmul is far slower than float32 on CPUs without
native bf16 instructions. Where training runs in bfloat16, they may too (`--muon_dtype=auto`), as the GPU
records run them: the iteration only needs the singular values near 1, not exact.

NorMuon (Li et al., 2025, arXiv:2510.05491; `normalize_rows`) then divides each row of the step (one output
neuron's weights) by the running RMS of that row's steps, so that no neuron keeps moving more than the others
while the matrix's step keeps its size.
"""
from __future__ import annotations

import math

import torch

# Each iteration maps every singular value s to a s + b s^3 + c s^5. Muon's own quintic, the same five times, is
# tuned for speed over exactness; Polar Express (Amsel et al., 2025, arXiv:2505.16932) picks each iteration's
# polynomial to be minimax-optimal for the interval the singular values can be in at that point, and starts
# from a gradient scaled a little below norm 1 (its safety factor).
ITERATIONS = {
    "jordan": (1.0, ((3.4445, -4.7750, 2.0315),) * 5),
    "polar_express": (1.02, ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                             (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                             (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                             (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                             (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))),
}


def orthogonalize(grad: torch.Tensor, iterations: str = "jordan", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An approximation of U V^T where grad = U S V^T: singular values end near 1 (with "jordan" between
    about 0.7 and 1.2, with "polar_express" closer). The iterations' matmuls run in dtype."""
    safety, polynomials = ITERATIONS[iterations]
    x = grad.float()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = (x / (x.norm() * safety + 1e-7)).to(dtype)  # spectral norm <= Frobenius norm <= 1: the iteration's basin
    for a, b, c in polynomials:
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G G) x
    return (x.T if tall else x).to(grad.dtype)


def momentum_at(step: int, warmup_steps: int, start: float = 0.85, end: float = 0.95) -> float:
    """Muon's momentum at optimizer step `step` (from 0): rising linearly from start to end over
    warmup_steps, as the GPU records warm it up (an early gradient says little about later ones), then end."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def normalize_rows(step: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon's rescaling: second_moment (rows, 1), updated in place, is the running mean of each row's mean
    square; each row is divided by its root, then the whole step scaled back to the Frobenius norm it had."""
    rows = step.float()
    second_moment.lerp_(rows.square().mean(dim=1, keepdim=True), 1 - beta2)
    scaled = rows * second_moment.clamp_min(1e-20).rsqrt()
    return (scaled * (rows.norm() / scaled.norm().clamp_min(1e-20))).to(step.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Groups with muon=True take Muon steps (momentum, Nesterov), the others AdamW steps; lr,
    weight_decay and betas as torch.optim.AdamW; ns_dtype: the Newton-Schulz iterations' matmuls;
    normalize_rows: NorMuon's rows, their running mean square kept with betas[1]. One optimizer, so
    checkpoints and resumes are unchanged."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], weight_decay: float = 0.0,
                 momentum: float = 0.95, eps: float = 1e-8, iterations: str = "jordan",
                 ns_dtype: torch.dtype = torch.float32, normalize_rows: bool = False):
        if iterations not in ITERATIONS:
            raise ValueError(f"unknown Newton-Schulz iterations {iterations!r}; expected one of "
                             f"{', '.join(ITERATIONS)}")
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "momentum": momentum, "eps": eps,
                    "muon": False, "iterations": iterations}
        super().__init__(groups, defaults)
        self.ns_dtype, self.normalize_rows = ns_dtype, normalize_rows
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon steps only matrices")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["muon"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        momentum = state["momentum"]
        momentum.lerp_(p.grad, 1 - group["momentum"])
        direction = orthogonalize(p.grad.lerp(momentum, group["momentum"]), group["iterations"],
                                   self.ns_dtype)  # Nesterov
        if self.normalize_rows:
            if "row_second_moment" not in state:
                state["row_second_moment"] = torch.zeros(p.shape[0], 1, device=p.device)
            direction = normalize_rows(direction, state["row_second_moment"], group["betas"][1])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))
