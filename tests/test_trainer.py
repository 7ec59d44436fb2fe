import io

import pytest
import torch
from conftest import batch, fresh_model, loss_fn, settings

from babyllama.distributed import Dist
from babyllama.errors import UsageError
from babyllama.trainer import MetricsLog, Trainer, TrainingDiverged, keep_global_batch, make_optimizer


def test_no_weight_decay_on_norms():
    model = fresh_model()
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_embedding_lr_scale_gives_the_tables_a_group_of_their_own(kind):
    model = fresh_model(tie_embeddings=False)
    trainer = Trainer(model, settings(optimizer=kind, embedding_lr_scale=5.0), Dist())
    scaled = [g for g in trainer.optimizer.param_groups if "lr_scale" in g]
    assert len(scaled) == 1 and scaled[0]["lr_scale"] == 5.0
    assert {id(p) for p in scaled[0]["params"]} == {id(model.tok_embeddings.weight), id(model.output.weight)}
    trainer.train_step([batch(0, 4)], loss_fn)
    lr = trainer.schedule.lr_at(0)
    assert scaled[0]["lr"] == pytest.approx(5 * lr)
    assert all(g["lr"] == pytest.approx(lr) for g in trainer.optimizer.param_groups if "lr_scale" not in g)
    unscaled = make_optimizer(fresh_model(), 1e-3, 0.1, (0.9, 0.95), "cpu", kind)
    assert not any("lr_scale" in g for g in unscaled.param_groups)  # the groups checkpoints already hold


@pytest.mark.parametrize("dtype,muon_dtype,expected", [("bfloat16", "auto", torch.bfloat16),
                                                       ("float32", "auto", torch.float32),
                                                       ("bfloat16", "float32", torch.float32)])
def test_muon_dtype_auto_follows_a_bfloat16_training(dtype, muon_dtype, expected):
    trainer = Trainer(fresh_model(), settings(optimizer="muon", dtype=dtype, muon_dtype=muon_dtype), Dist())
    assert trainer.optimizer.ns_dtype == expected


def test_gradient_accumulation_equals_big_batch():
    x, y = batch(0, 8)
    one = Trainer(fresh_model(), settings(), Dist())
    accum = Trainer(fresh_model(), settings(), Dist())
    for _ in range(3):
        a = one.train_step([(x, y)], loss_fn)
        b = accum.train_step([(x[:4], y[:4]), (x[4:], y[4:])], loss_fn)
        assert a.loss == pytest.approx(b.loss, abs=1e-5)
    for p, q in zip(one.raw_model.parameters(), accum.raw_model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_scaler_only_for_float16():
    assert Trainer(fresh_model(), settings(dtype="float16"), Dist()).scaler.is_enabled()
    assert not Trainer(fresh_model(), settings(dtype="bfloat16"), Dist()).scaler.is_enabled()
    assert not Trainer(fresh_model(), settings(dtype="float32"), Dist()).scaler.is_enabled()
    # A bfloat16 step computes the same loss as float32, to bfloat16's precision.
    bf16 = Trainer(fresh_model(), settings(dtype="bfloat16"), Dist()).train_step([batch(0, 4)], loss_fn).loss
    fp32 = Trainer(fresh_model(), settings(dtype="float32"), Dist()).train_step([batch(0, 4)], loss_fn).loss
    assert bf16 == pytest.approx(fp32, rel=0.02) and bf16 != fp32


def test_nonfinite_loss_is_skipped_then_training_goes_on():
    trainer = Trainer(fresh_model(), settings(max_nonfinite_in_a_row=3), Dist())
    trainer.train_step([batch(0, 4)], loss_fn)
    before = [p.clone() for p in trainer.raw_model.parameters()]
    stats = trainer.train_step([batch(1, 4)], lambda m, b: loss_fn(m, b) * float("nan"))
    assert stats.skipped and trainer.step == 1 and trainer.nonfinite_total == 1
    assert all(torch.equal(p, q) for p, q in zip(before, trainer.raw_model.parameters()))
    assert not trainer.train_step([batch(2, 4)], loss_fn).skipped
    assert trainer.step == 2
    for _ in range(2):
        trainer.train_step([batch(3, 4)], lambda m, b: loss_fn(m, b) * float("inf"))
    with pytest.raises(TrainingDiverged, match="3 non-finite losses in a row"):
        trainer.train_step([batch(3, 4)], lambda m, b: loss_fn(m, b) * float("inf"))


def test_state_round_trip_continues_identically():
    a = Trainer(fresh_model(), settings(), Dist())
    for i in range(3):
        a.train_step([batch(i, 4)], loss_fn)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # as a checkpoint file would hold it: copies, not live tensors
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    b = Trainer(fresh_model(seed=9), settings(), Dist())
    b.load_state_dict(state)
    for i in range(3, 6):
        la = a.train_step([batch(i, 4)], loss_fn).loss
        lb = b.train_step([batch(i, 4)], loss_fn).loss
        assert la == lb
    assert b.step == 6 and b.schedule == a.schedule


def test_metrics_log_truncates_on_resume(tmp_path):
    log = MetricsLog(str(tmp_path), Dist())
    for step in range(1, 6):
        log.log({"step": step})
    MetricsLog(str(tmp_path), Dist(), resume_step=3)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split(":")[1].strip(" }")) for line in lines] == [1, 2, 3]


def test_a_resume_on_fewer_processes_keeps_the_global_batch(tmp_path, capsys):
    # Saved by 4 processes of 2 items x 3 micro-steps: 24 items a step. This run has one process.
    torch.save({"data": {"world_size": 4}, "global_batch": 24, "config": {"grad_accum": 3}}, tmp_path / "ckpt.pt")
    cfg = settings(out_dir=str(tmp_path), grad_accum=3)
    keep_global_batch(cfg, 2, Dist(), "--batch_size", accumulates=True)
    assert cfg.grad_accum == 12 and "--grad_accum=12 keeps its 24 items a step" in capsys.readouterr().out
    with pytest.raises(UsageError, match=r"choose --batch_size x --grad_accum so that it times 1 is 24 "
                                         r"\(--batch_size=5 now\)"):
        keep_global_batch(cfg, 5, Dist(), "--batch_size", accumulates=True)
    with pytest.raises(UsageError, match=r"choose --prompts_per_step so that it times 1 is 24"):
        keep_global_batch(cfg, 2, Dist(), "--prompts_per_step", accumulates=False)
    cfg = settings(out_dir=str(tmp_path), grad_accum=3, resume=False)  # no resume: nothing to keep
    keep_global_batch(cfg, 5, Dist(), "--batch_size", accumulates=True)
    assert cfg.grad_accum == 3
