"""Documents for the baby_choice tasks: C-Eval / CMMLU layout CSVs read from local files (no hub), each
question turned into the texts eval_choice.py scores (babyllama.choice), and the per-character score.

    lm_eval --model hf --model_args pretrained=out/hf_sft,dtype=float32 --include_path lm_eval_tasks \\
        --tasks baby_choice_chat --metadata '{"file": "out/idioms_choice.csv"}'
"""
from __future__ import annotations

import os
import sys

import numpy as np
from datasets import Dataset

# lm-eval loads this file by path; the repository root holds babyllama.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from babyllama.choice import choice_texts, option_characters, read_choice_csv  # noqa: E402


def documents(fmt: str, file: str = "", dev_file: str = "") -> dict[str, Dataset]:
    if not file:
        raise ValueError('give the questions: --metadata \'{"file": "questions.csv"}\' (C-Eval/CMMLU layout; '
                         'eval_choice.py --write_set writes the built-in idiom set)')
    splits = {"test": file} | ({"dev": dev_file} if dev_file else {})
    return {split: Dataset.from_list([document(q, fmt) for q in read_choice_csv(path)])
            for split, path in splits.items()}


def document(q, fmt: str) -> dict:
    context, choices = choice_texts(q, [], fmt)
    return {"context": context, "choices": choices, "answer": q.answer,
            "characters": [option_characters(o) for o in q.options]}


def chat_documents(file: str = "", dev_file: str = "", **_) -> dict[str, Dataset]:
    return documents("chat", file, dev_file)


def plain_documents(file: str = "", dev_file: str = "", **_) -> dict[str, Dataset]:
    return documents("plain", file, dev_file)


def process_results(doc: dict, results: list) -> dict[str, float]:
    """acc: the best summed log-likelihood; acc_norm: the best per character of the option (its end
    marker not counted), eval_choice.py's accuracy."""
    logprobs = np.array([r[0] for r in results])
    return {"acc": float(np.argmax(logprobs) == doc["answer"]),
            "acc_norm": float(np.argmax(logprobs / np.array(doc["characters"])) == doc["answer"])}
