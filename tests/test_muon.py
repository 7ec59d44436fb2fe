import io

import pytest
import torch

from babyllama.distributed import Dist
from babyllama.errors import UsageError
from babyllama.muon import ITERATIONS, MuonAdamW, momentum_at, normalize_rows, orthogonalize
from babyllama.trainer import TrainConfig, Trainer, make_optimizer
from model import ModelArgs, Transformer

ARGS = dict(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=16, multiple_of=16)


def fresh_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**ARGS))


def batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (n, 16), generator=g)
    return x, torch.roll(x, -1, 1)


def loss_fn(model, b):
    return model(b[0], b[1])[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("iterations", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_orthogonalize_brings_every_singular_value_near_one(shape, iterations, dtype):
    g = torch.Generator().manual_seed(0)
    # A badly conditioned gradient: singular values from 1e-3 to 10.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g))
    k = min(shape)
    s = torch.logspace(-3, 1, k)
    grad = u[:, :k] @ torch.diag(s) @ v[:k, :]
    out = orthogonalize(grad, iterations, dtype)
    assert out.shape == grad.shape and out.dtype == grad.dtype
    sv = torch.linalg.svdvals(out)
    # Every direction at least 1% of the largest ends between about 0.7 and 1.2 (the quintic trades exactness
    # for speed); the tiniest stay smaller after 5 steps.
    assert sv[s.flip(0) >= 0.1].min() > 0.6 and sv.max() < 1.25
    # The same singular vectors: U^T out V is diagonal (out = U f(S) V^T), and f never falls to zero.
    core = u[:, :k].T @ out @ v[:k, :].T
    # In bfloat16 (8 bits of mantissa) the directions end mixed by several percent, and those under a
    # thousandth of the largest are lost in the rounding.
    mixed = (core - torch.diag(core.diag())).norm() / core.norm()
    kept = s >= (0.0 if dtype == torch.float32 else 0.1)
    assert mixed < (1e-4 if dtype == torch.float32 else 0.15) and bool((core.diag()[kept] > 0.01).all())


def test_polar_express_ends_nearer_one_than_muons_quintic():
    """On a gradient of singular values from 0.01 to 1 (relative), Polar Express ends them between about 0.86 and
    1.14, where Muon's quintic leaves them anywhere between about 0.68 and 1.2."""
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    grad = u @ torch.diag(torch.logspace(-2, 0, 64)) @ u.T
    spread = {it: (torch.linalg.svdvals(orthogonalize(grad, it)) - 1).abs().max() for it in ITERATIONS}
    assert spread["polar_express"] < 0.15 and spread["jordan"] > 0.3


def test_unknown_iterations_are_refused():
    with pytest.raises(ValueError, match="polar_express"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "muon": True}], lr=1e-3, betas=(0.9, 0.95),
                  iterations="newton")


def test_the_adamw_part_equals_torch_adamw():
    a, b = fresh_model(), fresh_model()
    ours = MuonAdamW([{"params": list(a.parameters()), "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    torchs = torch.optim.AdamW(list(b.parameters()), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for i in range(4):
        for model, opt in ((a, ours), (b, torchs)):
            opt.zero_grad()
            loss_fn(model, batch(i)).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_a_muon_step_moves_each_matrix_by_an_adamw_sized_step():
    model = fresh_model()
    opt = make_optimizer(model, 1e-2, 0.0, (0.9, 0.95), "cpu", "muon")
    muon, adamw, no_decay = opt.param_groups
    assert muon["muon"] and all(p.dim() == 2 for p in muon["params"]) and len(muon["params"]) == 2 * 7
    assert adamw["params"] == [model.tok_embeddings.weight] and no_decay["weight_decay"] == 0.0
    before = {p: p.detach().clone() for p in muon["params"]}
    loss_fn(model, batch(0)).backward()
    grads = {p: p.grad.clone() for p in muon["params"]}
    opt.step()
    for p, old in before.items():
        step = p.detach() - old
        # First step: the Nesterov momentum is a multiple of the gradient, and the direction is scale-free.
        expected = -1e-2 * 0.2 * max(p.shape) ** 0.5 * orthogonalize(grads[p])
        assert torch.allclose(step, expected, rtol=0, atol=0.01 * float(expected.abs().max()))
        assert 0.12 < step.pow(2).mean().sqrt() / 1e-2 < 0.25


def test_normuon_gives_every_row_the_same_rms_and_keeps_the_steps_norm():
    g = torch.Generator().manual_seed(0)
    step = torch.randn(6, 10, generator=g) * torch.tensor([0.1, 1, 10, 1, 3, 0.5])[:, None]
    second_moment = torch.zeros(6, 1)
    out = normalize_rows(step, second_moment, beta2=0.95)
    rms = out.pow(2).mean(dim=1).sqrt()
    assert torch.allclose(rms, rms.mean().expand(6), rtol=1e-5)  # first step: each row over its own RMS
    assert torch.allclose(out.norm(), step.norm(), rtol=1e-5)
    assert torch.allclose(second_moment[:, 0], 0.05 * step.pow(2).mean(dim=1))
    # Later steps divide by the running mean: a row that was large before stays scaled down now.
    out = normalize_rows(torch.ones(6, 10), second_moment, beta2=0.95)
    assert out[0, 0] > out[1, 0] > out[2, 0] and torch.allclose(out.norm(), torch.ones(6, 10).norm())


def test_momentum_warms_up_linearly_then_stays():
    assert [momentum_at(step, 100) for step in (0, 50, 100, 5000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert momentum_at(0, 0) == 0.95  # no warmup: Muon's momentum from the first step
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=30, dtype="float32", optimizer="muon",
                      muon_momentum_warmup=10)
    trainer = Trainer(fresh_model(), cfg, Dist())
    for step in range(12):
        trainer.train_step([batch(step, 4)], loss_fn)
        groups = trainer.optimizer.param_groups
        assert [g["momentum"] for g in groups if g["muon"]] == [pytest.approx(momentum_at(step, 10))]
        assert all(g["momentum"] == 0.95 for g in groups if not g["muon"])  # the AdamW groups' default, unused


@pytest.mark.parametrize("normuon,momentum_warmup", [(False, 0), (True, 0), (False, 25)])
def test_muon_trains_and_resumes_identically(normuon, momentum_warmup):
    cfg = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=30, weight_decay=0.1, dtype="float32",
                      optimizer="muon", normuon=normuon, muon_momentum_warmup=momentum_warmup)
    a = Trainer(fresh_model(), cfg, Dist())
    first = a.train_step([batch(0, 16)], loss_fn).loss
    for i in range(1, 20):
        a.train_step([batch(i % 4, 16)], loss_fn)
    assert a.train_step([batch(0, 16)], loss_fn).loss < first - 0.3
    assert any("row_second_moment" in state for state in a.optimizer.state.values()) == normuon
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = Trainer(fresh_model(seed=9), cfg, Dist())
    b.load_state_dict(torch.load(buffer, weights_only=False))
    for i in range(3):
        assert a.train_step([batch(i, 4)], loss_fn).loss == b.train_step([batch(i, 4)], loss_fn).loss


def test_muon_is_refused_with_fsdp():
    with pytest.raises(UsageError, match="--optimizer=muon .* --fsdp"):
        Trainer(fresh_model(), TrainConfig(optimizer="muon", fsdp=True, dtype="float32"), Dist())


@pytest.mark.parametrize("setting", [{"normuon": True}, {"muon_momentum_warmup": 100}])
def test_muons_own_settings_are_refused_without_muon(setting):
    with pytest.raises(UsageError, match="need --optimizer=muon"):
        Trainer(fresh_model(), TrainConfig(optimizer="adamw", dtype="float32", **setting), Dist())
