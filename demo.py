"""The main job: every stage of the pipeline on the built-in real data, on a plain CPU.

    python demo.py            # or: make demo

Each stage runs as its own script (the README shows the same commands). A stage whose output is already
there is skipped, and training stages resume from their checkpoint, so a rerun continues where the
last one stopped; a failed stage is named with its command and the run stops there. At the end a
table of results is printed and written to out/results.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from babyllama.configurator import NonNegativeFloat, OutputDir, Positive, in_range, parse_config
from babyllama.errors import one_line_errors
from babyllama.tool_tasks import SCORES
from chatglm_tokenizer import MIN_VOCAB


@dataclass
class Config:
    data_dir: OutputDir = "data"  # raw sources, tokenizer and corpus go under it
    out_dir: OutputDir = "out"  # checkpoints, evaluations and plots go under it
    sft_dir: OutputDir = "sft_data"  # instruction data
    vocab_size: in_range(MIN_VOCAB, 65535, int) = 8192  # our tokenizer (config/tiny_shallow.py is sized for 8192)
    pretrain_steps: Positive = 2000  # at most this many optimizer steps of 4,096 tokens
    sft_steps: Positive = 2000  # at most this many SFT optimizer steps of 16 samples
    rm_steps: Positive = 400  # at most this many reward-model steps of 16 pairs
    dpo_steps: Positive = 250  # at most this many DPO steps of 16 pairs
    grpo_steps: Positive = 100  # at most this many GRPO steps of 4 prompts x 8 sampled answers
    pretrain_min: NonNegativeFloat = 10.0  # pretraining's time budget: as many steps as fit, at most pretrain_steps
    sft_min: NonNegativeFloat = 5.0  # SFT's time budget
    rm_min: NonNegativeFloat = 2.5  # the reward model's time budget
    dpo_min: NonNegativeFloat = 2.5  # DPO's time budget
    grpo_min: NonNegativeFloat = 2.5  # GRPO's time budget
    dpo_nll_weight: NonNegativeFloat = 8.0  # dpo.py --nll_weight: at 1 this small model drifts into loops


def stages(cfg: Config) -> list[tuple[str, str | None, list[str]]]:
    """(name, the file that shows it is done or None to always run, command) for each stage in order.
    Training stages always run: they resume from their checkpoint and stop at once when complete."""
    raw, tok, corpus = f"{cfg.data_dir}/raw", f"{cfg.data_dir}/tokenizer", f"{cfg.data_dir}/demo"
    out, tokenizer = cfg.out_dir, f"--tokenizer={cfg.data_dir}/tokenizer/tokenizer.model"
    sft_data, sft_val = f"{cfg.sft_dir}/sft_data.csv", f"{cfg.sft_dir}/sft_val.csv"
    pref_val = f"{cfg.sft_dir}/preference_val.csv"
    plan = [
        ("download the built-in corpora", f"{raw}/poetry/.complete",
         ["download_data.py", f"--raw_dir={raw}", "--sources=peoples_daily,idioms,dictionary,sft_demo,poetry"]),
        ("train our tokenizer", f"{tok}/tokenizer.model",
         ["train_tokenizer.py", f"--raw_dir={raw}", f"--out={tok}/tokenizer.model", f"--vocab_size={cfg.vocab_size}"]),
        ("clean, deduplicate and tokenize the corpus", f"{corpus}/meta.json",
         ["data_process.py", f"--raw_dir={raw}", tokenizer, f"--out_dir={corpus}"]),
        ("pretrain the demo's model (tiny_shallow, the speedrun's record recipe)", None,
         ["pretrain.py", "config/pretrain_tiny.py", "config/speedrun.py", f"--data={corpus}", tokenizer,
          f"--out_dir={out}/pretrain", f"--max_steps={cfg.pretrain_steps}",
          f"--time_budget_min={cfg.pretrain_min}"]),
        ("plot the loss curve", None, ["plot.py", f"{out}/pretrain"]),
        ("build the instruction data", sft_data,
         ["sft_data_process.py", f"--raw_dir={raw}", f"--out_dir={cfg.sft_dir}"]),
        ("instruction-tune (SFT)", None,
         ["sft.py", "config/sft_tiny.py", f"--init_from={out}/pretrain/ckpt.pt", f"--data={sft_data}",
          f"--val_data={sft_val}", tokenizer, f"--out_dir={out}/sft", f"--max_steps={cfg.sft_steps}",
          f"--time_budget_min={cfg.sft_min}"]),
        ("train the reward model", None,
         ["train_reward_model.py", f"--init_from={out}/sft/ckpt.pt", f"--data={cfg.sft_dir}/preference.csv",
          f"--val_data={pref_val}", tokenizer, f"--out_dir={out}/rm", f"--max_steps={cfg.rm_steps}",
          f"--time_budget_min={cfg.rm_min}"]),
        ("score the reward model on held-out pairs", f"{out}/rm/eval.json",
         ["train_reward_model.py", "--eval_only=true", f"--val_data={pref_val}", tokenizer, f"--out_dir={out}/rm"]),
        ("DPO", None,
         ["dpo.py", f"--init_from={out}/sft/ckpt.pt", f"--data={cfg.sft_dir}/preference.csv",
          f"--val_data={pref_val}", tokenizer, f"--out_dir={out}/dpo", f"--max_steps={cfg.dpo_steps}",
          f"--time_budget_min={cfg.dpo_min}", f"--nll_weight={cfg.dpo_nll_weight}"]),
        ("GRPO", None,
         ["grpo.py", f"--init_from={out}/sft/ckpt.pt", f"--prompts={sft_data}", tokenizer, f"--out_dir={out}/grpo",
          f"--max_steps={cfg.grpo_steps}",
          f"--time_budget_min={cfg.grpo_min}"]),
        ("evaluate the base model on the corpus", f"{out}/eval/base_pretrain.json",
         ["eval_pretrain.py", f"--ckpt={out}/pretrain/ckpt.pt", tokenizer, f"--bin={corpus}/val.bin",
          f"--json={out}/eval/base_pretrain.json"]),
    ]
    for name in MODELS:
        ckpt = f"{out}/{'pretrain' if name == 'base' else name}/ckpt.pt"
        plan.append((f"evaluate the {name} model's answers", f"{out}/eval/{name}/summary.json",
                     ["eval.py", f"--ckpt={ckpt}", tokenizer, f"--val_data={sft_val}", f"--out={out}/eval/{name}",
                      f"--reward_model={out}/rm/ckpt.pt"]))
        plan.append((f"4-way idiom test of the {name} model", f"{out}/eval/{name}_choice.json",
                     ["eval_choice.py", f"--ckpt={ckpt}", tokenizer, f"--val_data={sft_val}",
                      f"--json={out}/eval/{name}_choice.json"]))
    return plan


MODELS = ("base", "sft", "dpo", "grpo")
OTHER_STAGES_MIN = 4.0  # download, tokenizer, preprocessing, evaluations: a few minutes on any CPU


def budget_line(cfg: Config) -> str:
    """The time each training stage may take (each fits its steps into it), and the total to expect."""
    budgets = {"pretraining": cfg.pretrain_min, "SFT": cfg.sft_min, "reward model": cfg.rm_min, "DPO": cfg.dpo_min,
               "GRPO": cfg.grpo_min}
    total = sum(budgets.values()) + OTHER_STAGES_MIN
    return ("time budgets: " + ", ".join(f"{name} {m:g} min" for name, m in budgets.items())
            + f"; the whole demo within about {total:g} min (a stage that is done already is skipped)")


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def results_table(cfg: Config) -> str:
    """The headline numbers of this run, as a Markdown table."""
    ev = f"{cfg.out_dir}/eval"
    base = read_json(f"{ev}/base_pretrain.json")["scores"]["bin"]
    rm = read_json(f"{cfg.out_dir}/rm/eval.json")
    bpc = base.get("bits_per_char", float("nan"))
    lines = [f"Base model: validation loss {base['loss']:.3f} nats/token, {bpc:.3f} bits per character "
             f"(perplexity {base['perplexity']:.1f}) on `{base['path']}`.",
             f"Reward model: held-out pairwise accuracy {rm['all']['accuracy']:.3f} overall, "
             + ", ".join(f"{k} {v['accuracy']:.3f} ({v['pairs']} pairs)" for k, v in rm.items() if k != "all")
             + " (chance 0.5).", "",
             "| model | idiom char F1 | idiom ROUGE-L | idiom mean reward | 4-way idiom accuracy (chance 0.25) "
             "| SFT val answer loss | distinct-2 | answers in a loop |", "|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        summary, choice = read_json(f"{ev}/{name}/summary.json"), read_json(f"{ev}/{name}_choice.json")
        idiom, everything = summary["scores"].get("idiom", {}), summary["scores"]["all"]
        lines.append(f"| {name} | {idiom.get('f1', float('nan')):.3f} | {idiom.get('rouge_l', float('nan')):.3f} | "
                     f"{idiom.get('reward', float('nan')):.3f} | {choice['accuracy']:.3f} | "
                     f"{summary['val_answer_loss']:.3f} | {everything['distinct_2']:.3f} | "
                     f"{everything['loop']:.1%} |")
    lines += ["", "Held-out tool tasks (unseen numbers / unseen templates), every built-in tool offered; without "
              "tools, the same questions answered at once:", "",
              "| model | tasks | valid call | right tool | right arguments | right answer with tools | right answer "
              "without tools |", "|---|---|---|---|---|---|---|"]
    for name in MODELS:
        tools = read_json(f"{ev}/{name}/summary.json")["tool_tasks"]
        for kind in [k for k in ("all", "arithmetic", "lookup") if k in tools["numbers"] or k in tools["templates"]]:
            numbers, templates = tools["numbers"].get(kind, {}), tools["templates"].get(kind, {})
            lines.append(f"| {name} | {kind} | " + " | ".join(
                f"{numbers.get(k, float('nan')):.0%} / {templates.get(k, float('nan')):.0%}" for k in SCORES) + " |")
    return "\n".join(lines)


BASE_PROMPTS = ("中国的首都是", "人民日报北京1月1日电", "春天来了,")
CHAT_QUESTIONS = ("成语“画蛇添足”是什么意思?", "成语“守株待兔”是什么意思?", "“春”字是什么意思?")


def samples(cfg: Config) -> str:
    """Greedy continuations of the base model and chat answers of the SFT model, as Markdown."""
    from babyllama.checkpoint import load_model
    from chatglm_tokenizer import load_tokenizer
    from dataset_sft import chat_prompt_ids
    tok = load_tokenizer(f"{cfg.data_dir}/tokenizer/tokenizer.model")
    lines = ["| model | prompt | output (greedy, repetition penalty 1.1) |", "|---|---|---|"]
    for name, prompts in (("base", BASE_PROMPTS), ("sft", CHAT_QUESTIONS)):
        model, _ = load_model(f"{cfg.out_dir}/{'pretrain' if name == 'base' else name}/ckpt.pt")
        for prompt in prompts:
            ids = tok.encode(prompt) if name == "base" else chat_prompt_ids(tok, [], prompt, model.args.max_seq_len)
            out = model.generate([ids], 48, temperature=0.0, repetition_penalty=1.1, eos_id=tok.eos_id)[0]
            lines.append(f"| {name} | {prompt} | {tok.decode(out).replace('|', '/').replace(chr(10), ' ')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        cfg = parse_config(Config, argv, __doc__)
        plan = stages(cfg)
        print(budget_line(cfg), flush=True)
        for i, (name, done_file, command) in enumerate(plan, 1):
            header = f"[{i}/{len(plan)}] {name}"
            if done_file is not None and os.path.exists(done_file):
                print(f"{header}: done already ({done_file})")
                continue
            print(f"{header}: python {' '.join(command)}", flush=True)
            start = time.time()
            os.makedirs(f"{cfg.out_dir}/eval", exist_ok=True)
            result = subprocess.run([sys.executable, *command])
            if result.returncode != 0:
                raise SystemExit(f"stage '{name}' failed (exit {result.returncode}): python {' '.join(command)}\n"
                                 "fix the error above and run demo.py again; finished stages are kept")
            print(f"{header}: finished in {time.time() - start:.0f} s")
        table = results_table(cfg) + "\n\n" + samples(cfg)
        with open(f"{cfg.out_dir}/results.md", "w", encoding="utf-8") as f:
            f.write(table + "\n")
        print(f"\n{table}\n\nloss curve: {cfg.out_dir}/pretrain/loss.png; chat with the SFT model: "
              f"python chat.py --ckpt={cfg.out_dir}/sft/ckpt.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
