"""Chat with a model in the terminal; the answer streams in as it is generated.

    python chat.py                                  # out/sft/ckpt.pt
    python chat.py --ckpt=out/dpo/ckpt.pt --temperature=0.7
    printf '成语“画蛇添足”是什么意思？\\n' | python chat.py   # from a pipe: one answer a line

Commands: /reset forgets the conversation; /set NAME=VALUE changes temperature, top_k, top_p,
repetition_penalty or max_new_tokens; /settings shows them; /quit (or Ctrl-D) leaves.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, fields

import torch

from checkpoint import load_model_and_tokenizer
from common import pick_device
from configurator import parse_config
from dataset_sft import chat_prompt_ids


@dataclass
class Config:
    ckpt: str = "out/sft/ckpt.pt"
    tokenizer: str = "data/tokenizer/tokenizer.model"
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    max_new_tokens: int = 256
    seed: int = 0
    device: str = "auto"


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
    name, _, value = assignment.partition("=")
    name = name.strip()
    if name not in SETTABLE or not value:
        return f"usage: /set NAME=VALUE with NAME one of {', '.join(SETTABLE)}"
    kind = next(f.type for f in fields(cfg) if f.name == name)
    try:
        setattr(cfg, name, (int if kind in (int, "int") else float)(value))
    except ValueError:
        return f"{name} needs a number, not {value!r}"
    return f"{name} = {getattr(cfg, name)}"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, argv, __doc__)
    try:
        model, _, tok = load_model_and_tokenizer(cfg.ckpt, cfg.tokenizer, pick_device(cfg.device))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
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
