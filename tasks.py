"""The built-in tasks: their prompt templates (so the data, the evaluation and the reward code agree on
them), which task a prompt belongs to, and the scores of an answer against a reference."""
from __future__ import annotations

import unicodedata
from collections import Counter

IDIOM_PROMPT = "成语“{word}”是什么意思?"  # ASCII ?: the cleaning (NFKC) turns ？ into ?
CHAR_PROMPT = "“{word}”字是什么意思?"
POEM_PROMPT = "“{line}”的下一句是什么?"


def char_f1(prediction: str, reference: str) -> float:
    """F1 of the characters in common (as multisets), the usual metric for Chinese QA."""
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over characters: from the longest common subsequence."""
    if not prediction or not reference:
        return 0.0
    previous = [0] * (len(reference) + 1)
    for p in prediction:
        current = [0]
        for j, r in enumerate(reference):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def task_of(prompt: str) -> str:
    """idiom, character or other, from the built-in task templates (after the same NFKC cleaning)."""
    prompt = unicodedata.normalize("NFKC", prompt)
    if prompt.startswith(IDIOM_PROMPT.split("{")[0]) and prompt.endswith(IDIOM_PROMPT.split("}")[-1]):
        return "idiom"
    if prompt.startswith(CHAR_PROMPT.split("{")[0]) and prompt.endswith(CHAR_PROMPT.split("}")[-1]):
        return "character"
    return "other"


def pair_kind(prompt: str) -> str:
    """poem, or the task_of the prompt: the kinds of preference pairs."""
    if prompt.startswith(POEM_PROMPT.split("{")[0]) and prompt.endswith(POEM_PROMPT.split("}")[-1]):
        return "poem"
    return task_of(prompt)
