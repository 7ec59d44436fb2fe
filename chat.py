"""Chat with a model in the terminal; the answer streams in as it is generated.

    python chat.py                                  # out/sft/ckpt.pt
    python chat.py --ckpt=out/dpo/ckpt.pt --temperature=0.7
    printf '成语“画蛇添足”是什么意思？\\n' | python chat.py   # from a pipe: one answer a line
    python chat.py --tools=all --reasoning=on         # the built-in tools, run when the model calls them

With --tools, the model sees the tools' signatures; a call it writes is run (babyllama/tools.py, with a time
limit; a failure is an error result) and the result handed back, until it answers in text.

Commands: /reset forgets the conversation; /set NAME=VALUE changes temperature, top_k, top_p,
repetition_penalty or max_new_tokens; /settings shows them; /quit (or Ctrl-D) leaves.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from babyllama.chat_format import parse_answer, reasoning_prefix, render_call, render_results, render_tools
from babyllama.checkpoint import ModelSettings, load_for_inference
from babyllama.configurator import (
    Fraction,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
    SettingError,
    one_of,
    parse_config,
    set_from_text,
)
from babyllama.errors import UsageError, one_line_errors
from babyllama.tools import BUILTIN, run_tool
from dataset_sft import chat_prompt_ids


@dataclass
class Config(ModelSettings):
    temperature: NonNegativeFloat = 0.0  # 0 is greedy
    top_k: NonNegative = 0  # 0 keeps every token
    top_p: Fraction = 1.0  # nucleus sampling; 0 keeps only the most likely token
    repetition_penalty: PositiveFloat = 1.1
    max_new_tokens: Positive = 256
    seed: int = 0
    tools: str = ""  # built-in tools to offer, comma-separated (calculator, date_add, date_diff, unit_convert) or all
    reasoning: one_of("auto", "on", "off") = "auto"  # think before answering; auto: the model decides
    max_tool_rounds: Positive = 3  # calls answered in a row before the model must answer in text


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


def builtin_tools(names: str) -> list[dict]:
    wanted = list(BUILTIN) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in BUILTIN]
    if unknown:
        raise UsageError(f"--tools: unknown tool {unknown[0]!r} (built-in: {', '.join(BUILTIN)}, or all)")
    return [BUILTIN[n].spec() for n in wanted]


def reply(model, tok, history: list[tuple[str, str]], prompt: str, cfg: Config, generator, tools: bool,
          out=sys.stdout) -> None:
    """Answer prompt after history, streaming; run each tool call the answer makes and answer its result,
    up to max_tool_rounds. The turns are added to history."""
    prefix = reasoning_prefix({"auto": None, "on": True, "off": False}[cfg.reasoning])
    for _ in range(cfg.max_tool_rounds + 1):
        ids = chat_prompt_ids(tok, history, prompt, model.args.max_seq_len,
                              reserve=min(cfg.max_new_tokens, model.args.max_seq_len // 2))
        out.write(prefix)
        text = prefix + stream_answer(model, tok, ids + (tok.encode(prefix) if prefix else []), cfg, generator, out)
        history.append((prompt, text))
        calls = parse_answer(text, calls=tools).tool_calls
        if not calls:
            return
        results = [run_tool(call.name, call.arguments) for call in calls]
        for call, result in zip(calls, results):
            out.write(f"[{render_call(call)} -> {result}]\n")
        prompt = render_results(results)


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
        tools = builtin_tools(cfg.tools)
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
        reply(model, tok, history, (render_tools(tools) if not history else "") + line, cfg, generator, bool(tools))


if __name__ == "__main__":
    main(sys.argv[1:])
