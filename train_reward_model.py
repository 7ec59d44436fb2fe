"""A reward model: the SFT model with a scalar head on the final hidden state of the last token of
prompt + answer, trained on preference pairs with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).

    python train_reward_model.py                          # from out/sft/ckpt.pt on sft_data/preference.csv
    python train_reward_model.py --init_from=out/sft_lora/ckpt.pt --out_dir=out/rm_lora

Reports the pairwise accuracy on held-out pairs (chance 0.5). `RewardModel.score(prompts, answers)`
gives rewards for the RL stage and for eval.py.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from babyllama.checkpoint import load_model_and_tokenizer
from babyllama.common import print0, write_json_atomic
from babyllama.configurator import InputFile, OutputDir, Positive, PositiveFloat
from babyllama.distributed import all_reduce_mean
from babyllama.precision import autocast
from babyllama.reward_model import RewardModel, load_reward_model, pair_batch, pair_loss, pairwise_accuracy
from babyllama.tasks import pair_kind
from babyllama.trainer import TrainConfig, start_training, train_loop, training_stage
from chatglm_tokenizer import OUR_TOKENIZER, load_tokenizer
from dataset_sft import read_pairs


@dataclass
class Config(TrainConfig):
    init_from: str = "out/sft/ckpt.pt"  # the SFT model the reward model starts from
    data: InputFile = "sft_data/preference.csv"  # prompt, chosen, rejected
    val_data: InputFile = "sft_data/preference_val.csv"
    tokenizer: InputFile = OUR_TOKENIZER
    out_dir: OutputDir = "out/rm"
    batch_size: Positive = 16  # pairs per micro-step in each process
    epochs: PositiveFloat = 1.0  # passes over the pairs, when max_steps is 0
    eval_interval: Positive = 100
    eval_pairs: Positive = 500  # held-out pairs scored at each evaluation (with eval_only: of each kind)
    save_interval: Positive = 200
    eval_only: bool = False  # only score out_dir/ckpt.pt on val_data, per kind of pair, into out_dir/eval.json


def evaluate_only(cfg: Config, device: str) -> dict:
    """Held-out pairwise accuracy of a trained reward model, overall and per kind of pair."""
    tok = load_tokenizer(cfg.tokenizer)
    model, _ = load_reward_model(os.path.join(cfg.out_dir, "ckpt.pt"), device)
    pairs = read_pairs(cfg.val_data)
    by_kind: dict[str, list] = {}
    for pair in pairs:
        kind = by_kind.setdefault(pair_kind(pair[0]), [])
        if len(kind) < cfg.eval_pairs:
            kind.append(pair)
    result = {kind: {"pairs": len(p), "accuracy": pairwise_accuracy(model, tok, p, cfg.batch_size, device)}
              for kind, p in sorted(by_kind.items())}
    scored = sum(r["pairs"] for r in result.values())
    result["all"] = {"pairs": scored, "accuracy": sum(r["accuracy"] * r["pairs"] for r in result.values()) / scored}
    for kind, r in result.items():
        print(f"{kind:<8} {r['pairs']:>6} held-out pairs: accuracy {r['accuracy']:.3f} (chance 0.5)")
    write_json_atomic(os.path.join(cfg.out_dir, "eval.json"), result)
    return result


def main(argv: list[str] | None = None) -> None:
    with training_stage(Config, argv, __doc__) as (cfg, dist):
        if cfg.eval_only:
            evaluate_only(cfg, dist.device)
            return
        base, _, tok = load_model_and_tokenizer(cfg.init_from, cfg.tokenizer)
        model = RewardModel(base).train()
        pairs = read_pairs(cfg.data)
        val = read_pairs(cfg.val_data)[:cfg.eval_pairs] if cfg.val_data else []
        print0(f"reward model from {cfg.init_from}: {len(pairs):,} pairs", dist=dist)
        training = start_training(cfg, model, dist, len(pairs), cfg.batch_size,
                                  base.flops_per_token(base.args.max_seq_len), stage="reward",
                                  tokenizer_sha256=tok.sha256)
        trainer, order = training.trainer, training.order

        def next_batches():
            batches = [pair_batch(tok, [pairs[i] for i in order.next(cfg.batch_size)], base.args.max_seq_len)
                       for _ in range(cfg.grad_accum)]
            tokens = sum(int(n.sum()) for _, n in batches)
            return [(t.to(dist.device), n.to(dist.device)) for t, n in batches], tokens

        def validation() -> dict[str, float]:
            with trainer.evaluating() as m, autocast(dist.device, trainer.dtype):
                mine = val[dist.rank::dist.world_size]
                return {"val_accuracy": all_reduce_mean(pairwise_accuracy(m, tok, mine, cfg.batch_size, dist.device),
                                                        dist)}

        train_loop(training, next_batches, pair_loss, validation if val else None)
        print0(f"reward model: {os.path.join(cfg.out_dir, 'ckpt.pt')}", dist=dist)


if __name__ == "__main__":
    main(sys.argv[1:])
