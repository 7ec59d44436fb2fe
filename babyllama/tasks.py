"""The built-in tasks: their prompt templates (so the data, the evaluation and the reward code agree on
them), which task a prompt belongs to, and the scores of an answer against a reference."""
from __future__ import annotations

import re
import unicodedata
from collections import Counter

from babyllama.chat_format import RESPONSE, TOOLS

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


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct character n-grams over all n-grams of the texts (distinct-1, distinct-2: low values mean
    the answers say the same things over and over); 0 when there are none."""
    grams = [t[i:i + n] for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


_REPEATS = re.compile(r"(.{1,10}?)\1{2,}", flags=re.S)


def has_loop(text: str) -> bool:
    """An answer stuck in a loop: a unit of 1-10 characters three or more times in a row, four
    characters or more in all ("爱爱爱爱", "好的好的好的"; not "哈哈哈")."""
    return any(len(m.group(0)) >= 4 for m in _REPEATS.finditer(text))


def task_of(prompt: str) -> str:
    """idiom, character, tool (a prompt offering tools or giving a tool's result) or other, from the
    built-in task templates (after the same NFKC cleaning)."""
    prompt = unicodedata.normalize("NFKC", prompt)
    if prompt.startswith((TOOLS, RESPONSE)):
        return "tool"
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
