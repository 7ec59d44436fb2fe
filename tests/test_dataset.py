import numpy as np
import pytest
import torch

from dataset import PretrainDataset, WindowOrder, aligned_window_starts, bin_files, group_by_length, pretraining_splits


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


def test_an_empty_file_holds_no_tokens_and_no_validation(tmp_path):
    """A corpus made with --val_fraction=0 has an empty val.bin: beside another corpus it adds training
    windows and no validation, and an empty part of the stream is read past (numpy cannot map one)."""
    for name, train, val in (("news", 40, 0), ("daily", 30, 12)):
        (tmp_path / name).mkdir()
        np.full(train, 5, dtype=np.uint16).tofile(tmp_path / name / "train.bin")
        np.full(val, 7, dtype=np.uint16).tofile(tmp_path / name / "val.bin")
    train, val, _ = pretraining_splits(f"{tmp_path / 'news'},{tmp_path / 'daily'}", "", 8)
    assert train.n_tokens == 70 and val.files == [str(tmp_path / "daily" / "val.bin")] and val[0][0].tolist() == [7] * 8
    paths, stream = write_bins(tmp_path, [20, 0, 15])
    for aligned_to in (None, 99):  # 99: an eos id that never comes, so aligned windows tile too
        ds = PretrainDataset(paths, max_seq_len=8, aligned_to=aligned_to)
        assert torch.cat([ds[i][0] for i in range(len(ds))]).tolist()[:34] == stream[:34].tolist()


def test_aligned_windows_start_at_documents_and_cover_every_target(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 60)  # documents of 1 to 39 tokens, some longer than the window
    lengths[10] = 70
    stream = np.concatenate([np.append(rng.integers(3, 100, n), 2) for n in lengths]).astype(np.uint16)
    stream.tofile(tmp_path / "train.bin")
    ds = PretrainDataset(str(tmp_path), max_seq_len=32, aligned_to=2)
    eos = np.flatnonzero(stream == 2)
    starts = ds.window_starts.tolist()
    assert starts[0] == 0 and len(ds) == len(starts) and starts == sorted(set(starts))
    for before, start in zip(starts, starts[1:]):
        inside = eos[(eos > before) & (eos < before + 32)]
        # The last eos the window before held, or, with none after its own start, where it ended.
        assert start == (inside[-1] if len(inside) else before + 32)
    covered = set()
    for i in range(len(ds)):
        x, y = ds[i]
        covered |= {starts[i] + 1 + j for j in range(32) if y[j] != -100}
    assert covered == set(range(1, len(stream)))  # every target at least once
    assert aligned_window_starts(np.array([], dtype=np.int64), 100, 32).tolist() == [0, 32, 64, 96]  # no eos: tiles


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


@pytest.mark.parametrize("resumed_on", [1, 2, 4])
def test_a_run_resumes_on_another_number_of_ranks(resumed_on):
    """Saved by 2 ranks after 3 steps of 4 windows each, resumed on 1, 2 or 4 with the same global batch
    (8 windows a step): the windows seen are the uninterrupted run's, none twice, to the epoch's end."""
    n, per_step = 101, 8
    saved_by = [WindowOrder(n, seed=7, rank=r, world_size=2) for r in range(2)]
    seen = [i for _ in range(3) for order in saved_by for i in order.next(per_step // 2)]
    state = saved_by[0].state_dict()
    assert state == saved_by[1].state_dict()
    resumed = [WindowOrder(n, seed=7, rank=r, world_size=resumed_on) for r in range(resumed_on)]
    for order in resumed:
        order.load_state_dict(state)
    while resumed[0].epoch == 0 and resumed[0].position < resumed[0].per_rank:
        seen += [i for order in resumed for i in order.next(min(per_step // resumed_on,
                                                               order.per_rank - order.position))]
    uninterrupted = WindowOrder(n, seed=7)
    whole = uninterrupted.next(n)
    assert len(seen) == len(set(seen))
    assert set(seen) == set(whole[:len(seen)]) and len(seen) >= n - resumed_on
    # The next epoch is the plain one of the new number of ranks.
    fresh = [WindowOrder(n, seed=7, rank=r, world_size=resumed_on) for r in range(resumed_on)]
    for order in fresh:
        order.next(order.per_rank)
    assert [o.next(5) for o in resumed] == [o.next(5) for o in fresh]


def test_epochs_are_shuffled_differently():
    order = WindowOrder(50, seed=0)
    e0, e1 = order.next(50), order.next(50)
    assert sorted(e0) == sorted(e1) and e0 != e1


def test_a_data_position_saved_in_the_older_form_still_resumes():
    first = WindowOrder(101, seed=5, rank=1, world_size=2)
    first.next(20)
    state = first.state_dict()
    older = {"epoch": state["epoch"], "position": 20, "seed": 5, "n_windows": 101, "world_size": 2}
    a, b = WindowOrder(101, seed=5, rank=1, world_size=2), WindowOrder(101, seed=5, rank=1, world_size=2)
    a.load_state_dict(state)
    b.load_state_dict(older)
    assert a.next(40) == b.next(40) == first.next(40)


def test_group_by_length_keeps_every_item_and_makes_batches_of_similar_lengths():
    """Items of lengths 1..1000 in steps of 8 on 2 ranks: each epoch still visits every item once, ranks
    see disjoint items, a step's items span a small part of the lengths (random steps span most of them),
    the groups change from epoch to epoch, and a resumed order continues exactly."""
    n, per_rank, ranks = 1000, 4, 2
    lengths = np.random.default_rng(1).permutation(np.arange(1, n + 1))
    orders = [WindowOrder(n, seed=2, rank=r, world_size=ranks, lengths=lengths, group=per_rank * ranks)
              for r in range(ranks)]
    steps = [[i for o in orders for i in o.next(per_rank)] for _ in range(n // (per_rank * ranks))]
    assert sorted(i for step in steps for i in step) == list(range(n))
    spread = np.median([np.ptp(lengths[step]) for step in steps])
    plain = WindowOrder(n, seed=2)
    random_spread = np.median([np.ptp(lengths[plain.next(8)]) for _ in range(n // 8)])
    assert spread < random_spread / 10
    assert steps[0] != [i for o in orders for i in o.next(per_rank)]  # epoch 1 groups differently
    state = orders[0].state_dict()
    expected = orders[0].next(12)
    resumed = WindowOrder(n, seed=2, rank=0, world_size=ranks, lengths=lengths, group=per_rank * ranks)
    resumed.load_state_dict(state)
    assert resumed.next(12) == expected
    with pytest.raises(ValueError, match="lengths"):
        WindowOrder(n, lengths=lengths[:-1])


def test_group_by_length_leaves_a_short_last_group_at_the_end():
    order = np.arange(21)
    grouped = group_by_length(order, np.arange(21)[::-1], 4, np.random.default_rng(0))
    assert sorted(grouped) == list(range(21))
    assert grouped[-1] == 0  # the shortest item of the short last group (lengths count down)
