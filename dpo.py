"""Direct Preference Optimization: raise the likelihood of chosen answers over rejected ones, relative to
a frozen reference (the SFT model), without a reward model.

    python dpo.py                                        # from out/sft/ckpt.pt on sft_data/preference.csv
    python dpo.py --beta=0.1 --label_smoothing=0.1 --out_dir=out/dpo_smooth

loss = -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))), sequence log-probs
summing the answer tokens only; with label smoothing e the loss is (1 - e) times that plus e times the
same for the swapped pair (conservative DPO). With --nll_weight w, w times the chosen answers' mean negative
log-likelihood per token is added (RPO: it keeps the chosen answers likely, where DPO alone may lower both
answers and drift into repetition; docs/07_dpo.md). With --reject_loops the policy answers each batch's
prompts greedily first (as chat and evaluation decode), and an answer stuck in a loop becomes its pair's
rejected answer: the model's own loops are what it learns to prefer less. Logged: the implicit rewards
beta * (log pi - log ref) of chosen and rejected answers, their margin, how often it is positive, and with
--reject_loops the share of the batch's greedy answers in a loop.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from babyllama.checkpoint import load_model_and_tokenizer
from babyllama.common import print0
from babyllama.configurator import Fraction, InputFile, NonNegativeFloat, OutputDir, Positive, PositiveFloat
from babyllama.distributed import all_reduce_mean
from babyllama.precision import autocast
from babyllama.tasks import has_loop
from babyllama.trainer import TrainConfig, frozen_reference, start_training, train_loop, training_stage
from chatglm_tokenizer import OUR_TOKENIZER
from dataset_sft import chat_prompt_ids, collate, encode_turns, make_example, read_pairs
from model import answer_logprobs


@dataclass
class Config(TrainConfig):
    init_from: InputFile = "out/sft/ckpt.pt"  # the policy starts here and the frozen reference is this model
    data: InputFile = "sft_data/preference.csv"
    val_data: InputFile = "sft_data/preference_val.csv"
    tokenizer: InputFile = OUR_TOKENIZER
    out_dir: OutputDir = "out/dpo"
    beta: PositiveFloat = 0.1  # strength of the pull towards the reference
    label_smoothing: Fraction = 0.0  # assumed share of wrong preference labels (conservative DPO)
    nll_weight: NonNegativeFloat = 1.0  # weight of the chosen answers' per-token NLL added to the loss (RPO; 0: DPO)
    reject_loops: bool = True  # a greedy answer of the policy stuck in a loop replaces its pair's rejected answer
    loop_tokens: Positive = 32  # with --reject_loops: the greedy answers' length
    batch_size: Positive = 16  # pairs per micro-step in each process
    epochs: PositiveFloat = 1.0
    lr: PositiveFloat = 5e-5
    min_lr: NonNegativeFloat = 5e-6
    eval_interval: Positive = 100
    eval_pairs: Positive = 256
    save_interval: Positive = 200


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """Mean DPO loss and the implicit rewards (beta * log-ratio) of chosen and rejected answers."""
    chosen_reward = beta * (policy_chosen.float() - ref_chosen.float())
    rejected_reward = beta * (policy_rejected.float() - ref_rejected.float())
    margin = chosen_reward - rejected_reward
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss.mean(), chosen_reward.detach(), rejected_reward.detach()


def chosen_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The chosen answers' negative log-likelihood per token, averaged over the answers (RPO's term)."""
    return -(policy_chosen.float() / chosen_tokens.clamp(min=1)).mean()


def pair_examples(tok, pairs, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and answer labels of every chosen answer, then of every rejected one."""
    examples = [make_example(*encode_turns(tok, [(p, c)], max_seq_len)) for p, c, _ in pairs]
    examples += [make_example(*encode_turns(tok, [(p, r)], max_seq_len)) for p, _, r in pairs]
    return collate(examples, tok.pad_id)


def loops_rejected(model, tok, pairs: list[tuple[str, str, str]], max_new_tokens: int,
                   ) -> tuple[list[tuple[str, str, str]], float]:
    """The pairs, each rejected answer replaced by the model's greedy answer to its prompt where that answer
    is stuck in a loop (tasks.has_loop), and the share of such answers. The loop is trained on as any
    rejected answer is, closed by eos: its repeated tokens are what lose probability."""
    max_len = model.args.max_seq_len
    reserve = min(max_new_tokens, max_len // 2)  # a small window keeps room for the prompt's end
    prompts = [chat_prompt_ids(tok, [], p, max_len, reserve=reserve) for p, _, _ in pairs]
    answers = [tok.decode(a) for a in model.generate(prompts, max_new_tokens, temperature=0.0, eos_id=tok.eos_id)]
    looped = [has_loop(a) for a in answers]
    return [(p, c, a if loop else r) for (p, c, r), a, loop in zip(pairs, answers, looped)], sum(looped) / len(pairs)


def main(argv: list[str] | None = None) -> None:
    with training_stage(Config, argv, __doc__) as (cfg, dist):
        policy, _, tok = load_model_and_tokenizer(cfg.init_from, cfg.tokenizer)
        reference = frozen_reference(policy, dist.device)
        policy.train()
        pairs = read_pairs(cfg.data)
        val = read_pairs(cfg.val_data)[:cfg.eval_pairs] if cfg.val_data else []
        max_len = policy.args.max_seq_len
        print0(f"DPO from {cfg.init_from}: {len(pairs):,} pairs, beta {cfg.beta}", dist=dist)
        training = start_training(cfg, policy, dist, len(pairs), cfg.batch_size, policy.flops_per_token(max_len),
                                  stage="dpo", tokenizer_sha256=tok.sha256)
        trainer, order = training.trainer, training.order

        def with_reference(x: torch.Tensor, y: torch.Tensor, stats: dict | None = None):
            with torch.no_grad():
                ref_logp, _ = answer_logprobs(reference, x, y)
            return x, y, ref_logp, stats or {}

        def next_batches():
            out, tokens = [], 0
            for _ in range(cfg.grad_accum):
                group, stats = [pairs[i] for i in order.next(cfg.batch_size)], {}
                if cfg.reject_loops:
                    with trainer.evaluating() as model:
                        group, stats["looped"] = loops_rejected(model, tok, group, cfg.loop_tokens)
                x, y = pair_examples(tok, group, max_len)
                with autocast(dist.device, trainer.dtype):
                    out.append(with_reference(x.to(dist.device), y.to(dist.device), stats))
                tokens += int((x != tok.pad_id).sum())
            return out, tokens

        def loss_fn(model, batch):
            x, y, ref_logp, stats = batch
            logp, counts = answer_logprobs(model, x, y)
            pc, pr = logp.chunk(2)
            rc, rr = ref_logp.chunk(2)
            loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.label_smoothing)
            nll = chosen_nll(pc, counts.chunk(2)[0])
            margin = chosen - rejected
            return loss + cfg.nll_weight * nll, {
                "chosen_nll": float(nll.detach()), "reward_chosen": float(chosen.mean()),
                "reward_rejected": float(rejected.mean()), "margin": float(margin.mean()),
                "accuracy": float((margin > 0).float().mean()), **stats}

        @torch.no_grad()
        def validation() -> dict[str, float]:
            mine = val[dist.rank::dist.world_size]
            totals = {"val_loss": 0.0, "val_accuracy": 0.0}
            with trainer.evaluating() as model, autocast(dist.device, trainer.dtype):
                for start in range(0, len(mine), cfg.batch_size):
                    x, y = pair_examples(tok, mine[start:start + cfg.batch_size], max_len)
                    loss, metrics = loss_fn(model, with_reference(x.to(dist.device), y.to(dist.device)))
                    share = len(mine[start:start + cfg.batch_size]) / len(mine)
                    totals["val_loss"] += float(loss) * share
                    totals["val_accuracy"] += metrics["accuracy"] * share
            return {k: all_reduce_mean(v, dist) for k, v in totals.items()}

        train_loop(training, next_batches, loss_fn, validation if val else None)
        print0(f"checkpoint: {os.path.join(cfg.out_dir, 'ckpt.pt')}", dist=dist)


if __name__ == "__main__":
    main(sys.argv[1:])
