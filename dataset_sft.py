"""SFT samples with loss masks, padded per batch.

A sample of several turns is, for each turn, `user_ids + [bos] + answer_ids + [eos]` (the seed's
format, extended to several turns). Labels are IGNORE_INDEX everywhere except the answer ids and the
eos that closes each answer; inputs and labels are then shifted by one against each other. Padding
never counts (its labels are IGNORE_INDEX, not the pad id as in the seed).
"""
from __future__ import annotations

import csv
import io
import json

import torch

from babyllama.cleaning import clean_text
from babyllama.common import read_text
from chatglm_tokenizer import SPTokenizer

IGNORE_INDEX = -100


def encode_turns(tok: SPTokenizer, turns: list[tuple[str, str]], max_seq_len: int) -> tuple[list[int], list[int]]:
    """Token ids (max_seq_len + 1 at most) and per-token 'is an answer token' flags for the turns, the
    last turn being the one trained on most surely: the oldest turns are dropped first to fit; if the
    last turn alone is too long its prompt loses its beginning, and only then its answer its end."""
    encoded = [(tok.encode(p), tok.encode(a)) for p, a in turns]
    limit = max_seq_len + 1
    while len(encoded) > 1 and sum(len(p) + len(a) + 2 for p, a in encoded) > limit:
        encoded.pop(0)
    prompt, answer = encoded[-1]
    earlier = sum(len(p) + len(a) + 2 for p, a in encoded[:-1])
    room = limit - earlier - 2
    if len(prompt) + len(answer) > room:
        keep_answer = min(len(answer), room - 1)  # the whole answer if it fits beside one prompt token
        prompt = prompt[len(prompt) - (room - keep_answer):]
        answer = answer[:keep_answer]
        encoded[-1] = (prompt, answer)
    ids: list[int] = []
    is_answer: list[bool] = []
    for p, a in encoded:
        ids += p + [tok.bos_id] + a + [tok.eos_id]
        is_answer += [False] * (len(p) + 1) + [True] * (len(a) + 1)
    return ids, is_answer


def make_example(ids: list[int], is_answer: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ids[:-1] and labels ids[1:], labels kept only where the predicted token is an answer token."""
    inputs = torch.tensor(ids[:-1], dtype=torch.long)
    labels = torch.tensor([t if ans else IGNORE_INDEX for t, ans in zip(ids[1:], is_answer[1:])], dtype=torch.long)
    return inputs, labels


def read_csv(path: str, columns: list[str]) -> csv.DictReader:
    """The rows of a UTF-8 CSV file that has these columns (and maybe more); errors name the file."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run sft_data_process.py first") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = set(columns) - set(reader.fieldnames or [])
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)} (expected {', '.join(columns)})")
    return reader


def read_sft_csv(path: str) -> list[tuple[str, str, list[list[str]]]]:
    """(prompt, answer, history) rows of an sft_data.csv; a malformed history is an error naming the row."""
    rows = []
    for i, row in enumerate(read_csv(path, ["prompt", "answer"]), 2):
        try:
            history = json.loads(row.get("history") or "[]")
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{i}: 'history' is not a JSON list") from None
        rows.append((row["prompt"], row["answer"], history))
    return rows


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, path: str, tok: SPTokenizer, max_seq_len: int):
        self.rows = read_sft_csv(path)
        if not self.rows:
            raise ValueError(f"{path} has no samples")
        self.tok, self.max_seq_len = tok, max_seq_len

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        prompt, answer, history = self.rows[i]
        ids, is_answer = encode_turns(self.tok, [*map(tuple, history), (prompt, answer)], self.max_seq_len)
        return make_example(ids, is_answer)

    def lengths(self) -> list[int]:
        """Each sample's length in characters, all turns: a cheap stand-in for its tokens."""
        return [len(prompt) + len(answer) + sum(len(t) for turn in history for t in turn)
                for prompt, answer, history in self.rows]

    def batch(self, indices: list[int], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return collate([self[i] for i in indices], pad_id)


def collate(examples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest example of the batch (not to max_seq_len): inputs with pad_id, labels with
    IGNORE_INDEX so that padding never counts."""
    longest = max(len(x) for x, _ in examples)
    inputs = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        inputs[row, :len(x)] = x
        labels[row, :len(y)] = y
    return inputs, labels


def chat_prompt_ids(tok: SPTokenizer, history: list[tuple[str, str]], question: str, max_seq_len: int,
                    reserve: int = 0) -> list[int]:
    """The ids a chat model continues: earlier turns in the training format, then the question and
    bos, keeping the most recent turns that fit in max_seq_len - reserve. Text is cleaned as the
    training data was (NFKC: a typed ？ becomes ?)."""
    turns = [tok.encode(clean_text(p)) + [tok.bos_id] + tok.encode(clean_text(a)) + [tok.eos_id] for p, a in history]
    current = tok.encode(clean_text(question)) + [tok.bos_id]
    budget = max_seq_len - reserve
    current = current[-budget:] if len(current) > budget else current
    ids = current
    for turn in reversed(turns):
        if len(turn) + len(ids) > budget:
            break
        ids = turn + ids
    return ids


def read_pairs(path: str) -> list[tuple[str, str, str]]:
    rows = [(r["prompt"], r["chosen"], r["rejected"]) for r in read_csv(path, ["prompt", "chosen", "rejected"])]
    if not rows:
        raise ValueError(f"{path} has no pairs")
    return rows
