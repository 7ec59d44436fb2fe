import io
import os
import platform

import pytest
import torch
import torch.multiprocessing as mp

from babyllama.budget import steps_that_fit
from babyllama.checkpoint import save_checkpoint
from babyllama.common import pick_device
from babyllama.distributed import Dist
from babyllama.precision import choose_cpu_dtype, matmul_flops, measure_peak_flops, resolve_dtype
from babyllama.trainer import MetricsLog, TrainConfig, Trainer, TrainingDiverged, lr_at, make_optimizer
from model import ModelArgs, Transformer

ARGS = dict(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=16, multiple_of=16)


def fresh_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**ARGS))


def batch(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (n, 16), generator=g)
    return x, torch.roll(x, -1, 1)


def loss_fn(model, b):
    return model(b[0], b[1])[1]


def settings(**kw):
    return TrainConfig(**{"lr": 1e-2, "min_lr": 1e-4, "warmup_steps": 2, "max_steps": 20, "weight_decay": 0.1,
                          "dtype": "float32", **kw})


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")
def test_glibc_accepts_the_allocator_settings():
    """mallopt answers 0 to a parameter or value it does not take: both settings must be accepted."""
    from babyllama.distributed import keep_freed_memory
    assert keep_freed_memory() is True


def test_cosine_schedule():
    assert lr_at(0, 1.0, 0.1, 10, 101) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 0.1, 10, 101) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 0.1, 10, 101) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 0.1, 10, 101) == pytest.approx(0.55)
    assert lr_at(100, 1.0, 0.1, 10, 101) == pytest.approx(0.1)  # the last step is at min_lr
    assert lr_at(99, 1.0, 0.1, 10, 101) > 0.1
    assert lr_at(500, 1.0, 0.1, 10, 101) == pytest.approx(0.1)


def test_linear_and_warmup_stable_decay_schedules():
    # After 10 warmup steps, 90 steps of decay (steps 10..100) end at min_lr on step 100.
    assert lr_at(55, 1.0, 0.1, 10, 101, "linear") == pytest.approx(0.55)
    assert lr_at(10, 1.0, 0.0, 10, 101, "linear") == pytest.approx(1.0)
    assert lr_at(100, 1.0, 0.0, 10, 101, "linear") == 0.0
    assert lr_at(80, 1.0, 0.0, 10, 101, "wsd") == pytest.approx(1.0)  # flat for 80% of the decay steps
    assert lr_at(91, 1.0, 0.0, 10, 101, "wsd") == pytest.approx(0.5)  # then linear over the last 20%
    assert lr_at(100, 1.0, 0.0, 10, 101, "wsd") == 0.0
    assert lr_at(5, 1.0, 0.0, 10, 101, "wsd") == lr_at(5, 1.0, 0.0, 10, 101)  # the same warmup


def test_cpu_dtype_follows_the_probe():
    # An AVX2 CPU emulates bfloat16 (measured there: 1.9 against 85 GFLOP/s); AVX-512 bf16 has it natively.
    assert choose_cpu_dtype("AVX2", 85e9, 1.9e9) == ("float32", "cpu AVX2, float32 (bfloat16 matmul 45x slower here)")
    assert choose_cpu_dtype("AVX512", 67e9, 172e9) == ("bfloat16",
                                                       "cpu AVX512, bfloat16 (bfloat16 matmul 2.6x float32 here)")
    assert choose_cpu_dtype("AVX512", 80e9, 85e9)[0] == "float32"  # no clear gain: keep float32's accuracy
    slow, fast = (lambda: (85e9, 1.9e9)), (lambda: (67e9, 172e9))
    assert resolve_dtype("auto", "cpu", cpu_probe=slow)[0] == "float32"
    assert resolve_dtype("auto", "cpu", cpu_probe=fast)[0] == "bfloat16"
    dtype, reason = resolve_dtype("bfloat16", "cpu", cpu_probe=slow)  # asked for: kept, with a hint
    assert dtype == "bfloat16" and "--dtype=auto would choose float32" in reason
    assert resolve_dtype("float32", "cpu", cpu_probe=fast) == ("float32", "cpu, float32 as asked")
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", "cpu")


def test_device_and_dtype_on_apple_gpus():
    assert pick_device("auto", cuda=True, mps=True) == "cuda"
    assert pick_device("auto", cuda=False, mps=True) == "mps"
    assert pick_device("auto", cuda=False, mps=False) == "cpu"
    assert pick_device("cpu", cuda=True, mps=True) == "cpu"
    assert resolve_dtype("auto", "mps", bf16_on_mps=True)[0] == "bfloat16"
    assert resolve_dtype("auto", "mps", bf16_on_mps=False)[0] == "float16"


def test_mfu_peak_is_never_below_float32s(monkeypatch):
    # A dtype slower than float32 (bfloat16 on an AVX2 CPU) must not lower the peak, or MFU passes 100%.
    import babyllama.precision as precision
    measured = {"bfloat16": 1.9e9, "float32": 85e9}  # as on an AVX2 CPU (a real float16 probe takes minutes)
    monkeypatch.setattr(precision, "matmul_flops", lambda device, dtype, seconds=1.0: measured[dtype])
    assert measure_peak_flops("cpu", "bfloat16") == 85e9
    measured["bfloat16"] = 170e9  # AVX-512 bf16: its own peak
    assert measure_peak_flops("cpu", "bfloat16") == 170e9
    assert matmul_flops("cpu", "float32", seconds=0.01, n=64) > 0


def test_steps_that_fit_count_validations_and_checkpoints():
    # 100 s, 1 s a step, nothing else: 100 steps.
    assert steps_that_fit(100, 0, 1.0, 0.0, 10, 0.0, 10) == 100
    # A 5 s validation every 10 steps and at the end: n + 5 * (n // 10 + 1) <= 100 -> n = 65.
    assert steps_that_fit(100, 0, 1.0, 5.0, 10, 0.0, 1000) == 65
    # Checkpoints too, counted from step 7 on: n + 2 * ((7 + n) // 20 + 1) <= 50 -> n = 44.
    assert steps_that_fit(50, 7, 1.0, 0.0, 1000, 2.0, 20) == 44
    assert steps_that_fit(1, 0, 5.0, 0.0, 10, 0.0, 10) == 0


def test_no_weight_decay_on_norms():
    model = fresh_model()
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


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
    assert b.step == 6


def test_checkpoint_files_are_atomic_and_pruned(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), {"step": step}, step, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt_0000002.pt", "ckpt_0000003.pt"]
    assert torch.load(tmp_path / "ckpt.pt")["step"] == 3

    def broken_save(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(tmp_path), {"step": 4}, 4, keep_last=2)
    assert torch.load(tmp_path / "ckpt.pt")["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt_0000002.pt", "ckpt_0000003.pt"]


def test_metrics_log_truncates_on_resume(tmp_path):
    log = MetricsLog(str(tmp_path), Dist())
    for step in range(1, 6):
        log.log({"step": step})
    MetricsLog(str(tmp_path), Dist(), resume_step=3)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split(":")[1].strip(" }")) for line in lines] == [1, 2, 3]


def _ddp_worker(rank, world, port, out, steps):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from babyllama.distributed import setup_distributed, teardown
    torch.set_num_threads(1)
    dist = setup_distributed("cpu")
    trainer = Trainer(fresh_model(), settings(), dist)
    losses = []
    for i in range(steps):
        x, y = batch(i, 8)
        # Two micro-batches per step, so that accumulation under no_sync is covered too.
        mine = slice(rank * 4, rank * 4 + 4)
        xs, ys = x[mine], y[mine]
        losses.append(trainer.train_step([(xs[:2], ys[:2]), (xs[2:], ys[2:])], loss_fn).loss)
    torch.save({"losses": losses, "model": trainer.model_state()}, f"{out}/rank{rank}.pt")
    trainer.release()
    teardown(dist)


def test_ddp_two_ranks_equal_one_process_with_double_batch(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path), 10), nprocs=2, start_method="spawn")
    single = Trainer(fresh_model(), settings(), Dist())
    losses = [single.train_step([batch(i, 8)], loss_fn).loss for i in range(10)]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["losses"] == pytest.approx(losses, abs=1e-5)
    for key, value in single.model_state().items():
        assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key])
        assert torch.allclose(ranks[0]["model"][key], value, atol=1e-5)


def test_time_budget_follows_the_speed_both_ways():
    """After the fit, a slower machine shortens the schedule at once; a faster one lengthens it (up to
    the configured max_steps) only while most of the schedule is ahead."""
    import time
    from types import SimpleNamespace

    from babyllama.budget import TimeBudget
    cfg = TrainConfig(eval_interval=10**6, save_interval=10**6, time_budget_min=2)
    trainer = SimpleNamespace(dist=Dist(started=time.time()), cfg=cfg, max_steps=1000, warmup_steps=10, step=0,
                              fitted_to_budget=False)

    budget = TimeBudget(trainer)
    for step in range(1, 12):  # the first step (compilation) is not timed
        budget.add_step(step, 0.5)
    assert not budget.ready()  # 5 s timed: less than a tenth of the budget
    for step in range(12, 32):
        budget.add_step(step, 0.5)
    trainer.step = 31
    assert budget.ready()
    budget.fit(eval_s=0.0, save_s=0.0)
    assert 240 < trainer.max_steps < 260  # step 31 + (120 s less the 8 s margin) / 0.5 s
    fitted = trainer.max_steps
    budget.recent.extend([1.0] * 50)  # twice as slow: shortened
    assert budget.adjust_to_speed() is not None and trainer.max_steps < 0.6 * fitted
    shortened = trainer.max_steps
    budget.recent.extend([0.1] * 50)  # much faster, early in the schedule: lengthened, within the cap
    assert budget.adjust_to_speed() is not None and shortened < trainer.max_steps <= 1000
    trainer.step = int(0.9 * trainer.max_steps)
    longest = trainer.max_steps
    budget.recent.extend([0.01] * 50)  # faster still, but near the end: kept
    assert budget.adjust_to_speed() is None and trainer.max_steps == longest
