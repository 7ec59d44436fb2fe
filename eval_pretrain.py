"""Evaluate a base (pretrained) model: continuations of prompts, and perplexity / bits per character.

    python eval_pretrain.py                                      # the seed's two prompts, val.bin
    python eval_pretrain.py --prompts="春眠不觉晓，|人民日报记者" --text=my_held_out.txt
    python eval_pretrain.py --prompts_file=prompts.txt --bin=data/demo/val.bin --json=out/eval_pretrain.json

Bits per character compare across tokenizers (a loss per token does not): bpc = loss / ln 2 x tokens / chars.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from babyllama.checkpoint import ModelSettings, load_for_inference
from babyllama.cleaning import clean_text
from babyllama.common import read_text, write_json_atomic
from babyllama.configurator import (
    Fraction,
    InputFile,
    NonNegative,
    NonNegativeFloat,
    OutputFile,
    Positive,
    PositiveFloat,
    parse_config,
)
from babyllama.errors import one_line_errors
from dataset import PretrainDataset, check_tokenizer
from model import Transformer

SEED_PROMPTS = ["床前明月光，疑是地上霜。举头望明月，", "《小王子》是一本畅销童话书，它讲述了："]


@dataclass
class Config(ModelSettings):
    ckpt: InputFile = "out/pretrain/ckpt.pt"  # our ckpt.pt or the seed's .pth
    prompts: str = "|".join(SEED_PROMPTS)  # prompts separated by |
    prompts_file: InputFile = ""  # one prompt a line (replaces --prompts)
    max_new_tokens: Positive = 100
    temperature: NonNegativeFloat = 0.7  # 0 is greedy
    top_k: NonNegative = 30
    top_p: Fraction = 0.95  # nucleus sampling; 0 keeps only the most likely token
    repetition_penalty: PositiveFloat = 1.1
    seed: int = 0  # sampling seed, so that a run can be repeated
    bin: InputFile = "data/demo/val.bin"  # a token file for perplexity ('' for none)
    text: InputFile = ""  # a UTF-8 text file for perplexity (cleaned and tokenized here)
    max_windows: Positive = 200  # at most this many windows of max_seq_len tokens are scored
    batch_size: Positive = 8
    json: OutputFile = ""  # also write the results here


def continuations(model: Transformer, tok, prompts: list[str], cfg: Config) -> list[str]:
    generator = torch.Generator(device=model.freqs_cos.device).manual_seed(cfg.seed)
    outputs = model.generate([tok.encode(p) for p in prompts], cfg.max_new_tokens, temperature=cfg.temperature,
                             top_k=cfg.top_k, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
                             eos_id=tok.eos_id, generator=generator)
    return [tok.decode(ids) for ids in outputs]


@torch.no_grad()
def mean_loss(model: Transformer, windows: np.ndarray, batch_size: int) -> tuple[float, int]:
    """Mean next-token loss over windows (n, T + 1) of token ids, and the number of tokens scored."""
    device = model.freqs_cos.device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        w = torch.from_numpy(windows[start:start + batch_size].astype(np.int64)).to(device)
        _, loss = model(w[:, :-1], w[:, 1:])
        n = w[:, 1:].numel()
        total += float(loss) * n
        count += n
    return total / max(count, 1), count


def bin_windows(path: str, seq_len: int, limit: int, tok) -> np.ndarray:
    """The first windows of a .bin, refused when it was made with another tokenizer (its meta.json says
    so, or it holds ids the tokenizer does not have)."""
    check_tokenizer([path], tok.sha256)
    data = PretrainDataset([path], seq_len)
    n = min(limit, len(data) - 1) if len(data) > 1 else 1  # the last window may be padded: leave it out
    windows = np.stack([data.window(i) for i in range(n)])
    if int(windows.max()) >= tok.vocab_size:
        raise ValueError(f"{path} holds id {int(windows.max())} but the tokenizer {tok.model_file} has "
                         f"{tok.vocab_size:,} ids: the corpus was made with another tokenizer")
    return windows


def text_windows(tok, path: str, seq_len: int, limit: int) -> tuple[np.ndarray, int]:
    """Windows of the text's tokens (documents = non-empty lines, each followed by eos) and its characters."""
    docs = [clean_text(line) for line in read_text(path).splitlines() if line.strip()]
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d) + [tok.eos_id]
    n = max(1, min(limit, (len(ids) - 1) // seq_len))
    if len(ids) < seq_len + 1:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than one window of {seq_len + 1}")
    windows = np.array([ids[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])
    chars = sum(len(d) for d in docs)
    return windows, chars * (n * seq_len) // max(len(ids) - 1, 1)  # characters of the scored part


def perplexity(model: Transformer, tok, cfg: Config) -> dict:
    seq_len = model.args.max_seq_len
    result = {}
    if cfg.bin:
        windows = bin_windows(cfg.bin, seq_len, cfg.max_windows, tok)
        loss, n = mean_loss(model, windows, cfg.batch_size)
        result["bin"] = {"path": cfg.bin, "tokens": n, "loss": loss, "perplexity": math.exp(loss)}
        meta = os.path.join(os.path.dirname(cfg.bin), "meta.json")
        split = os.path.splitext(os.path.basename(cfg.bin))[0]
        if os.path.isfile(meta):
            with open(meta, encoding="utf-8") as f:
                m = json.load(f)
            chars, tokens = m.get("characters", {}).get(split), m.get("tokens", {}).get(split)
            if chars and tokens:
                result["bin"]["bits_per_char"] = loss / math.log(2) * tokens / chars
    if cfg.text:
        windows, chars = text_windows(tok, cfg.text, seq_len, cfg.max_windows)
        loss, n = mean_loss(model, windows, cfg.batch_size)
        result["text"] = {"path": cfg.text, "tokens": n, "loss": loss, "perplexity": math.exp(loss),
                          "bits_per_char": loss * n / math.log(2) / max(chars, 1)}
    return result


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        cfg = parse_config(Config, argv, __doc__)
        model, _, tok = load_for_inference(cfg)
        prompts = cfg.prompts.split("|")
        if cfg.prompts_file:
            prompts = [line for line in read_text(cfg.prompts_file).splitlines() if line.strip()]
        scores = perplexity(model, tok, cfg)  # first: it reads the files, the samples take a while
        samples = continuations(model, tok, prompts, cfg)
        for prompt, text in zip(prompts, samples):
            print(f"[prompt] {prompt}\n[continuation] {text}\n")
        for s in scores.values():
            bpc = f", {s['bits_per_char']:.3f} bits/char" if "bits_per_char" in s else ""
            print(f"{s['path']}: loss {s['loss']:.4f} over {s['tokens']:,} tokens, "
                  f"perplexity {s['perplexity']:.2f}{bpc}")
        if cfg.json:
            samples_json = [{"prompt": p, "continuation": c} for p, c in zip(prompts, samples)]
            write_json_atomic(cfg.json, {"samples": samples_json, "scores": scores})


if __name__ == "__main__":
    main(sys.argv[1:])
