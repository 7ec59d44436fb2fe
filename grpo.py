"""Group Relative Policy Optimization: for each prompt, sample a group of answers, reward them, and
push the policy towards the answers that beat their group's mean, with a KL penalty to the reference.

    python grpo.py                                     # idiom questions, reward = character F1 vs the meaning
    python grpo.py --reward=model --reward_model=out/rm/ckpt.pt
    python grpo.py --task=tools                        # tool tasks: call, the tool runs, answer; reward = right answer

advantage_i = (r_i - mean(r)) / (std(r) + eps) within each group (equal rewards: zero advantage);
per answer token: min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) - kl_beta * KL, with
ratio = pi / pi_old and KL = exp(ref - logp) - (ref - logp) - 1 (the k3 estimator), averaged over
each answer's tokens, then over answers. Logged: mean reward, KL, answer length. Repeats cost reward
(--penalize_repeats): F1 pays for recall, and a long answer repeating a few of the reference's
characters would otherwise pay; an answer in a loop earns the lowest reward, and F1 is scaled by the
answer's share of distinct characters. So does an answer that never ends (--penalize_unfinished: cut at
--max_new_tokens). Chat and evaluation decode greedily, and a loop can be one that only greedy decoding
falls into: each group holds its prompt's greedy answer beside the samples (--greedy_in_group).

With --task=tools the prompts are generated tool tasks (tool_tasks.py, the training split) with every built-in
tool offered, and each rollout has two turns: the model's first answer; when it calls a tool, the tool runs
and the model answers again after the result. The reward is 1 when the final answer holds the task's checked
result, else 0. Both turns are trained on, the tool's result is not (docs/13_tools.md).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from babyllama.chat_format import parse_answer, render_results, render_tools
from babyllama.checkpoint import load_model_and_tokenizer
from babyllama.common import print0
from babyllama.configurator import (
    InputFile,
    NonNegative,
    NonNegativeFloat,
    OutputDir,
    Positive,
    PositiveFloat,
    in_range,
    one_of,
)
from babyllama.errors import SettingError
from babyllama.precision import autocast
from babyllama.tasks import char_f1, has_loop, task_of
from babyllama.tool_tasks import ToolTask, all_tools, missing_lookups, tasks
from babyllama.tools import builtin_tools, run_tool
from babyllama.trainer import TrainConfig, frozen_reference, start_training, train_loop, training_stage
from chatglm_tokenizer import OUR_TOKENIZER
from dataset_sft import chat_prompt_ids, collate, read_sft_csv
from model import IGNORE_INDEX, token_logprobs


@dataclass
class Config(TrainConfig):
    init_from: InputFile = "out/sft/ckpt.pt"  # the policy starts here; the frozen reference is this model
    prompts: str = "sft_data/sft_data.csv"  # questions with reference answers (not read with --task=tools)
    task: one_of("idiom", "character", "other", "all", "tools") = "idiom"  # which prompts of --prompts, or tools
    tokenizer: InputFile = OUR_TOKENIZER
    out_dir: OutputDir = "out/grpo"
    reward: one_of("f1", "model") = "f1"  # f1 (character F1 against the reference) or model (a reward model's score)
    penalize_repeats: bool = True  # a loop earns the lowest reward; F1 is scaled by the share of distinct characters
    penalize_unfinished: bool = True  # a text answer cut at max_new_tokens (no eos) earns the lowest reward
    greedy_in_group: bool = True  # a text prompt's group holds its greedy answer beside group_size - 1 samples
    reward_model: str = "out/rm/ckpt.pt"  # used when reward=model
    group_size: in_range(2, 1 << 16, int) = 8  # answers sampled per prompt
    prompts_per_step: Positive = 4  # prompts per optimizer step in each process
    max_new_tokens: Positive = 48  # a text answer's; with --task=tools, the first turn's (reasoning and call)
    final_tokens: Positive = 16  # with --task=tools: the answer after the tool's result (a look-up's: more)
    tool_prompts: Positive = 5000  # with --task=tools: generated training tasks to draw from
    tool_lookups: bool = False  # with --task=tools: also look-up tasks, the look-up tools offered
    raw_dir: str = "data/raw"  # with --tool_lookups: the tables (download_data.py's idioms and dictionary)
    temperature: NonNegativeFloat = 1.0
    top_k: NonNegative = 0  # 0 keeps every token
    clip_eps: PositiveFloat = 0.2
    kl_beta: NonNegativeFloat = 0.04
    max_steps: NonNegative = 100
    lr: PositiveFloat = 1e-4
    min_lr: NonNegativeFloat = 1e-5
    warmup_steps: NonNegative = 5
    log_interval: Positive = 5
    save_interval: Positive = 50


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(groups, group_size) rewards -> advantages normalised within each group; a group whose rewards
    are all equal gets zeros (nothing to learn from it)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    return torch.where(std > 0, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, kl_beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (to minimise) and mean KL; token tensors are (B, T), advantages (B,)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    objective = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    per_token = -(objective - kl_beta * kl) * mask
    per_answer = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
    mean_kl = ((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    return per_answer.mean(), mean_kl.detach()


def answer_examples(prompt_ids: list[list[int]], completions: list[list[int]], group_size: int, eos_id: int,
                    max_new_tokens: int, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) of each sampled answer after its prompt (completion i answers prompt
    i // group_size): labels only on the answer, closed by eos unless it was cut at max_new_tokens."""
    examples = []
    for i, completion in enumerate(completions):
        prompt = prompt_ids[i // group_size]
        ids = (prompt + completion + ([eos_id] if len(completion) < max_new_tokens else []))[:max_len + 1]
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
        examples.append((torch.tensor(ids[:-1]), torch.tensor(labels[1:])))
    return examples


def closed(answer: list[int], limit: int, tok) -> list[int]:
    """An answer as it is trained on: closed by eos, unless it was cut at its limit."""
    return answer + ([tok.eos_id] if len(answer) < limit else [])


def result_prompt(result: str, tok) -> list[int]:
    """The turn that hands the tool's result back: the result between response markers, then bos."""
    return tok.encode(render_results([result])) + [tok.bos_id]


def tool_turns(prompt: list[int], first: list[int], result: str | None, second: list[int], tok,
               cfg: Config) -> tuple[list[int], list[int]]:
    """A tool rollout's ids and labels: the prompt and the first answer, and when a tool ran, its result
    and the second answer. Labels only on the answers."""
    parts = [(prompt, False), (closed(first, cfg.max_new_tokens, tok), True)]
    if result is not None:
        parts += [(result_prompt(result, tok), False), (closed(second, cfg.final_tokens, tok), True)]
    ids = [t for part, _ in parts for t in part]
    labels = [t if answer else IGNORE_INDEX for part, answer in parts for t in part]
    return ids, labels


def tool_room(cfg: Config) -> int:
    """The tokens a tool rollout keeps free after its prompt: the two answers and the tool's result."""
    return cfg.max_new_tokens + cfg.final_tokens + 32


def tool_rollouts(model, tok, picked: list[ToolTask], cfg: Config, generator: torch.Generator,
                  ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[float], dict]:
    """cfg.group_size rollouts of each task: the first answer; when it makes a call (and stopped by itself),
    the call runs and the model answers again after the result. Returns each rollout's (inputs, labels),
    its reward (1.0 when the final answer holds the task's result) and the share of rollouts that called."""
    max_len = model.args.max_seq_len
    sample = {"temperature": cfg.temperature, "top_k": cfg.top_k or None, "eos_id": tok.eos_id, "generator": generator}
    room = tool_room(cfg)
    offered = render_tools(all_tools(cfg.tool_lookups))
    prompts = [chat_prompt_ids(tok, [], offered + t.question, max_len, reserve=room) for t in picked]
    rows = [(t, ids) for t, ids in zip(picked, prompts) for _ in range(cfg.group_size)]
    firsts = model.generate([ids for _, ids in rows], cfg.max_new_tokens, **sample)
    calls = [parse_answer(tok.decode(f)).tool_calls if len(f) < cfg.max_new_tokens else [] for f in firsts]
    tools = builtin_tools(cfg.raw_dir)
    results = {i: run_tool(c[0].name, c[0].arguments, tools) for i, c in enumerate(calls) if c}
    contexts = {i: rows[i][1] + closed(firsts[i], cfg.max_new_tokens, tok) + result_prompt(result, tok)
                for i, result in results.items()}
    called = [i for i in results if len(contexts[i]) + cfg.final_tokens <= max_len]
    seconds = dict(zip(called, model.generate([contexts[i] for i in called], cfg.final_tokens, **sample)
                       if called else []))
    examples, rewards = [], []
    for i, ((t, prompt), first) in enumerate(zip(rows, firsts)):
        ran = i in seconds
        ids, labels = tool_turns(prompt, first, results[i] if ran else None, seconds.get(i, []), tok, cfg)
        final = tok.decode(seconds[i] if ran else first)
        rewards.append(float(t.holds_result(parse_answer(final).content)))
        examples.append((torch.tensor(ids[:-1]), torch.tensor(labels[1:])))
    return examples, rewards, {"called": len(seconds) / len(rows)}


def text_rollouts(model, tok, picked: list[tuple[str, str]], cfg: Config, rewarder, generator: torch.Generator,
                  ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[float], dict]:
    """cfg.group_size answers to each (prompt, reference) (group_answers), rewarded against the reference;
    with cfg.penalize_unfinished an answer cut at max_new_tokens earns the lowest reward. Returns each
    answer's (inputs, labels), its reward and no extra stats."""
    max_len = model.args.max_seq_len
    prompt_ids = [chat_prompt_ids(tok, [], p, max_len, reserve=cfg.max_new_tokens) for p, _ in picked]
    completions = group_answers(model, prompt_ids, cfg, tok.eos_id, generator)
    prompts = [p for p, _ in picked for _ in range(cfg.group_size)]
    references = [a for _, a in picked for _ in range(cfg.group_size)]
    rewards = rewarder(prompts, [tok.decode(c) for c in completions], references)
    if cfg.penalize_unfinished:
        rewards = lowest_when(rewards, [len(c) >= cfg.max_new_tokens for c in completions], cfg.reward)
    return answer_examples(prompt_ids, completions, cfg.group_size, tok.eos_id, cfg.max_new_tokens,
                           max_len), rewards, {}


def make_rewarder(cfg: Config, tok, device: str):
    """rewards(prompts, answers, references) -> list of floats. With cfg.penalize_repeats an answer in a
    loop (tasks.has_loop) gets the lowest reward (F1's 0, or a reward model's lowest score among these
    answers), and an F1 reward is scaled by the answer's share of distinct characters."""
    if cfg.reward == "f1":
        def score(prompts, answers, references):
            return [char_f1(a, r) for a, r in zip(answers, references)]
    else:
        from babyllama.reward_model import load_reward_model
        rm, _ = load_reward_model(cfg.reward_model, device)

        def score(prompts, answers, references):
            return rm.score(tok, prompts, answers)
    if not cfg.penalize_repeats:
        return score

    def score_with_repeats_costing(prompts, answers, references):
        scores = score(prompts, answers, references)
        if cfg.reward == "f1":
            scores = [s * distinct_share(a) for a, s in zip(answers, scores)]
        return lowest_when(scores, [has_loop(a) for a in answers], cfg.reward)
    return score_with_repeats_costing


def group_answers(model, prompt_ids: list[list[int]], cfg: Config, eos_id: int,
                  generator: torch.Generator) -> list[list[int]]:
    """cfg.group_size answers per prompt, each prompt's group contiguous. With cfg.greedy_in_group the first
    of each group is its greedy answer: chat and evaluation decode greedily, so a loop that only greedy
    decoding falls into is seen, and paid for, in training."""
    samples = cfg.group_size - 1 if cfg.greedy_in_group else cfg.group_size
    sampled = model.generate([ids for ids in prompt_ids for _ in range(samples)], cfg.max_new_tokens,
                             temperature=cfg.temperature, top_k=cfg.top_k or None, eos_id=eos_id, generator=generator)
    if not cfg.greedy_in_group:
        return sampled
    greedy = model.generate(prompt_ids, cfg.max_new_tokens, temperature=0.0, eos_id=eos_id)
    return [answer for i, g in enumerate(greedy) for answer in [g, *sampled[i * samples:(i + 1) * samples]]]


def lowest_when(rewards: list[float], flags: list[bool], reward: str) -> list[float]:
    """Each flagged reward replaced by the lowest one: F1's 0, or a reward model's lowest score among these."""
    lowest = 0.0 if reward == "f1" else min(rewards)
    return [lowest if flag else r for r, flag in zip(rewards, flags)]


def distinct_share(text: str) -> float:
    """The share of a text's characters that are distinct (1 for an empty text)."""
    return len(set(text)) / len(text) if text else 1.0


def main(argv: list[str] | None = None) -> None:
    with training_stage(Config, argv, __doc__) as (cfg, dist):
        if cfg.grad_accum != 1:
            raise SettingError(f"--grad_accum={cfg.grad_accum}: GRPO takes a step per group of rollouts; "
                               "set the prompts a step with --prompts_per_step")
        policy, _, tok = load_model_and_tokenizer(cfg.init_from, cfg.tokenizer)
        reference = frozen_reference(policy, dist.device)
        policy.train()
        if cfg.task == "tools":
            if policy.args.max_seq_len < tool_room(cfg) + 64:
                raise SettingError(f"--task=tools: a window of {policy.args.max_seq_len} tokens leaves too little for "
                                   f"the prompt beside the two answers and the result ({tool_room(cfg)} tokens: "
                                   "--max_new_tokens + --final_tokens + 32)")
            if cfg.tool_lookups and (note := missing_lookups(cfg.raw_dir)):
                print0(note, dist=dist)
            rows = list(tasks("train", cfg.tool_prompts, seed=cfg.seed,
                              raw_dir=cfg.raw_dir if cfg.tool_lookups else None))
        elif not os.path.isfile(cfg.prompts):
            raise SettingError(f"--prompts={cfg.prompts}: no such file")
        else:
            rows = [(p, a) for p, a, h in read_sft_csv(cfg.prompts)
                    if not h and (cfg.task == "all" or task_of(p) == cfg.task)]
        if not rows:
            raise ValueError(f"{cfg.prompts} has no single-turn prompts of task {cfg.task!r}")
        rewarder = make_rewarder(cfg, tok, dist.device)
        max_len = policy.args.max_seq_len
        reward = "the checked final answer" if cfg.task == "tools" else cfg.reward
        print0(f"GRPO from {cfg.init_from}: {len(rows):,} {cfg.task} prompts, groups of {cfg.group_size}, "
               f"reward {reward}", dist=dist)
        training = start_training(cfg, policy, dist, len(rows), cfg.prompts_per_step,
                                  policy.flops_per_token(max_len), stage="grpo", tokenizer_sha256=tok.sha256,
                                  items_flag="--prompts_per_step", accumulates=False)
        trainer, order, state = training.trainer, training.order, training.state
        generator = torch.Generator(device=dist.device).manual_seed(cfg.seed + 1000 * dist.rank + trainer.step)
        if state is not None and "sampler" in state and not dist.enabled:  # one process resumes its sampling exactly
            generator.set_state(state["sampler"])

        def rollouts():
            """Sample a group of answers per prompt with the current policy, reward them, and build the
            training batch: (inputs, labels, advantages, old log-probs, reference log-probs, stats)."""
            picked = [rows[i] for i in order.next(cfg.prompts_per_step)]
            with trainer.evaluating() as model:
                if cfg.task == "tools":
                    examples, rewards, stats = tool_rollouts(model, tok, picked, cfg, generator)
                else:
                    examples, rewards, stats = text_rollouts(model, tok, picked, cfg, rewarder, generator)
            rewards = torch.tensor(rewards, dtype=torch.float32)
            advantages = grpo_advantages(rewards.view(-1, cfg.group_size)).view(-1)
            x, y = collate(examples, tok.pad_id)
            x, y = x.to(dist.device), y.to(dist.device)
            with torch.no_grad(), autocast(dist.device, trainer.dtype):
                old, _ = token_logprobs(trainer.raw_model, x, y)
                ref, _ = token_logprobs(reference, x, y)
            answer_tokens = float((y != IGNORE_INDEX).sum() / len(y))  # eos included
            stats = {"reward": float(rewards.mean()), "answer_tokens": answer_tokens, **stats}
            return [(x, y, advantages.to(dist.device), old, ref, stats)], int((x != tok.pad_id).sum())

        def loss_fn(model, batch):
            x, y, advantages, old, ref, stats = batch
            logp, mask = token_logprobs(model, x, y)
            loss, kl = grpo_loss(logp, old, ref, advantages, mask.float(), cfg.clip_eps, cfg.kl_beta)
            return loss, {**stats, "kl": float(kl)}

        train_loop(training, rollouts, loss_fn, None, lambda: {"sampler": generator.get_state()})
        print0(f"checkpoint: {os.path.join(cfg.out_dir, 'ckpt.pt')}", dist=dist)


if __name__ == "__main__":
    main(sys.argv[1:])
