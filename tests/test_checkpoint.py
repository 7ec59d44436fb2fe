import os

import pytest
import torch

from babyllama.checkpoint import save_checkpoint


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
