"""Group Relative Policy Optimization: for each prompt, sample a group of answers, reward them, and
push the policy towards the answers that beat their group's mean, with a KL penalty to the reference.

    python grpo.py                                     # idiom questions, reward = character F1 vs the meaning
    python grpo.py --reward=model --reward_model=out/rm/ckpt.pt

advantage_i = (r_i - mean(r)) / (std(r) + eps) within each group (equal rewards: zero advantage);
per answer token: min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) - kl_beta * KL, with
ratio = pi / pi_old and KL = exp(ref - logp) - (ref - logp) - 1 (the k3 estimator), averaged over
each answer's tokens, then over answers. Logged: mean reward, KL, answer length.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

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
from babyllama.tasks import char_f1, task_of
from babyllama.trainer import TrainConfig, frozen_reference, start_training, train_loop, training_stage
from chatglm_tokenizer import OUR_TOKENIZER
from dataset_sft import chat_prompt_ids, collate, read_sft_csv
from model import IGNORE_INDEX, token_logprobs


@dataclass
class Config(TrainConfig):
    init_from: InputFile = "out/sft/ckpt.pt"  # the policy starts here; the frozen reference is this model
    prompts: InputFile = "sft_data/sft_data.csv"  # questions with reference answers
    task: one_of("idiom", "character", "other", "all") = "idiom"  # which prompts: idiom, character, other or all
    tokenizer: InputFile = OUR_TOKENIZER
    out_dir: OutputDir = "out/grpo"
    reward: one_of("f1", "model") = "f1"  # f1 (character F1 against the reference) or model (a reward model's score)
    reward_model: str = "out/rm/ckpt.pt"  # used when reward=model
    group_size: in_range(2, 1 << 16, int) = 8  # answers sampled per prompt
    prompts_per_step: Positive = 4  # prompts per optimizer step in each process
    max_new_tokens: Positive = 48
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


def make_rewarder(cfg: Config, tok, device: str):
    """rewards(prompts, answers, references) -> list of floats."""
    if cfg.reward == "f1":
        return lambda prompts, answers, references: [char_f1(a, r) for a, r in zip(answers, references)]
    from babyllama.reward_model import load_reward_model
    rm, _ = load_reward_model(cfg.reward_model, device)
    return lambda prompts, answers, references: rm.score(tok, prompts, answers)


def main(argv: list[str] | None = None) -> None:
    with training_stage(Config, argv, __doc__) as (cfg, dist):
        if cfg.grad_accum != 1:
            raise SettingError(f"--grad_accum={cfg.grad_accum}: GRPO takes a step per group of rollouts; "
                               "set the prompts a step with --prompts_per_step")
        policy, _, tok = load_model_and_tokenizer(cfg.init_from, cfg.tokenizer)
        reference = frozen_reference(policy, dist.device)
        policy.train()
        rows = [(p, a) for p, a, h in read_sft_csv(cfg.prompts)
                if not h and (cfg.task == "all" or task_of(p) == cfg.task)]
        if not rows:
            raise ValueError(f"{cfg.prompts} has no single-turn prompts of task {cfg.task!r}")
        rewarder = make_rewarder(cfg, tok, dist.device)
        max_len = policy.args.max_seq_len
        print0(f"GRPO from {cfg.init_from}: {len(rows):,} {cfg.task} prompts, groups of {cfg.group_size}, "
               f"reward {cfg.reward}", dist=dist)
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
            prompt_ids = [chat_prompt_ids(tok, [], p, max_len, reserve=cfg.max_new_tokens) for p, _ in picked]
            with trainer.evaluating() as model:
                completions = model.generate([ids for ids in prompt_ids for _ in range(cfg.group_size)],
                                             cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                                             eos_id=tok.eos_id, generator=generator)
            prompts = [p for p, _ in picked for _ in range(cfg.group_size)]
            references = [a for _, a in picked for _ in range(cfg.group_size)]
            answers = [tok.decode(c) for c in completions]
            rewards = torch.tensor(rewarder(prompts, answers, references), dtype=torch.float32)
            advantages = grpo_advantages(rewards.view(-1, cfg.group_size)).view(-1)
            examples = answer_examples(prompt_ids, completions, cfg.group_size, tok.eos_id, cfg.max_new_tokens,
                                       max_len)
            x, y = collate(examples, tok.pad_id)
            x, y = x.to(dist.device), y.to(dist.device)
            with torch.no_grad(), autocast(dist.device, trainer.dtype):
                old, _ = token_logprobs(trainer.raw_model, x, y)
                ref, _ = token_logprobs(reference, x, y)
            stats = {"reward": float(rewards.mean()),
                     "answer_tokens": sum(len(c) for c in completions) / len(completions)}
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
