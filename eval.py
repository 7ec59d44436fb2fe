"""Evaluate a chat model: its answers to questions, and agreement with reference answers.

    python eval.py                                   # the seed's three questions + sft_data/sft_val.csv
    python eval.py --ckpt=out/pretrain/ckpt.pt --out=out/eval_base   # the base model prompted the same way
    python eval.py --questions_file=my_questions.txt --val_data=

On the validation set: the answer loss, and for greedy answers the character-level F1, ROUGE-L (on
characters) and, for short references, exact match, overall and per task (idiom, character, tool, other).
On held-out tool tasks (unseen numbers, unseen templates): valid calls, right tool, right arguments and
right final answers with the tools, and right answers without them.
Writes answers.csv (one row a sample) and summary.json into --out.
"""
from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, replace

import torch

from babyllama.chat_format import parse_answer, render_results, render_tools
from babyllama.checkpoint import ModelSettings, load_for_inference
from babyllama.common import read_text, write_json_atomic
from babyllama.configurator import (
    InputFile,
    NonNegative,
    OutputDir,
    Positive,
    PositiveFloat,
    parse_config,
)
from babyllama.errors import UsageError, one_line_errors
from babyllama.tasks import char_f1, distinct_n, has_loop, rouge_l, task_of
from babyllama.tool_tasks import SCORES, ToolTask, all_tools, missing_lookups, score_call, tasks
from babyllama.tools import builtin_tools, run_tool
from dataset_sft import SFTDataset, chat_prompt_ids, read_sft_csv
from model import IGNORE_INDEX, Transformer

SEED_QUESTIONS = ["最近我在办公室坐久了会感到头晕，请问这是什么原因?有什么缓解办法吗？",
                  "前列腺囊肿的症状是什么？", "请问，世界上最大的动物是什么？"]


@dataclass
class Config(ModelSettings):
    questions: str = "|".join(SEED_QUESTIONS)  # questions separated by |
    questions_file: InputFile = ""  # one question a line (replaces --questions)
    val_data: InputFile = "sft_data/sft_val.csv"  # references to score against ('' for none)
    max_samples: Positive = 300  # at most this many validation samples (the first ones)
    max_new_tokens: Positive = 128
    repetition_penalty: PositiveFloat = 1.0
    batch_size: Positive = 16
    exact_match_chars: NonNegative = 10  # exact match is reported for references up to this long
    reward_model: InputFile = ""  # also report the mean reward of the answers under this reward model
    tool_tasks: NonNegative = 100  # held-out tool tasks of each split (tool_tasks.py), with and without tools
    tool_lookups: bool = False  # also look-up tasks, with the look-up tools offered (a model trained on them)
    raw_dir: str = "data/raw"  # with --tool_lookups: the tables (download_data.py's idioms and dictionary)
    out: OutputDir = "out/eval"  # answers.csv and summary.json


def answer(model: Transformer, tok, conversations: list[tuple[list, str]], cfg: Config,
           reserve: int | None = None) -> list[str]:
    """Greedy answers, in batches, to (history, question) pairs in the training format. A prompt keeps the
    most recent turns that leave `reserve` tokens (default: max_new_tokens, at most half the window); an
    answer may take up to max_new_tokens of the room its batch leaves (prompts are batched by length)."""
    limit = model.args.max_seq_len
    reserve = min(cfg.max_new_tokens, limit // 2) if reserve is None else reserve
    prompts = [chat_prompt_ids(tok, h, q, limit, reserve) for h, q in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), cfg.batch_size):
        rows = order[start:start + cfg.batch_size]
        ids = model.generate([prompts[i] for i in rows], cfg.max_new_tokens, temperature=0.0,
                             repetition_penalty=cfg.repetition_penalty, eos_id=tok.eos_id)
        for i, x in zip(rows, ids):
            out[i] = tok.decode(x)
    return out


@torch.no_grad()
def answer_loss(model: Transformer, tok, path: str, n: int, batch_size: int) -> float:
    """Mean loss over the answer tokens of the first n samples."""
    data = SFTDataset(path, tok, model.args.max_seq_len)
    device = model.freqs_cos.device
    total, count = 0.0, 0
    for start in range(0, min(n, len(data)), batch_size):
        x, y = data.batch(list(range(start, min(start + batch_size, n, len(data)))), tok.pad_id)
        _, loss = model(x.to(device), y.to(device))
        k = int((y != IGNORE_INDEX).sum())
        total, count = total + float(loss) * k, count + k
    return total / max(count, 1)


def score(rows: list[tuple[str, str, list]], predictions: list[str], exact_chars: int,
          rewards: list[float] | None = None) -> dict:
    """Per task and for all: mean char F1, ROUGE-L, exact match (short references), reward; and over the
    task's answers distinct-1/2 and the share of answers stuck in a loop (tasks.has_loop)."""
    per_task: dict[str, list[dict]] = defaultdict(list)
    answers: dict[str, list[str]] = defaultdict(list)
    for i, ((prompt, reference, _), prediction) in enumerate(zip(rows, predictions)):
        s = {"f1": char_f1(prediction, reference), "rouge_l": rouge_l(prediction, reference),
             "loop": float(has_loop(prediction))}
        if rewards is not None:
            s["reward"] = rewards[i]
        if len(reference) <= exact_chars:
            s["exact_match"] = float(prediction.strip() == reference.strip())
        for task in (task_of(prompt), "all"):
            per_task[task].append(s)
            answers[task].append(prediction)
    return {task: {"samples": len(items),
                   **{m: sum(s[m] for s in items if m in s) / max(1, sum(m in s for s in items))
                      for m in ("f1", "rouge_l", "exact_match", "reward", "loop") if any(m in s for s in items)},
                   "distinct_1": distinct_n(answers[task], 1), "distinct_2": distinct_n(answers[task], 2)}
            for task, items in per_task.items()}


CALL_TOKENS, FINAL_RESERVE, FINAL_TOKENS = 100, 16, 48


def tool_scores(model: Transformer, tok, tool_tasks: list[ToolTask], cfg: Config) -> dict[str, dict[str, float]]:
    """With every built-in tool offered: the shares of valid calls, right tools, right arguments, and of
    right final answers once the model's own call has run; and of right answers with no tools offered;
    for all the tasks and for each kind (arithmetic, date, unit, lookup). Also the share of final answers
    written with the question in view (a second turn that overflows the window loses the first)."""
    # A call and its reasoning need about a hundred tokens; the final turn keeps its conversation whenever
    # that leaves FINAL_RESERVE tokens, and its answer takes what room is left, up to FINAL_TOKENS
    calls_cfg, finals_cfg = replace(cfg, max_new_tokens=CALL_TOKENS), replace(cfg, max_new_tokens=FINAL_TOKENS)
    prompts = [render_tools(all_tools(cfg.tool_lookups)) + t.question for t in tool_tasks]
    firsts = answer(model, tok, [([], p) for p in prompts], calls_cfg)
    calls = [parse_answer(text).tool_calls for text in firsts]
    called = [i for i, c in enumerate(calls) if c]
    tools = builtin_tools(cfg.raw_dir)
    results = {i: run_tool(calls[i][0].name, calls[i][0].arguments, tools) for i in called}
    second_turns = {i: ([(prompts[i], firsts[i])], render_results([results[i]])) for i in called}
    seconds = answer(model, tok, list(second_turns.values()), finals_cfg, reserve=FINAL_RESERVE)
    finals = [*firsts]  # a model that made no call answered in its first turn
    for i, text in zip(called, seconds):
        finals[i] = text
    limit = model.args.max_seq_len
    in_view = [i not in second_turns or len(chat_prompt_ids(tok, *second_turns[i], limit, FINAL_RESERVE))
               == len(chat_prompt_ids(tok, *second_turns[i], 1 << 30)) for i in range(len(tool_tasks))]
    direct = answer(model, tok, [([], t.question) for t in tool_tasks], calls_cfg)
    rows = [{**score_call(t, parse_answer(first), tools), "right_answer": t.holds_result(parse_answer(final).content),
             "right_answer_without_tools": t.holds_result(parse_answer(alone).content), "question_in_view": seen}
            for t, first, final, alone, seen in zip(tool_tasks, firsts, finals, direct, in_view)]
    kinds = {"all": rows} | {kind: [r for r, t in zip(rows, tool_tasks) if t.kind == kind]
                             for kind in sorted({t.kind for t in tool_tasks})}
    return {kind: {"tasks": len(part), **{key: sum(r[key] for r in part) / len(part) for key in rows[0]}}
            for kind, part in kinds.items()}


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        cfg = parse_config(Config, argv, __doc__)
        model, _, tok = load_for_inference(cfg)
        reward_model = None
        if cfg.reward_model:  # read before the long generation: a wrong file stops the run at once
            if not cfg.val_data:
                raise UsageError("--reward_model scores the answers to --val_data: give --val_data too")
            from babyllama.reward_model import load_reward_model
            reward_model, _ = load_reward_model(cfg.reward_model, model.freqs_cos.device)
        questions = cfg.questions.split("|") if cfg.questions else []
        if cfg.questions_file:
            questions = [line.strip() for line in read_text(cfg.questions_file).splitlines() if line.strip()]
        rows = read_sft_csv(cfg.val_data)[:cfg.max_samples] if cfg.val_data else []
        os.makedirs(cfg.out, exist_ok=True)
        summary: dict = {"ckpt": cfg.ckpt, "questions": []}
        for q, a in zip(questions, answer(model, tok, [([], q) for q in questions], cfg)):
            print(f"[question] {q}\n[answer] {a}\n")
            summary["questions"].append({"question": q, "answer": a})
        if rows:
            predictions = answer(model, tok, [(h, p) for p, _, h in rows], cfg)
            summary["val_answer_loss"] = answer_loss(model, tok, cfg.val_data, len(rows), cfg.batch_size)
            rewards = reward_model.score(tok, [p for p, _, _ in rows], predictions) if reward_model else None
            summary["scores"] = score(rows, predictions, cfg.exact_match_chars, rewards)
            with open(os.path.join(cfg.out, "answers.csv"), "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(["task", "prompt", "reference", "prediction", "char_f1", "rouge_l"])
                for (p, r, _), pred in zip(rows, predictions):
                    w.writerow([task_of(p), p, r, pred, f"{char_f1(pred, r):.4f}", f"{rouge_l(pred, r):.4f}"])
            print(f"{cfg.val_data}: answer loss {summary['val_answer_loss']:.4f} on {len(rows)} samples")
            for task, s in summary["scores"].items():
                em = f", exact match {s['exact_match']:.3f}" if "exact_match" in s else ""
                reward = f", mean reward {s['reward']:.3f}" if "reward" in s else ""
                print(f"  {task:<9} {s['samples']:>5} samples: char F1 {s['f1']:.3f}, "
                      f"ROUGE-L {s['rouge_l']:.3f}{em}{reward}; distinct-1 {s['distinct_1']:.3f}, "
                      f"distinct-2 {s['distinct_2']:.3f}, in a loop {s['loop']:.1%}")
        if cfg.tool_tasks:
            if cfg.tool_lookups and (note := missing_lookups(cfg.raw_dir)):
                print(note)
            raw_dir = cfg.raw_dir if cfg.tool_lookups else None
            summary["tool_tasks"] = {split: tool_scores(model, tok, list(tasks(split, cfg.tool_tasks, raw_dir=raw_dir)),
                                                        cfg) for split in ("numbers", "templates")}
            print(f"held-out tool tasks ({cfg.tool_tasks} a split): valid call, right tool, right arguments, "
                  "right answer; right answer without tools (final answers written with the question in view)")
            for split, kinds in summary["tool_tasks"].items():
                for kind, s in kinds.items():
                    print(f"  unseen {split:<9} {kind:<10} {s['tasks']:>4} tasks: "
                          + "  ".join(f"{s[k]:.1%}" for k in SCORES[:-1]) + f";  {s[SCORES[-1]]:.1%}"
                          + f"  (question in view {s['question_in_view']:.0%})")
        write_json_atomic(os.path.join(cfg.out, "summary.json"), summary)
        print(f"wrote {cfg.out}/summary.json" + (" and answers.csv" if rows else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
