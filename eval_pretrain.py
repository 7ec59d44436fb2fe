"""Evaluate a base (pretrained) model: continuations of prompts, and perplexity / bits per character.

    python eval_pretrain.py                                      # the seed's two prompts, val.bin
    python eval_pretrain.py --prompts="春眠不觉晓，|人民日报记者" --text=my_held_out.txt
    python eval_pretrain.py --prompts_file=prompts.txt --bin=data/demo/val.bin --json=out/eval_pretrain.json
    python eval_pretrain.py --long_context=8 --json=out/long.json && python plot.py out/long.json
                                              # by position up to 8x the trained length, RoPE scaled or not

Bits per character compare across tokenizers (a loss per token does not): bpc = loss / ln 2 x tokens / chars.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch

from babyllama.checkpoint import ContextSettings, ModelSettings, load_for_inference, read_as_trained
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
from babyllama.errors import UsageError, one_line_errors
from dataset import PretrainDataset, check_tokenizer
from model import ROPE_SCALINGS, Transformer

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
    long_context: NonNegative = 0  # N: --bin's bits per character by position up to N x the trained length
    scalings: str = "none,yarn"  # the RoPE scalings --long_context compares (own: the checkpoint's)
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
        ratio = tokens_per_char(cfg.bin)
        if ratio:
            result["bin"]["bits_per_char"] = loss / math.log(2) * ratio
    if cfg.text:
        windows, chars = text_windows(tok, cfg.text, seq_len, cfg.max_windows)
        loss, n = mean_loss(model, windows, cfg.batch_size)
        result["text"] = {"path": cfg.text, "tokens": n, "loss": loss, "perplexity": math.exp(loss),
                          "bits_per_char": loss * n / math.log(2) / max(chars, 1)}
    return result


def position_buckets(trained: int, longest: int) -> list[tuple[int, int]]:
    """[start, end) position ranges doubling in width: a quarter and a half of the trained length, then
    the trained length and each doubling of it, up to longest."""
    edges = [0, max(1, trained // 4), max(2, trained // 2), trained]
    while edges[-1] < longest:
        edges.append(min(2 * edges[-1], longest))
    return [(a, b) for a, b in zip(edges, edges[1:]) if a < b]


@torch.no_grad()
def bucket_losses(model: Transformer, windows: np.ndarray, buckets: list[tuple[int, int]],
                  batch_size: int) -> list[float]:
    """Mean next-token loss of the targets at each bucket's positions (position 0: the window's second
    token), then over the whole window."""
    device = model.freqs_cos.device
    totals = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for start in range(0, len(windows), batch_size):
        w = torch.from_numpy(windows[start:start + batch_size].astype(np.int64)).to(device)
        _, loss = model(w[:, :-1], w[:, 1:], per_token=True)
        totals += loss.double().sum(0).cpu()
    return [float(totals[a:b].sum()) / ((b - a) * len(windows)) for a, b in buckets + [(0, len(totals))]]


def by_position(model: Transformer, tok, cfg: Config) -> dict:
    """Bits per character (per token where --bin has no meta.json) by position bucket, up to
    --long_context times the trained length, for each scaling of --scalings."""
    if not cfg.bin:
        raise UsageError("--long_context reads --bin; give a token file")
    if cfg.max_seq_len:
        raise UsageError("--long_context sets the window itself (N x the trained length); leave out --max_seq_len")
    scalings = cfg.scalings.split(",")
    known = ("none", "own", *ROPE_SCALINGS[1:])
    if any(s not in known for s in scalings):
        raise UsageError(f"--scalings={cfg.scalings}: each must be one of {', '.join(known)}")
    args = model.args
    trained = args.trained_len
    longest = cfg.long_context * trained
    if os.path.getsize(cfg.bin) // 2 < longest + 1:  # uint16 ids
        raise ValueError(f"{cfg.bin} holds fewer than {longest + 1:,} tokens, one window of {cfg.long_context} x "
                         f"the trained length {trained}")
    windows = bin_windows(cfg.bin, longest, cfg.max_windows, tok)
    ratio = tokens_per_char(cfg.bin)
    unit = ratio / math.log(2) if ratio else 1.0
    buckets = position_buckets(trained, longest)
    result = {"bin": cfg.bin, "trained_length": trained, "windows": len(windows),
              "unit": "bits per character" if ratio else "nats per token", "buckets": buckets, "scalings": {},
              "window": {}}
    for scaling in scalings:
        own = scaling == "own"
        context = ContextSettings(max_seq_len=longest, rope_scaling="" if own else scaling,
                                  rope_factor=cfg.rope_factor or (args.rope_factor if own and args.rope_scaling else 0))
        model.read_as(context.applied(replace(args, max_seq_len=trained)))
        *losses, whole = (loss * unit for loss in bucket_losses(model, windows, buckets, cfg.batch_size))
        result["scalings"][scaling], result["window"][scaling] = losses, whole
    model.read_as(args)
    return result


def print_by_position(r: dict) -> None:
    names = list(r["scalings"])
    print(f"{r['unit']} by position, {r['windows']} windows of {r['bin']} (trained length {r['trained_length']}):")
    print("positions      " + "".join(f"{n:>10}" for n in names))
    for i, (a, b) in enumerate(r["buckets"]):
        print(f"{a:>6}-{b - 1:<7} " + "".join(f"{r['scalings'][n][i]:>10.3f}" for n in names))
    print("whole window   " + "".join(f"{r['window'][n]:>10.3f}" for n in names))


def tokens_per_char(bin_path: str) -> float | None:
    """Tokens per character of a .bin's split, from the meta.json beside it (None without one)."""
    meta = os.path.join(os.path.dirname(bin_path), "meta.json")
    if not os.path.isfile(meta):
        return None
    with open(meta, encoding="utf-8") as f:
        m = json.load(f)
    split = os.path.splitext(os.path.basename(bin_path))[0]
    chars, tokens = m.get("characters", {}).get(split), m.get("tokens", {}).get(split)
    return tokens / chars if chars and tokens else None


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        cfg = parse_config(Config, argv, __doc__)
        model, checkpoint, tok = load_for_inference(cfg)
        if read_as_trained(model, checkpoint, tok.eos_id):
            print("scoring with attention inside each document, as the checkpoint was trained (--document_mask)")
        prompts = cfg.prompts.split("|")
        if cfg.prompts_file:
            prompts = [line for line in read_text(cfg.prompts_file).splitlines() if line.strip()]
        scores = perplexity(model, tok, cfg)  # first: it reads the files, the samples take a while
        positions = by_position(model, tok, cfg) if cfg.long_context else None
        samples = continuations(model, tok, prompts, cfg)
        for prompt, text in zip(prompts, samples):
            print(f"[prompt] {prompt}\n[continuation] {text}\n")
        for s in scores.values():
            bpc = f", {s['bits_per_char']:.3f} bits/char" if "bits_per_char" in s else ""
            print(f"{s['path']}: loss {s['loss']:.4f} over {s['tokens']:,} tokens, "
                  f"perplexity {s['perplexity']:.2f}{bpc}")
        if positions:
            print_by_position(positions)
        if cfg.json:
            samples_json = [{"prompt": p, "continuation": c} for p, c in zip(prompts, samples)]
            write_json_atomic(cfg.json, {"samples": samples_json, "scores": scores}
                              | ({"by_position": positions} if positions else {}))


if __name__ == "__main__":
    main(sys.argv[1:])
