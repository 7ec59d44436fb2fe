"""Held-out bits per character, the speedrun's score (docs/speedrun.md has the protocol in words).

Each held-out document is scored on its own, as training shows documents: after the eos that ends the
one before it. Its tokens and its closing eos are predicted; a document longer than the model's context
is scored in windows of the context moving by half of it, each token predicted once, with at least half
a context before it. Bits are summed over all documents and divided by their characters (the cleaned
text data_process.py counted), so that models with different tokenizers compare.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from model import IGNORE_INDEX


def split_documents(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """The documents of a token stream in which each document ends with eos (the .bin layout)."""
    ends = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e] for s, e in zip(starts, ends)]


def scored_windows(doc: list[int], eos_id: int, window: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) pieces of at most `window` tokens that predict each token of doc and its closing
    eos once, from the eos before it; targets not scored in a piece are IGNORE_INDEX."""
    seq = [eos_id, *doc, eos_id]
    n_targets = len(seq) - 1
    if n_targets <= window:
        return [(seq[:-1], seq[1:])]
    stride = window // 2
    pieces, done = [], 0
    for start in range(0, n_targets, stride):
        end = min(start + window, n_targets)
        inputs, targets = seq[start:end], seq[start + 1:end + 1]
        skip = done - start  # targets an earlier window scored
        pieces.append((inputs, [IGNORE_INDEX] * skip + targets[skip:]))
        done = end
        if end == n_targets:
            break
    return pieces


@torch.no_grad()
def bits(model: torch.nn.Module, docs: list[list[int]], eos_id: int, window: int, batch_size: int = 16,
         device: str = "cpu") -> tuple[float, int]:
    """(total bits, tokens predicted) of the documents under model (a callable taking (B, T) ids and
    returning (logits, _)), by the protocol above."""
    pieces = sorted((p for doc in docs for p in scored_windows(doc, eos_id, window)), key=lambda p: len(p[0]))
    total_nats, count = 0.0, 0
    for i in range(0, len(pieces), batch_size):
        batch = pieces[i:i + batch_size]
        longest = max(len(inputs) for inputs, _ in batch)
        x = torch.tensor([inputs + [eos_id] * (longest - len(inputs)) for inputs, _ in batch], device=device)
        y = torch.tensor([targets + [IGNORE_INDEX] * (longest - len(targets)) for _, targets in batch], device=device)
        logits, _ = model(x)  # padding comes after the scored tokens: causal attention never sees it
        total_nats += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                            reduction="sum"))
        count += int((y != IGNORE_INDEX).sum())
    return total_nats / math.log(2), count


def corpus_bits(model: torch.nn.Module, data: str) -> dict:
    """The score of model on the corpus folder data (its val.bin and meta.json, from data_process.py):
    bits per character, and the documents, characters and tokens it covered."""
    with open(os.path.join(data, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    docs = [d.tolist() for d in split_documents(np.fromfile(os.path.join(data, "val.bin"), dtype=np.uint16),
                                                meta["eos_id"])]
    total, tokens = bits(model, docs, meta["eos_id"], model.args.max_seq_len)
    chars = meta["characters"]["val"]
    return {"bpc": total / chars, "documents": len(docs), "characters": chars, "tokens_scored": tokens}
