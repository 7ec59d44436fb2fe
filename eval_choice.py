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

import random
import sys
from dataclasses import dataclass

import torch

from babyllama.checkpoint import ModelSettings, load_for_inference
from babyllama.choice import (
    FORMATS,
    Question,
    choice_texts,
    option_characters,
    read_choice_csv,
    request_ids,
    write_choice_csv,
)
from babyllama.common import write_json_atomic
from babyllama.configurator import InputFile, NonNegative, OutputFile, Positive, one_of, parse_config
from babyllama.errors import one_line_errors
from babyllama.tasks import task_of
from dataset_sft import collate, read_sft_csv
from model import IGNORE_INDEX, Transformer, answer_logprobs


@dataclass
class Config(ModelSettings):
    file: InputFile = ""  # a C-Eval/CMMLU CSV; empty: the built-in idiom set from --val_data
    dev_file: InputFile = ""  # few-shot examples in the same layout (default: none)
    shots: NonNegative = 0  # examples put before each question
    format: one_of(*FORMATS) = "chat"  # chat (question + bos, as SFT trains) or plain ("问题：...\n答案：")
    val_data: str = "sft_data/sft_val.csv"  # held-out idioms for the built-in set
    idiom_questions: Positive = 500  # at most this many built-in questions
    seed: int = 0  # which distractors the built-in set draws
    write_set: OutputFile = ""  # write the built-in set here as a C-Eval CSV
    batch_size: Positive = 16
    json: OutputFile = ""  # also write the results here


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


@torch.no_grad()
def option_logprobs(model: Transformer, tok, questions: list[Question], shots: list[Question], fmt: str,
                    batch_size: int) -> torch.Tensor:
    """[questions, options] summed log-likelihood of each option after its context (-inf where a question
    has fewer options); a context longer than the model's window loses its front, as lm-eval's does."""
    limit = model.args.max_seq_len + 1
    pairs = []  # (question index, option index, inputs, labels)
    for qi, q in enumerate(questions):
        head, tails = request_ids(tok, *choice_texts(q, shots, fmt))
        for oi, tail in enumerate(tails):
            ids = (head + tail)[-limit:]
            n = min(len(tail), len(ids) - 1)
            labels = [IGNORE_INDEX] * (len(ids) - n) + ids[len(ids) - n:]
            pairs.append((qi, oi, torch.tensor(ids[:-1]), torch.tensor(labels[1:])))
    logprobs = torch.full((len(questions), max(len(q.options) for q in questions)), float("-inf"), dtype=torch.float64)
    device = model.freqs_cos.device
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        x, y = collate([(p[2], p[3]) for p in chunk], tok.pad_id)
        logp, _ = answer_logprobs(model, x.to(device), y.to(device))
        for (qi, oi, *_), lp in zip(chunk, logp.tolist()):
            logprobs[qi, oi] = lp
    return logprobs


def choose(model: Transformer, tok, questions: list[Question], shots: list[Question], fmt: str,
           batch_size: int) -> list[int]:
    """The index of the best option of each question (log-likelihood per character)."""
    logprobs = option_logprobs(model, tok, questions, shots, fmt, batch_size)
    chars = torch.tensor([[option_characters(o) for o in q.options] + [1] * (logprobs.shape[1] - len(q.options))
                          for q in questions], dtype=torch.float64)
    return (logprobs / chars).argmax(-1).tolist()


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
