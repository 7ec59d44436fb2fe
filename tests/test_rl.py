import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, write_csv
from test_pretrain import (
    corpus,  # noqa: F401  (module fixture)
    metrics,
    run_ok,
)
from test_sft import pretrained  # noqa: F401  (module fixture)

from babyllama.reward_model import RewardModel, bradley_terry_loss, load_reward_model
from dpo import dpo_loss
from grpo import grpo_advantages, grpo_loss
from model import ModelArgs, Transformer, answer_logprobs


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_by_hand():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert float(loss) == pytest.approx((-math.log(sig(1.0)) - math.log(sig(-1.0))) / 2)


def test_dpo_loss_and_rewards_by_hand():
    loss, chosen, rejected = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                                      torch.tensor([-11.0]), beta=0.5)
    # rewards: 0.5 * (-10 + 11) = 0.5 and 0.5 * (-12 + 11) = -0.5; margin 1
    assert float(chosen) == pytest.approx(0.5) and float(rejected) == pytest.approx(-0.5)
    assert float(loss) == pytest.approx(-math.log(sig(1.0)))
    smooth, _, _ = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                            torch.tensor([-11.0]), beta=0.5, label_smoothing=0.2)
    assert float(smooth) == pytest.approx(-0.8 * math.log(sig(1.0)) - 0.2 * math.log(sig(-1.0)))


def test_sequence_logprob_sums_answer_tokens_only():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=20, max_seq_len=8, multiple_of=16))
    x = torch.tensor([[3, 4, 1, 5, 6]])
    y = torch.tensor([[-100, -100, 5, 6, 2]])
    with torch.no_grad():
        total, count = answer_logprobs(model, x, y)
        logp = torch.log_softmax(model(x)[0][0], -1)
    assert count.item() == 3
    assert float(total) == pytest.approx(float(logp[2, 5] + logp[3, 6] + logp[4, 2]), abs=1e-5)


def test_grpo_advantages():
    adv = grpo_advantages(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    s = math.sqrt(2 / 3)
    assert adv[0].tolist() == pytest.approx([-1 / s, 0.0, 1 / s], abs=1e-3)
    assert adv[0].sum().item() == pytest.approx(0.0, abs=1e-6)
    assert adv[1].tolist() == [0.0, 0.0, 0.0]


def test_grpo_clipped_objective_inside_and_outside_the_range():
    mask = torch.ones(1, 1)
    zero = torch.zeros(1, 1)

    def loss(ratio, advantage):
        return float(grpo_loss(torch.log(torch.tensor([[ratio]])), zero, torch.log(torch.tensor([[ratio]])),
                               torch.tensor([advantage]), mask, clip_eps=0.2, kl_beta=0.0)[0])
    assert loss(1.1, 2.0) == pytest.approx(-2.2)  # inside: ratio * A
    assert loss(1.5, 2.0) == pytest.approx(-2.4)  # above 1 + eps with A > 0: clipped to 1.2 * A
    assert loss(0.5, 2.0) == pytest.approx(-1.0)  # below with A > 0: min keeps 0.5 * A
    assert loss(0.5, -2.0) == pytest.approx(1.6)  # below 1 - eps with A < 0: clipped to 0.8 * A
    # k3 KL: exp(ref - logp) - (ref - logp) - 1, zero when equal
    kl_loss, kl = grpo_loss(torch.zeros(1, 1), zero, torch.tensor([[math.log(2.0)]]), torch.tensor([0.0]), mask,
                            0.2, kl_beta=1.0)
    assert float(kl) == pytest.approx(2 - math.log(2) - 1) and float(kl_loss) == pytest.approx(float(kl))


def test_equal_rewards_give_no_update():
    from babyllama.distributed import Dist
    from babyllama.trainer import TrainConfig, Trainer
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=20, max_seq_len=8, multiple_of=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 20, (4, 6))
    y = torch.where(torch.arange(6) >= 3, x.roll(-1, 1), torch.tensor(-100))
    from model import token_logprobs
    with torch.no_grad():
        old, mask = token_logprobs(model, x, y)
    advantages = grpo_advantages(torch.full((1, 4), 0.7)).view(-1)
    trainer = Trainer(model, TrainConfig(lr=1e-2, min_lr=1e-4, warmup_steps=1, max_steps=1000, dtype="float32"), Dist())
    trainer.train_step([None], lambda m, _: grpo_loss(token_logprobs(m, x, y)[0], old, old, advantages,
                                                      mask.float(), 0.2, 0.04)[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_reward_model_reads_the_last_real_token():
    torch.manual_seed(0)
    rm = RewardModel(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=20, max_seq_len=8,
                                           multiple_of=16)))
    torch.nn.init.normal_(rm.head.weight)
    a = rm(torch.tensor([[3, 4, 5, 0, 0]]), torch.tensor([3]))
    b = rm(torch.tensor([[3, 4, 5]]), torch.tensor([3]))
    assert torch.allclose(a, b, atol=1e-5)


@pytest.fixture(scope="module")
def preference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pref")
    for name, n in (("train.csv", 48), ("val.csv", 16)):
        write_csv(folder / name, ["prompt", "chosen", "rejected"],
                  [[f"第{i}个问题", "春眠不觉晓，处处闻啼鸟。", "白日依山尽"] for i in range(n)])
    write_csv(folder / "prompts.csv", ["prompt", "answer", "history"],
              [[f"成语“{word}”是什么意思？", "比喻做多余的事", "[]"]
               for word in ("画蛇添足", "守株待兔", "亡羊补牢", "对牛弹琴")])
    return folder


def common(ckpt, tokenizer, out):
    return [f"--init_from={ckpt}", f"--tokenizer={tokenizer}", f"--out_dir={out}", "--dtype=float32",
            "--peak_tflops=1", "--log_interval=1"]


def test_reward_model_and_dpo_scripts_run(pretrained, preference, small_tokenizer, tmp_path):  # noqa: F811
    ckpt, _ = pretrained
    args = [f"--data={preference / 'train.csv'}", f"--val_data={preference / 'val.csv'}", "--batch_size=8",
            "--eval_interval=3", "--lr=1e-3", "--warmup_steps=1"]
    run_ok([sys.executable, os.path.join(ROOT, "train_reward_model.py"), *common(ckpt, small_tokenizer, tmp_path / "rm"),
            *args, "--max_steps=6"])
    rm, state = load_reward_model(str(tmp_path / "rm" / "ckpt.pt"))
    # The pairs are trivially separable (the same chosen and rejected answer every time): a reward model
    # stuck at chance (0.5) fails here.
    assert state["stage"] == "reward" and metrics(tmp_path / "rm")[-1]["val_accuracy"] >= 0.9
    run_ok([sys.executable, os.path.join(ROOT, "dpo.py"), *common(ckpt, small_tokenizer, tmp_path / "dpo"), *args,
            "--max_steps=6"])
    first, last = metrics(tmp_path / "dpo")[0], metrics(tmp_path / "dpo")[-1]
    assert {"reward_chosen", "reward_rejected", "margin", "accuracy", "val_loss"} <= set(last)
    # DPO moves the policy towards the chosen answers: the implicit reward margin grows from 0.
    assert abs(first["margin"]) < 1e-3 < last["margin"] and last["accuracy"] == 1.0
    from babyllama.checkpoint import load_model
    _, state = load_model(str(tmp_path / "dpo" / "ckpt.pt"))
    assert state["stage"] == "dpo" and state["step"] == 6


def test_grpo_script_runs(pretrained, preference, small_tokenizer, tmp_path):  # noqa: F811
    ckpt, _ = pretrained
    run_ok([sys.executable, os.path.join(ROOT, "grpo.py"), *common(ckpt, small_tokenizer, tmp_path / "grpo"),
            f"--prompts={preference / 'prompts.csv'}", "--max_steps=3", "--group_size=4", "--prompts_per_step=2",
            "--max_new_tokens=8", "--lr=1e-4", "--warmup_steps=1"])
    records = metrics(tmp_path / "grpo")
    assert len(records) == 3 and all({"reward", "kl", "answer_tokens"} <= set(r) for r in records)
    from babyllama.checkpoint import load_model
    _, state = load_model(str(tmp_path / "grpo" / "ckpt.pt"))
    assert state["stage"] == "grpo"
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), *common(ckpt, small_tokenizer, tmp_path / "x"),
                          f"--prompts={preference / 'prompts.csv'}", "--task=character"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no single-turn prompts of task 'character'" in bad.stderr.splitlines()[-1]
