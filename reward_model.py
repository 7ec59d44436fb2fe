"""A reward model: the SFT model with a scalar head on the final hidden state of the last token of
prompt + answer, trained on preference pairs with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).

    python reward_model.py                          # from out/sft/ckpt.pt on sft_data/preference.csv
    python reward_model.py --init_from=out/sft_lora/ckpt.pt --out_dir=out/rm_lora

Reports the pairwise accuracy on held-out pairs (chance 0.5). `RewardModel.score(prompts, answers)`
gives rewards for the RL stage and for eval.py.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chatglm_tokenizer import SPTokenizer, load_tokenizer
from configurator import parse_config
from dataset_sft import encode_turns
from model import ModelArgs, Transformer, load_model
from trainer import (
    Dist,
    TrainConfig,
    all_reduce_mean,
    autocast,
    fit,
    print0,
    run_stage,
    start_run,
)


@dataclass
class Config(TrainConfig):
    init_from: str = "out/sft/ckpt.pt"  # the SFT model the reward model starts from
    data: str = "sft_data/preference.csv"  # prompt, chosen, rejected
    val_data: str = "sft_data/preference_val.csv"
    tokenizer: str = "data/tokenizer/tokenizer.model"
    out_dir: str = "out/rm"
    batch_size: int = 16  # pairs per micro-step in each process
    epochs: float = 1.0  # passes over the pairs, when max_steps is 0
    eval_interval: int = 100
    eval_pairs: int = 500  # held-out pairs scored at each evaluation (with eval_only: of each kind)
    save_interval: int = 200
    eval_only: bool = False  # only score out_dir/ckpt.pt on val_data, per kind of pair, into out_dir/eval.json


class RewardModel(nn.Module):
    def __init__(self, base: Transformer):
        super().__init__()
        self.base = base
        self.head = nn.Linear(base.args.dim, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def args(self) -> ModelArgs:
        return self.base.args

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Reward (B,) of each right-padded row, read at its last real token (the answer's eos)."""
        h = self.base.hidden(tokens)
        last = h[torch.arange(len(tokens), device=tokens.device), lengths - 1]
        # The head and the loss stay in float32: bfloat16 rewards differ in steps of 1/128 near 1.
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            return self.head(last.float()).squeeze(-1)

    @torch.no_grad()
    def score(self, tok: SPTokenizer, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[float]:
        """Rewards of answers to prompts, in the SFT format (prompt + bos + answer + eos)."""
        device = self.head.weight.device
        out: list[float] = []
        for start in range(0, len(prompts), batch_size):
            ids = [encode_turns(tok, [(p, a)], self.args.max_seq_len - 1)[0]
                   for p, a in zip(prompts[start:start + batch_size], answers[start:start + batch_size])]
            tokens, lengths = pad_right(ids, tok.pad_id)
            out += self(tokens.to(device), lengths.to(device)).float().tolist()
        return out


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), the negative log-likelihood that chosen is preferred."""
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
    return tokens, lengths


def read_pairs(path: str) -> list[tuple[str, str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"prompt", "chosen", "rejected"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)} (expected prompt, chosen, rejected)")
            rows = [(r["prompt"], r["chosen"], r["rejected"]) for r in reader]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run sft_data_process.py first") from None
    if not rows:
        raise ValueError(f"{path} has no pairs")
    return rows


def pair_batch(tok: SPTokenizer, pairs: list[tuple[str, str, str]], max_seq_len: int):
    """Chosen rows then rejected rows, right-padded: (tokens, lengths)."""
    rows = [encode_turns(tok, [(p, c)], max_seq_len - 1)[0] for p, c, _ in pairs]
    rows += [encode_turns(tok, [(p, r)], max_seq_len - 1)[0] for p, _, r in pairs]
    return pad_right(rows, tok.pad_id)


def pair_loss(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    tokens, lengths = batch
    rewards = model(tokens, lengths)
    chosen, rejected = rewards.chunk(2)
    return bradley_terry_loss(chosen, rejected), {"accuracy": float((chosen > rejected).float().mean())}


def load_reward_model(path: str, device: str = "cpu") -> tuple[RewardModel, dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reward model {path} does not exist: run reward_model.py first")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("stage") != "reward":
        raise ValueError(f"{path} is not a reward model checkpoint (stage {state.get('stage')!r})")
    model = RewardModel(Transformer(ModelArgs(**state["model_args"])))
    model.load_state_dict(state["model"], strict=True)
    return model.to(device).eval(), state


@torch.no_grad()
def pairwise_accuracy(model: RewardModel, tok: SPTokenizer, pairs, batch_size: int, device: str) -> float:
    right = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        tokens, lengths = pair_batch(tok, chunk, model.args.max_seq_len)
        chosen, rejected = model(tokens.to(device), lengths.to(device)).chunk(2)
        right += int((chosen > rejected).sum())
    return right / len(pairs)


def pair_kind(prompt: str) -> str:
    from eval import task_of
    from sft_data_process import POEM_PROMPT
    if prompt.startswith(POEM_PROMPT.split("{")[0]) and prompt.endswith(POEM_PROMPT.split("}")[-1]):
        return "poem"
    return task_of(prompt)


def evaluate_only(cfg: Config) -> dict:
    """Held-out pairwise accuracy of a trained reward model, overall and per kind of pair."""
    from common import pick_device
    device = pick_device(cfg.device)
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
    with open(os.path.join(cfg.out_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, argv, __doc__)
    if cfg.eval_only:
        try:
            evaluate_only(cfg)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        return
    run_stage(Config, train, argv, __doc__)


def train(cfg: Config, dist: Dist) -> None:
    tok = load_tokenizer(cfg.tokenizer)
    base, init = load_model(cfg.init_from)
    if init.get("tokenizer_sha256") not in (None, tok.sha256):
        raise ValueError(f"{cfg.init_from} was trained with another tokenizer than {cfg.tokenizer}")
    model = RewardModel(base).train()
    pairs = read_pairs(cfg.data)
    val = read_pairs(cfg.val_data)[:cfg.eval_pairs] if cfg.val_data else []
    print0(f"reward model from {cfg.init_from}: {len(pairs):,} pairs", dist=dist)
    run = start_run(cfg, model, dist, len(pairs), cfg.batch_size, base.flops_per_token(base.args.max_seq_len),
                    {"model_args": asdict(base.args)})
    trainer, order = run.trainer, run.order

    def next_batches():
        batches = [pair_batch(tok, [pairs[i] for i in order.next(cfg.batch_size)], base.args.max_seq_len)
                   for _ in range(cfg.grad_accum)]
        return [(t.to(dist.device), n.to(dist.device)) for t, n in batches], sum(int(n.sum()) for _, n in batches)

    def validation() -> dict[str, float]:
        with trainer.evaluating() as m, autocast(dist.device, trainer.dtype):
            mine = val[dist.rank::dist.world_size]
            return {"val_accuracy": all_reduce_mean(pairwise_accuracy(m, tok, mine, cfg.batch_size, dist.device),
                                                    dist)}

    def extra_state() -> dict:
        return {"model_args": asdict(base.args), "data": order.state_dict(), "config": asdict(cfg),
                "tokenizer_sha256": tok.sha256, "stage": "reward"}

    fit(trainer, run.loop, next_batches, pair_loss, validation if val else None, extra_state, run.tokens_seen)
    print0(f"reward model: {os.path.join(cfg.out_dir, 'ckpt.pt')}", dist=dist)


if __name__ == "__main__":
    main(sys.argv[1:])
