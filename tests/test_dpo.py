import math
import os
import sys

import pytest
import torch
from conftest import ROOT, metrics, run_ok, stage_flags

from babyllama.checkpoint import load_model
from dpo import chosen_nll, dpo_loss, loops_rejected
from model import IGNORE_INDEX, ModelArgs, Transformer, answer_logprobs


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_and_rewards_by_hand():
    loss, chosen, rejected = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                                      torch.tensor([-11.0]), beta=0.5)
    # rewards: 0.5 * (-10 + 11) = 0.5 and 0.5 * (-12 + 11) = -0.5; margin 1
    assert float(chosen) == pytest.approx(0.5) and float(rejected) == pytest.approx(-0.5)
    assert float(loss) == pytest.approx(-math.log(sig(1.0)))
    smooth, _, _ = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                            torch.tensor([-11.0]), beta=0.5, label_smoothing=0.2)
    assert float(smooth) == pytest.approx(-0.8 * math.log(sig(1.0)) - 0.2 * math.log(sig(-1.0)))


def test_the_rpo_term_is_the_chosen_answers_nll_per_token():
    logp, tokens = torch.tensor([-6.0, -2.0]), torch.tensor([3, 4])
    assert chosen_nll(logp, tokens).item() == pytest.approx((6 / 3 + 2 / 4) / 2)
    assert chosen_nll(torch.tensor([0.0]), torch.tensor([0])).item() == 0  # an empty answer adds nothing


def test_sequence_logprob_sums_answer_tokens_only():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=20, max_seq_len=8, multiple_of=16))
    x = torch.tensor([[3, 4, 1, 5, 6]])
    y = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, 2]])
    with torch.no_grad():
        total, count = answer_logprobs(model, x, y)
        logp = torch.log_softmax(model(x)[0][0], -1)
    assert count.item() == 3
    assert float(total) == pytest.approx(float(logp[2, 5] + logp[3, 6] + logp[4, 2]), abs=1e-5)


def test_dpo_moves_towards_the_chosen_answers(pretrained, preference, small_tokenizer, tmp_path):
    ckpt, _ = pretrained
    run_ok([sys.executable, os.path.join(ROOT, "dpo.py"), *stage_flags(ckpt, small_tokenizer, tmp_path),
            f"--data={preference / 'train.csv'}", f"--val_data={preference / 'val.csv'}", "--batch_size=8",
            "--eval_interval=3", "--lr=1e-3", "--warmup_steps=1", "--max_steps=6", "--nll_weight=0.5",
            "--reject_loops=true", "--loop_tokens=4"])
    first, last = metrics(tmp_path)[0], metrics(tmp_path)[-1]
    assert {"reward_chosen", "reward_rejected", "margin", "accuracy", "val_loss", "chosen_nll", "looped"} <= set(last)
    assert 0 <= last["looped"] <= 1
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["chosen_nll"], rel=1e-3)  # margin 0 at first
    # The implicit reward margin grows from 0 (the policy starts as its reference).
    assert abs(first["margin"]) < 1e-3 < last["margin"] and last["accuracy"] == 1.0
    _, state = load_model(str(tmp_path / "ckpt.pt"))
    assert state["stage"] == "dpo" and state["step"] == 6


def test_a_greedy_answer_in_a_loop_becomes_the_rejected_answer(small_tokenizer):
    """Three pairs; the model's greedy answers (a call at temperature 0, at most max_new_tokens) loop on the
    second prompt only: that pair's rejected answer is the loop, the others keep theirs."""
    from chatglm_tokenizer import load_tokenizer
    tok = load_tokenizer(small_tokenizer)

    class Greedy:
        args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=64)

        def generate(self, prompts, max_new_tokens, temperature, eos_id):
            assert temperature == 0.0 and max_new_tokens == 12 and len(prompts) == 3
            return [tok.encode(t) for t in ("比喻做事", "安安安安安安", "形容高兴")]

    pairs = [("问一", "对一", "错一"), ("问二", "对二", "错二"), ("问三", "对三", "错三")]
    rejected, share = loops_rejected(Greedy(), tok, pairs, 12)
    assert rejected == [pairs[0], ("问二", "对二", "安安安安安安"), pairs[2]] and share == pytest.approx(1 / 3)
