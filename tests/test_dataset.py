import numpy as np
import pytest
import torch

from dataset import PretrainDataset, WindowOrder, bin_files


def write_bins(tmp_path, sizes):
    stream = np.arange(sum(sizes), dtype=np.uint16)
    paths, start = [], 0
    for i, n in enumerate(sizes):
        p = tmp_path / f"part{i}.bin"
        stream[start:start + n].tofile(p)
        paths.append(str(p))
        start += n
    return paths, stream


def test_every_token_is_a_target_once_across_files(tmp_path):
    paths, stream = write_bins(tmp_path, [100, 37, 250])
    ds = PretrainDataset(paths, max_seq_len=16)
    targets = []
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == y.shape == (16,)
        real = y != -100
        assert torch.equal(x[1:][real[:-1]], y[:-1][real[:-1]])  # targets are inputs shifted by one
        targets += y[real].tolist()
    assert targets == stream[1:].tolist()
    # A window spans the boundary between part0 and part1 without losing a token.
    assert ds[6][0].tolist() == list(range(96, 112))


def test_folder_and_batch(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    np.arange(50, dtype=np.uint16).tofile(folder / "train.bin")
    np.arange(10, dtype=np.uint16).tofile(folder / "val.bin")
    assert bin_files(str(folder)) == [str(folder / "train.bin")]
    assert bin_files([str(folder)], "val") == [str(folder / "val.bin")]
    ds = PretrainDataset(str(folder), 8)
    x, y = ds.batch([0, 6])
    assert x.shape == (2, 8) and x.dtype == torch.int64
    assert y[1].tolist() == [49] + [-100] * 7
    with pytest.raises(FileNotFoundError, match="data_process.py"):
        bin_files([str(tmp_path / "missing")])


def test_ranks_see_disjoint_windows_and_resume(tmp_path):
    a, b = WindowOrder(101, seed=3, rank=0, world_size=2), WindowOrder(101, seed=3, rank=1, world_size=2)
    seen_a, seen_b = set(a.next(50)), set(b.next(50))
    assert not seen_a & seen_b
    assert len(seen_a | seen_b) == 100
    single = WindowOrder(101, seed=3)
    assert sorted(single.next(101)) == list(range(101))
    # Resume: a fresh order loaded from a state continues exactly where the first one stopped.
    first = WindowOrder(101, seed=5)
    first.next(70)
    state = first.state_dict()
    expected = first.next(60)  # crosses into epoch 1
    resumed = WindowOrder(101, seed=5)
    resumed.load_state_dict(state)
    assert resumed.next(60) == expected
    assert first.epoch == 1
    with pytest.raises(ValueError, match="cannot resume"):
        WindowOrder(100, seed=5).load_state_dict(state)


def test_epochs_are_shuffled_differently():
    order = WindowOrder(50, seed=0)
    e0, e1 = order.next(50), order.next(50)
    assert sorted(e0) == sorted(e1) and e0 != e1
