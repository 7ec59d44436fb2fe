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
