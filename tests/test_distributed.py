import os
import platform

import pytest
import torch
import torch.multiprocessing as mp
from conftest import batch, fresh_model, loss_fn, settings

from babyllama.distributed import Dist, lost_processes
from babyllama.errors import UsageError
from babyllama.trainer import Trainer


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")
def test_glibc_accepts_the_allocator_settings():
    """mallopt answers 0 to a parameter or value it does not take: both settings must be accepted."""
    from babyllama.distributed import keep_freed_memory
    assert keep_freed_memory() is True


MODELS = {"dense": {}, "moe": {"n_experts": 4, "n_active_experts": 2, "hidden_dim": 16}}


def _ddp_worker(rank, world, port, out, steps, model, fsdp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from babyllama.distributed import setup_distributed, teardown
    torch.set_num_threads(1)
    dist = setup_distributed("cpu")
    trainer = Trainer(fresh_model(**MODELS[model]), settings(fsdp=fsdp), dist)
    losses, metrics = [], []
    for i in range(steps):
        x, y = batch(i, 8)
        # Two micro-batches per step, so that accumulation under no_sync is covered too.
        mine = slice(rank * 4, rank * 4 + 4)
        xs, ys = x[mine], y[mine]
        stats = trainer.train_step([(xs[:2], ys[:2]), (xs[2:], ys[2:])], loss_fn)
        losses.append(stats.loss)
        metrics.append(stats.metrics)
    torch.save({"losses": losses, "metrics": metrics, "model": trainer.model_state()}, f"{out}/rank{rank}.pt")
    trainer.release()
    teardown(dist)


# A mixture of experts' balance loss is per sequence, so it too is the same over two ranks as over one batch.
@pytest.mark.parametrize("model,fsdp", [("dense", False), ("moe", False), ("moe", True)])
def test_ddp_two_ranks_equal_one_process_with_double_batch(tmp_path, model, fsdp):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path), 10, model, fsdp), nprocs=2, start_method="spawn")
    single = Trainer(fresh_model(**MODELS[model]), settings(), Dist())
    steps = [single.train_step([batch(i, 8)], loss_fn) for i in range(10)]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["losses"] == pytest.approx([s.loss for s in steps], abs=1e-5)
        for theirs, ours in zip(r["metrics"], steps):  # an MoE's balance loss and expert shares
            assert theirs.keys() == ours.metrics.keys() and theirs == pytest.approx(ours.metrics, abs=1e-5)
    assert not fsdp or not ranks[1]["model"]  # FSDP gathers the whole state on rank 0 alone
    for key, value in single.model_state().items():
        assert fsdp or torch.equal(ranks[0]["model"][key], ranks[1]["model"][key])
        # An expert's gradient sums its rows in another order on two ranks than in one batch; Adam divides that
        # rounding by the root of the expert's small second moment.
        assert torch.allclose(ranks[0]["model"][key], value, atol=1e-4 if model == "moe" else 1e-5), key


def test_lost_processes_are_one_line_and_other_errors_pass():
    with pytest.raises(UsageError, match=r"^rank 1 of 2: lost the other processes \(Connection closed by peer\); "
                                         r"check that every node.*--dist_timeout_min=0.5 bounds the wait\)$"):
        with lost_processes(1, 2, 0.5):
            raise RuntimeError("[/src/third_party/gloo/transport/tcp/pair.cc:553] Connection closed by peer\nframe #0")
    with pytest.raises(UsageError, match="Timed out after 4 seconds"):
        with lost_processes(0, 2, 10):
            raise torch.distributed.DistStoreError("Timed out after 4 seconds waiting for clients.")
    with pytest.raises(RuntimeError, match="^shapes do not match$"):  # not the backend's: left as it is
        with lost_processes(0, 2, 10):
            raise RuntimeError("shapes do not match")
    with pytest.raises(RuntimeError, match="gloo"):  # a single process has no others to lose
        with lost_processes(0, 1, 10):
            raise RuntimeError("gloo")
