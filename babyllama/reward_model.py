"""The reward model: a Transformer with a scalar head read at the last token of prompt + answer, its
Bradley-Terry loss on preference pairs, and its loader (used by train_reward_model.py, eval.py, grpo.py)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from babyllama.checkpoint import read_checkpoint
from chatglm_tokenizer import SPTokenizer
from dataset_sft import encode_turns
from model import ModelArgs, Transformer


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
    if not os.path.exists(path):
        raise FileNotFoundError(f"reward model {path} does not exist: run train_reward_model.py first")
    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get("stage") != "reward":
        kind = f"stage {state.get('stage')!r}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ValueError(f"{path} is not a reward model checkpoint ({kind}); train_reward_model.py writes one")
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
