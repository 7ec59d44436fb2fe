import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, metrics, run_ok, stage_flags, write_csv

from babyllama.checkpoint import load_model
from babyllama.tasks import char_f1
from grpo import Config, grpo_advantages, grpo_loss, make_rewarder
from model import IGNORE_INDEX, ModelArgs, Transformer


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
    y = torch.where(torch.arange(6) >= 3, x.roll(-1, 1), torch.tensor(IGNORE_INDEX))
    from model import token_logprobs
    with torch.no_grad():
        old, mask = token_logprobs(model, x, y)
    advantages = grpo_advantages(torch.full((1, 4), 0.7)).view(-1)
    trainer = Trainer(model, TrainConfig(lr=1e-2, min_lr=1e-4, warmup_steps=1, max_steps=1000, dtype="float32"), Dist())
    trainer.train_step([None], lambda m, _: grpo_loss(token_logprobs(m, x, y)[0], old, old, advantages,
                                                      mask.float(), 0.2, 0.04)[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grpo_raises_the_reward_of_separable_prompts(pretrained, small_tokenizer, tmp_path):
    """One short reference answer for every prompt, rewarded by character F1: answers that share its
    characters beat their group, and the mean reward rises. A random model never ends its answers and its
    greedy answer is a loop at every step, so here neither costs: only the F1 signal is under test."""
    ckpt, _ = pretrained
    write_csv(tmp_path / "prompts.csv", ["prompt", "answer", "history"],
              [[f"第{i}首诗", "春眠不觉晓", "[]"] for i in range(8)])
    run_ok([sys.executable, os.path.join(ROOT, "grpo.py"), *stage_flags(ckpt, small_tokenizer, tmp_path / "grpo"),
            f"--prompts={tmp_path / 'prompts.csv'}", "--task=all", "--max_steps=20", "--group_size=8",
            "--prompts_per_step=4", "--max_new_tokens=6", "--lr=1e-2", "--warmup_steps=1", "--kl_beta=0",
            "--penalize_unfinished=false", "--greedy_in_group=false"])
    rewards = [r["reward"] for r in metrics(tmp_path / "grpo")]
    assert all({"reward", "kl", "answer_tokens"} <= set(r) for r in metrics(tmp_path / "grpo"))
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1, rewards
    _, state = load_model(str(tmp_path / "grpo" / "ckpt.pt"))
    assert state["stage"] == "grpo"


def test_grpo_without_prompts_of_the_task_is_one_line(pretrained, preference, small_tokenizer, tmp_path):
    ckpt, _ = pretrained
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), *stage_flags(ckpt, small_tokenizer, tmp_path),
                          f"--prompts={preference / 'prompts.csv'}", "--task=character"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        f"error: {preference / 'prompts.csv'} has no single-turn prompts of task 'character'"]


class ScriptedModel:
    """Stands in for the policy in tool_rollouts: answers each generate call with the next scripted texts."""

    def __init__(self, tok, turns: list[list[str]], max_seq_len: int = 256):
        self.args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=max_seq_len)
        self.tok, self.turns, self.prompts, self.temperatures = tok, turns, [], []

    def generate(self, prompts, max_new_tokens, temperature, **_):
        self.prompts.append(prompts)
        self.temperatures.append(temperature)
        texts = self.turns.pop(0)
        assert len(texts) == len(prompts)
        return [self.tok.encode(t)[:max_new_tokens] for t in texts]


def test_tool_rollouts_run_the_call_and_reward_the_checked_answer(small_tokenizer):
    """Four rollouts of one task: a right call then the right answer (reward 1); a right call then a wrong
    answer (0); a call to a tool that fails (its error is the result); no call, the right number at once
    (1: the final answer is checked, however it came). Labels cover both answers, never the tool's result."""
    from babyllama.chat_format import Answer, render_answer, render_results
    from babyllama.tool_tasks import tasks
    from chatglm_tokenizer import load_tokenizer
    from grpo import Config, tool_rollouts
    tok = load_tokenizer(small_tokenizer)
    task = next(t for t in tasks("train", 50) if t.call.name == "calculator")
    right = render_answer(Answer("", task.reasoning, [task.call]))
    failing = right.replace(task.call.arguments["expression"], "1/0")
    model = ScriptedModel(tok, [[right, right, failing, f"答案是{task.expected}"],
                                [task.answer, "答案是-1", "算不出来"]])
    cfg = Config(group_size=4, max_new_tokens=120, final_tokens=40)
    examples, rewards, stats = tool_rollouts(model, tok, [task], cfg, torch.Generator())
    assert rewards == [1.0, 0.0, 0.0, 1.0] and stats == {"called": 0.75}
    second_prompts = model.prompts[1]
    assert tok.decode(second_prompts[0]).endswith(render_results([task.result]))
    assert render_results(["error: division by zero"]) in tok.decode(second_prompts[2])
    inputs, labels = examples[0]
    ids = inputs.tolist() + [labels[-1].item()]
    labelled = [i + 1 for i, y in enumerate(labels.tolist()) if y != IGNORE_INDEX]
    first, second = tok.encode(right), tok.encode(task.answer)
    prompt_len = len(model.prompts[0][0])
    response = len(second_prompts[0]) - prompt_len - len(first) - 1
    assert labelled == [*range(prompt_len, prompt_len + len(first) + 1),  # the first answer and its eos
                        *range(len(second_prompts[0]), len(second_prompts[0]) + len(second) + 1)]  # the second
    assert response > 0 and ids[labelled[-1]] == tok.eos_id
    one_turn = prompt_len + len(tok.encode(f"答案是{task.expected}")) + 1  # prompt, answer, eos
    assert len(examples[3][0]) == one_turn - 1  # inputs: all but the last


def test_grpo_on_tool_tasks_runs_end_to_end(pretrained, small_tokenizer, tmp_path):
    """Asked for look-ups without their tables (an empty --raw_dir), the run says they are left out and goes on."""
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=320, multiple_of=16)
    torch.save({"model": Transformer(args).state_dict(), "model_args": vars(args)}, tmp_path / "ckpt.pt")
    done = run_ok([sys.executable, os.path.join(ROOT, "grpo.py"),
                   *stage_flags(tmp_path / "ckpt.pt", small_tokenizer, tmp_path / "grpo"), "--task=tools",
                   "--max_steps=2", "--group_size=2", "--prompts_per_step=2", "--max_new_tokens=8", "--final_tokens=4",
                   "--tool_prompts=20", "--tool_lookups=true", f"--raw_dir={tmp_path}"])
    assert f"look-up tool tasks left out (idiom_meaning, char_reading): no table at {tmp_path}/idioms" in done.stdout
    assert all({"reward", "kl", "answer_tokens", "called"} <= set(r) for r in metrics(tmp_path / "grpo"))
    short, _ = pretrained  # a window of 32 tokens
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), *stage_flags(short, small_tokenizer, tmp_path),
                          "--task=tools"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "error: --task=tools: a window of 32 tokens leaves too little for the prompt beside the two answers and the "
        "result (96 tokens: --max_new_tokens + --final_tokens + 32)"]


def test_text_groups_hold_the_greedy_answer_and_an_unfinished_answer_earns_nothing(small_tokenizer):
    """Groups of 3 for 2 prompts: two samples each (one call at the set temperature), then each prompt's
    greedy answer (a call at temperature 0), which comes first in its group. An answer cut at max_new_tokens
    earns 0 however close to the reference; without the two options every answer is sampled and paid its F1."""
    from chatglm_tokenizer import load_tokenizer
    from grpo import text_rollouts
    tok = load_tokenizer(small_tokenizer)
    picked = [("问题一", "比喻做事多此一举"), ("问题二", "形容十分高兴")]
    long = "比喻做事多此一举，也说画蛇添足，语出战国策"
    sampled, greedy = ["比喻做事", long, "形容高兴", "不对"], ["比喻多此一举", "形容"]
    cfg = Config(group_size=3, max_new_tokens=len(tok.encode(long)) - 1)
    rewarder = make_rewarder(cfg, tok, "cpu")
    model = ScriptedModel(tok, [sampled, greedy])
    examples, rewards, _ = text_rollouts(model, tok, picked, cfg, rewarder, torch.Generator())
    assert model.temperatures == [cfg.temperature, 0.0] and len(examples) == 6
    in_order = [greedy[0], *sampled[:2], greedy[1], *sampled[2:]]
    answers = [tok.decode(tok.encode(a)[:cfg.max_new_tokens]) for a in in_order]
    references = [r for _, r in picked for _ in range(3)]
    expected = rewarder([""] * 6, answers, references)
    assert expected[2] > 0.3 and rewards == [*expected[:2], 0.0, *expected[3:]]
    plain = Config(group_size=3, max_new_tokens=cfg.max_new_tokens, greedy_in_group=False, penalize_unfinished=False)
    model = ScriptedModel(tok, [[*sampled[:2], "比喻", *sampled[2:], "形容"]])
    _, rewards, _ = text_rollouts(model, tok, picked, plain, rewarder, torch.Generator())
    assert model.temperatures == [plain.temperature] and rewards[1] == expected[2]


def test_repeats_cost_reward():
    """F1 rewards recall, so a looping answer that repeats the reference's characters would beat a short wrong
    one; with penalize_repeats (the default) a loop gets 0 and F1 is scaled by the distinct characters' share."""
    reference = "比喻做事多此一举"
    answers = ["比喻多此一举多此一举多此一举", "比喻做事做事", "完全不对"]
    rewards = make_rewarder(Config(), None, "cpu")([""] * 3, answers, [reference] * 3)
    assert rewards[0] == 0.0 and rewards[2] == 0.0
    assert rewards[1] == pytest.approx(char_f1(answers[1], reference) * 4 / 6) and rewards[1] > 0
    plain = make_rewarder(Config(penalize_repeats=False), None, "cpu")([""] * 3, answers, [reference] * 3)
    assert plain[0] == char_f1(answers[0], reference) > 0 and plain[1] == char_f1(answers[1], reference)


def test_with_a_reward_model_a_loop_gets_the_lowest_score_of_the_batch(monkeypatch):
    """A reward model's scores may be negative, so a loop is not scaled but given the batch's lowest score."""
    import babyllama.reward_model

    class FakeRewardModel:
        def score(self, tok, prompts, answers):
            return [2.0, -1.5, 0.5]

    monkeypatch.setattr(babyllama.reward_model, "load_reward_model", lambda path, device: (FakeRewardModel(), None))
    answers = ["好好好好好好", "一个回答", "另一个回答"]
    rewards = make_rewarder(Config(reward="model"), None, "cpu")([""] * 3, answers, [""] * 3)
    assert rewards == [-1.5, -1.5, 0.5]
    plain = make_rewarder(Config(reward="model", penalize_repeats=False), None, "cpu")([""] * 3, answers, [""] * 3)
    assert plain == [2.0, -1.5, 0.5]
