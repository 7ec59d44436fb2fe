"""Chat with a model in the terminal; the answer streams in as it is generated.

    python chat.py                                  # out/sft/ckpt.pt
    python chat.py --ckpt=out/dpo/ckpt.pt --temperature=0.7
    printf '成语“画蛇添足”是什么意思？\\n' | python chat.py   # from a pipe: one answer a line

Commands: /reset forgets the conversation; /set NAME=VALUE changes temperature, top_k, top_p,
repetition_penalty or max_new_tokens; /settings shows them; /quit (or Ctrl-D) leaves.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from babyllama.checkpoint import ModelSettings, load_for_inference
from babyllama.configurator import (
    Fraction,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
    SettingError,
    parse_config,
    set_from_text,
)
from babyllama.errors import UsageError, one_line_errors
from dataset_sft import chat_prompt_ids


@dataclass
class Config(ModelSettings):
    temperature: NonNegativeFloat = 0.0  # 0 is greedy
    top_k: NonNegative = 0  # 0 keeps every token
    top_p: Fraction = 1.0  # nucleus sampling; 0 keeps only the most likely token
    repetition_penalty: PositiveFloat = 1.1
    max_new_tokens: Positive = 256
    seed: int = 0


SETTABLE = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


def stream_answer(model, tok, prompt_ids: list[int], cfg: Config, generator, out=sys.stdout) -> str:
    """Print the answer as it comes, whole characters at a time, and return it."""
    ids: list[int] = []
    shown = ""
    for step in model.generate_stream([prompt_ids], cfg.max_new_tokens, temperature=cfg.temperature,
                                      top_k=cfg.top_k or None, top_p=cfg.top_p,
                                      repetition_penalty=cfg.repetition_penalty, eos_id=tok.eos_id,
                                      generator=generator):
        if step[0] is None or step[0] == tok.eos_id:
            break
        ids.append(step[0])
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):  # a character split across byte tokens waits for its last byte
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tok.decode(ids)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return text


def apply_setting(cfg: Config, assignment: str) -> str:
    """`/set NAME=VALUE`: checked as the --flag is; the answer to print."""
    name, _, value = assignment.partition("=")
    name = name.strip()
    if name not in SETTABLE or not value.strip():
        return f"usage: /set NAME=VALUE with NAME one of {', '.join(SETTABLE)}"
    try:
        set_from_text(cfg, name, value)
    except SettingError as e:
        return f"error: {e}"
    return f"{name} = {getattr(cfg, name)}"


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        cfg = parse_config(Config, argv, __doc__)
        if sys.stdin is None:
            raise UsageError("standard input is closed: chat.py reads the questions from it (a terminal or a pipe)")
        model, _, tok = load_for_inference(cfg)
    interactive = sys.stdin.isatty()
    generator = torch.Generator(device=model.freqs_cos.device).manual_seed(cfg.seed)
    history: list[tuple[str, str]] = []
    if interactive:
        print(f"chatting with {cfg.ckpt}; /reset, /set NAME=VALUE, /settings, /quit")
    while True:
        if interactive:
            print("\n你> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command == "/quit":
                break
            if command == "/reset":
                history.clear()
                print("(conversation forgotten)")
            elif command == "/set":
                print(apply_setting(cfg, rest))
            elif command == "/settings":
                print(", ".join(f"{k}={getattr(cfg, k)}" for k in SETTABLE))
            else:
                print("commands: /reset, /set NAME=VALUE, /settings, /quit")
            continue
        if interactive:
            print("模型> ", end="", flush=True)
        prompt = chat_prompt_ids(tok, history, line, model.args.max_seq_len,
                                 reserve=min(cfg.max_new_tokens, model.args.max_seq_len // 2))
        history.append((line, stream_answer(model, tok, prompt, cfg, generator)))


if __name__ == "__main__":
    main(sys.argv[1:])
