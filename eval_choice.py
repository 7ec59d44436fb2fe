"""Multiple-choice evaluation: each option is scored by the log-likelihood the model gives it after the
question, and the best-scored option is the model's answer.

    python eval_choice.py                                    # the built-in 4-way held-out idiom set
    python eval_choice.py --file=ceval/val/law_val.csv --dev_file=ceval/dev/law_dev.csv --shots=5
    python eval_choice.py --file=cmmlu/test/chinese_history.csv --format=plain

Files are in the C-Eval / CMMLU CSV layout: a question column, options A-D and the answer letter
(C-Eval: id,question,A,B,C,D,answer; CMMLU: ,Question,A,B,C,D,Answer). Get them from
https://huggingface.co/datasets/ceval/ceval-exam and https://huggingface.co/datasets/haonan-li/cmmlu
(download the CSV archives and unpack them anywhere). The score of an option is its log-likelihood per
character (so that long options are not penalised); chance is 1 / number of options.
"""
from __future__ import annotations

import csv
import io
import random
import sys
from dataclasses import dataclass

import torch

from babyllama.checkpoint import ModelSettings, load_for_inference
from babyllama.common import read_text, write_json_atomic
from babyllama.configurator import InputFile, NonNegative, OutputFile, Positive, one_of, parse_config
from babyllama.errors import one_line_errors
from babyllama.tasks import task_of
from dataset_sft import collate, read_sft_csv
from model import Transformer, answer_logprobs

LETTERS = "ABCD"


@dataclass
class Config(ModelSettings):
    file: InputFile = ""  # a C-Eval/CMMLU CSV; empty: the built-in idiom set from --val_data
    dev_file: InputFile = ""  # few-shot examples in the same layout (default: none)
    shots: NonNegative = 0  # examples put before each question
    format: one_of("chat", "plain") = "chat"  # chat (question + bos, as SFT trains) or plain ("问题：...\n答案：")
    val_data: str = "sft_data/sft_val.csv"  # held-out idioms for the built-in set
    idiom_questions: Positive = 500  # at most this many built-in questions
    seed: int = 0  # which distractors the built-in set draws
    write_set: OutputFile = ""  # write the built-in set here as a C-Eval CSV
    batch_size: Positive = 16
    json: OutputFile = ""  # also write the results here


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


def idiom_set(val_data: str, n: int, seed: int) -> list[Question]:
    """4-way questions from held-out idioms: the idiom's meaning among three meanings of other
    held-out idioms, in a random order fixed by seed."""
    rows = [(p, a) for p, a, _ in read_sft_csv(val_data) if task_of(p) == "idiom"]
    if len(rows) < 4:
        raise ValueError(f"{val_data} holds {len(rows)} idiom questions; 4 at least are needed")
    rng = random.Random(seed)
    questions = []
    for i, (prompt, meaning) in enumerate(rows[:n]):
        others = rng.sample([a for j, (_, a) in enumerate(rows) if j != i and a != meaning], 3)
        options = others + [meaning]
        rng.shuffle(options)
        questions.append(Question(prompt, options, options.index(meaning)))
    return questions


def write_choice_csv(path: str, questions: list[Question]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", *LETTERS, "answer"])
        for i, q in enumerate(questions):
            w.writerow([i, q.question, *q.options, LETTERS[q.answer]])


def context_ids(tok, q: Question, shots: list[Question], fmt: str) -> list[int]:
    ids: list[int] = []
    for s in shots:
        context, option = option_example(tok, s.question, s.options[s.answer], fmt)
        ids += context + option + ([] if fmt == "chat" else tok.encode("\n\n"))
    return ids + option_example(tok, q.question, "", fmt)[0]


def option_example(tok, question: str, option: str, fmt: str) -> tuple[list[int], list[int]]:
    """(context ids, option ids) in the chat format (question + bos, option + eos) or the plain one."""
    if fmt == "chat":
        return tok.encode(question) + [tok.bos_id], tok.encode(option) + [tok.eos_id]
    return tok.encode(f"问题：{question}\n答案："), tok.encode(option)


@torch.no_grad()
def choose(model: Transformer, tok, questions: list[Question], shots: list[Question], fmt: str,
           batch_size: int) -> list[int]:
    """The index of the best option of each question (log-likelihood per character)."""
    limit = model.args.max_seq_len + 1
    pairs = []  # (question index, option index, inputs, labels, characters)
    for qi, q in enumerate(questions):
        context = context_ids(tok, q, shots, fmt)
        for oi, option in enumerate(q.options):
            option_ids = option_example(tok, q.question, option, fmt)[1]
            ids = (context + option_ids)[-limit:]
            n = min(len(option_ids), len(ids) - 1)
            labels = [-100] * (len(ids) - n) + ids[len(ids) - n:]
            pairs.append((qi, oi, torch.tensor(ids[:-1]), torch.tensor(labels[1:]), max(1, len(option))))
    scores = torch.full((len(questions), max(len(q.options) for q in questions)), float("-inf"))
    device = model.freqs_cos.device
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        x, y = collate([(p[2], p[3]) for p in chunk], tok.pad_id)
        logp, _ = answer_logprobs(model, x.to(device), y.to(device))
        for (qi, oi, *_, chars), lp in zip(chunk, logp.tolist()):
            scores[qi, oi] = lp / chars
    return scores.argmax(-1).tolist()


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        cfg = parse_config(Config, argv, __doc__)
        model, _, tok = load_for_inference(cfg)
        questions = read_choice_csv(cfg.file) if cfg.file else idiom_set(cfg.val_data, cfg.idiom_questions, cfg.seed)
        shots = read_choice_csv(cfg.dev_file)[:cfg.shots] if cfg.dev_file and cfg.shots else []
        if cfg.write_set:
            write_choice_csv(cfg.write_set, questions)
        picks = choose(model, tok, questions, shots, cfg.format, cfg.batch_size)
        accuracy = sum(p == q.answer for p, q in zip(picks, questions)) / len(questions)
        chance = sum(1 / len(q.options) for q in questions) / len(questions)
        name = cfg.file or "built-in held-out idioms"
        print(f"{name}: accuracy {accuracy:.3f} on {len(questions)} questions ({cfg.shots}-shot, {cfg.format} format); "
              f"chance {chance:.3f}")
        if cfg.json:
            write_json_atomic(cfg.json, {"file": name, "accuracy": accuracy, "chance": chance,
                                         "questions": len(questions), "shots": cfg.shots, "format": cfg.format,
                                         "ckpt": cfg.ckpt})


if __name__ == "__main__":
    main(sys.argv[1:])
