import json
import math
import os
import sys

import pytest
import torch
from conftest import ROOT, metrics, run_ok, stage_flags

from babyllama.reward_model import RewardModel, bradley_terry_loss, load_reward_model
from model import ModelArgs, Transformer


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_by_hand():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert float(loss) == pytest.approx((-math.log(sig(1.0)) - math.log(sig(-1.0))) / 2)


def test_reward_model_reads_the_last_real_token():
    torch.manual_seed(0)
    rm = RewardModel(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=20, max_seq_len=8,
                                           multiple_of=16)))
    torch.nn.init.normal_(rm.head.weight)
    a = rm(torch.tensor([[3, 4, 5, 0, 0]]), torch.tensor([3]))
    b = rm(torch.tensor([[3, 4, 5]]), torch.tensor([3]))
    assert torch.allclose(a, b, atol=1e-5)


def test_reward_model_learns_separable_pairs(pretrained, preference, small_tokenizer, tmp_path):
    ckpt, _ = pretrained
    run_ok([sys.executable, os.path.join(ROOT, "train_reward_model.py"), *stage_flags(ckpt, small_tokenizer, tmp_path),
            f"--data={preference / 'train.csv'}", f"--val_data={preference / 'val.csv'}", "--batch_size=8",
            "--eval_interval=3", "--lr=1e-3", "--warmup_steps=1", "--max_steps=6"])
    rm, state = load_reward_model(str(tmp_path / "ckpt.pt"))
    # The pairs are trivially separable (the same chosen and rejected answer every time): a reward model
    # stuck at chance (0.5) fails here.
    assert state["stage"] == "reward" and metrics(tmp_path)[-1]["val_accuracy"] >= 0.9
    run_ok([sys.executable, os.path.join(ROOT, "train_reward_model.py"), "--eval_only=true",
            f"--data={preference / 'train.csv'}", f"--val_data={preference / 'val.csv'}",
            f"--tokenizer={small_tokenizer}", f"--out_dir={tmp_path}"])
    assert json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["all"]["accuracy"] >= 0.9
