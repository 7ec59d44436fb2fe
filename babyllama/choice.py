"""Multiple-choice questions: the C-Eval / CMMLU CSV layout, and the texts a question is scored as.

eval_choice.py and the lm-evaluation-harness tasks in lm_eval_tasks/ both build their requests from
`choice_texts`, and both tokenize a request as lm-eval does (the whole text, then the context's ids cut
off the front), so the two score the same tokens."""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass

from babyllama.common import read_text

LETTERS = "ABCD"
BOS_TEXT, EOS_TEXT = "<s>", "</s>"  # how the exported tokenizers spell ids 1 and 2 (export.CHAT_TEMPLATE)
FORMATS = ("chat", "plain")
SHOT_SEPARATOR = {"chat": "", "plain": "\n\n"}  # lm_eval_tasks/*.yaml: fewshot_delimiter


@dataclass
class Question:
    question: str
    options: list[str]
    answer: int  # index of the right option


def read_choice_csv(path: str) -> list[Question]:
    """C-Eval or CMMLU layout; a row without a known answer letter is an error naming the row."""
    rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    if not rows:
        raise ValueError(f"{path} has no questions")
    keys = {k.lower(): k for k in rows[0] if k}
    missing = [k for k in ("question", "a", "b", "c", "d", "answer") if k not in keys]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (expected question, A, B, C, D, answer)")
    out = []
    for i, row in enumerate(rows, 2):
        letter = (row[keys["answer"]] or "").strip().upper()
        if letter not in LETTERS:
            raise ValueError(f"{path}:{i}: answer {letter!r} is not one of A, B, C, D")
        out.append(Question(row[keys["question"]], [row[keys[c.lower()]] for c in LETTERS], LETTERS.index(letter)))
    return out


def write_choice_csv(path: str, questions: list[Question]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", *LETTERS, "answer"])
        for i, q in enumerate(questions):
            w.writerow([i, q.question, *q.options, LETTERS[q.answer]])


def choice_texts(q: Question, shots: list[Question], fmt: str) -> tuple[str, list[str]]:
    """(context, one continuation per option). chat: question + bos, option + eos, as SFT trains;
    plain: "问题：...\\n答案：" and the bare option. Shots are answered examples before the question."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")

    def prompt(x: Question) -> str:
        return x.question + BOS_TEXT if fmt == "chat" else f"问题：{x.question}\n答案："

    def option(text: str) -> str:
        return text + EOS_TEXT if fmt == "chat" else text

    examples = "".join(prompt(s) + option(s.options[s.answer]) + SHOT_SEPARATOR[fmt] for s in shots)
    return examples + prompt(q), [option(o) for o in q.options]


def option_characters(option: str) -> int:
    """What an option's log-likelihood is divided by, so that long options are not penalised."""
    return max(1, len(option))


_MARKERS = re.compile(f"({re.escape(BOS_TEXT)}|{re.escape(EOS_TEXT)})")


def encode_marked(tok, text: str) -> list[int]:
    """Ids of text whose bos/eos markers are the special ids, as the exported tokenizers read them."""
    ids: list[int] = []
    for part in _MARKERS.split(text):
        if part == BOS_TEXT:
            ids.append(tok.bos_id)
        elif part == EOS_TEXT:
            ids.append(tok.eos_id)
        elif part:
            ids += tok.encode(part)
    return ids


def request_ids(tok, context: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """(context ids, each continuation's ids): context + continuation encoded whole and split where the
    context's ids end (lm-eval's rule), so that a continuation is scored as the tokens running text has."""
    head = encode_marked(tok, context)
    return head, [encode_marked(tok, context + c)[len(head):] for c in continuations]
