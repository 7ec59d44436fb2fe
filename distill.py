"""Distillation: a small student learns from a bigger teacher's next-token distributions (white-box), mixed
with the data's own targets, on pretraining windows or on SFT samples.

    python distill.py --teacher=out/teacher/ckpt.pt --model=tiny_shallow --data=data/demo --out_dir=out/distill
    python distill.py --teacher=out/sft/ckpt.pt --init_from=out/small_sft/ckpt.pt \\
        --data=sft_data/sft_data.csv --val_data=sft_data/sft_val.csv --out_dir=out/distill_sft

loss = mix * T^2 * KL(teacher || student, both at temperature T) + (1 - mix) * cross-entropy, over the
positions the data trains (every position of a window; the answers of an SFT sample). --top_k=K keeps the
teacher's K most likely tokens of each position; --loss_chunk=N takes N positions at a time (neither
model's logits ever whole); --teacher_int8 runs the teacher with int8 weights. Black-box, --black_box=true
with SFT prompts: the teacher answers each prompt (sampled at --answer_temperature) and the student is
fine-tuned on those answers. The teacher and the student share the tokenizer (checked) and the
vocabulary. The student's ckpt.pt is an ordinary checkpoint (stage "distill"): eval, chat, export and
sft take it as any other.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from babyllama.checkpoint import load_model, read_as_trained
from babyllama.common import print0
from babyllama.configurator import (
    Fraction,
    InputFile,
    NonNegative,
    NonNegativeFloat,
    OutputDir,
    Positive,
    PositiveFloat,
    SeqLen,
    read_model_preset,
)
from babyllama.distill import distillation_loss, teacher_examples
from babyllama.errors import SettingError, UsageError
from babyllama.trainer import TrainConfig, start_training, train_loop, training_stage, validation_loss
from chatglm_tokenizer import OUR_TOKENIZER, SPTokenizer, load_tokenizer
from dataset import PretrainDataset, pretraining_splits
from dataset_sft import SFTDataset, collate
from model import IGNORE_INDEX, Transformer


@dataclass
class Config(TrainConfig):
    teacher: InputFile = "out/teacher/ckpt.pt"  # the bigger model (our ckpt.pt) whose distributions are learnt
    teacher_int8: bool = False  # run the teacher with int8 weights (babyllama/quantize.py)
    data: str = "data/demo"  # pretraining .bin files or folders (comma-separated), or an SFT .csv
    val_data: str = ""  # with an SFT .csv: held-out samples; pretraining data brings its val.bin
    tokenizer: InputFile = OUR_TOKENIZER  # the tokenizer of both models
    out_dir: OutputDir = "out/distill"
    model: str = "tiny_shallow"  # the student's preset (a fresh model), unless init_from gives its weights
    init_from: InputFile = ""  # the student's starting weights (our ckpt.pt)
    max_seq_len: SeqLen = 0  # 0: the student's
    temperature: PositiveFloat = 2.0  # softens both distributions; the KL term is scaled by its square
    mix: Fraction = 0.5  # the weight of the teacher's term; 0 is plain training on the data
    top_k: NonNegative = 0  # keep the teacher's k most likely tokens of each position; 0: the whole vocabulary
    black_box: bool = False  # SFT data: fine-tune on the teacher's own answers to the prompts instead
    answer_tokens: Positive = 128  # black box: the longest answer the teacher writes
    answer_temperature: NonNegativeFloat = 0.7  # black box: the teacher's sampling temperature (0: greedy)
    batch_size: Positive = 16  # windows or samples per micro-step in each process
    max_steps: NonNegative = 2000
    lr: PositiveFloat = 1e-3
    min_lr: NonNegativeFloat = 1e-4
    warmup_steps: NonNegative = 100
    eval_batches: Positive = 20


def load_teacher(cfg: Config, tokenizer: SPTokenizer, device: str) -> Transformer:
    """The teacher, frozen, on device, reading windows as it was trained to; refused when it was trained with
    another tokenizer."""
    teacher, state = load_model(cfg.teacher, device=device)
    if state.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        raise UsageError(f"--teacher={cfg.teacher} was trained with another tokenizer than --tokenizer={cfg.tokenizer}")
    if cfg.teacher_int8:
        from babyllama.quantize import quantize_int8
        quantize_int8(teacher)
    read_as_trained(teacher, state, tokenizer.eos_id)
    return teacher.requires_grad_(False)


def load_student(cfg: Config, teacher: Transformer) -> Transformer:
    """A fresh student of cfg.model, or init_from's weights; its vocabulary must be the teacher's."""
    overrides = {"max_seq_len": cfg.max_seq_len} if cfg.max_seq_len else {}
    if cfg.init_from:
        student, _ = load_model(cfg.init_from, **overrides)
    else:
        student = Transformer(read_model_preset(cfg.model, **overrides))
    if student.args.vocab_size != teacher.args.vocab_size:
        raise UsageError(f"the student has {student.args.vocab_size:,} ids and the teacher "
                         f"{teacher.args.vocab_size:,}: they must share the vocabulary")
    if student.args.max_seq_len > teacher.args.max_seq_len:
        raise UsageError(f"the student's context of {student.args.max_seq_len} is longer than the teacher's "
                         f"{teacher.args.max_seq_len}: pass --max_seq_len={teacher.args.max_seq_len}")
    return student


def main(argv: list[str] | None = None) -> None:
    with training_stage(Config, argv, __doc__) as (cfg, dist):
        if cfg.black_box and not cfg.data.endswith(".csv"):
            raise SettingError(f"--black_box=true needs SFT prompts (a .csv) in --data, not {cfg.data}")
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        tokenizer = load_tokenizer(cfg.tokenizer)
        teacher = load_teacher(cfg, tokenizer, dist.device)
        student = load_student(cfg, teacher)
        T = student.args.max_seq_len
        if cfg.black_box and cfg.answer_tokens >= T:
            raise SettingError(f"--answer_tokens={cfg.answer_tokens}: leave room for the prompt in the context of {T}")
        if cfg.data.endswith(".csv"):
            data = SFTDataset(cfg.data, tokenizer, T)
            val = SFTDataset(cfg.val_data, tokenizer, T) if cfg.val_data else None
            corpus_chars = None
        else:
            data, val, corpus_chars = pretraining_splits(cfg.data, tokenizer.sha256, T)

        def batch_of(dataset: SFTDataset | PretrainDataset) -> Callable[[list[int]], tuple]:
            return partial(dataset.batch, pad_id=tokenizer.pad_id) if isinstance(dataset, SFTDataset) else dataset.batch

        how = (f"its answers to the prompts (black box: up to {cfg.answer_tokens} tokens, temperature "
               f"{cfg.answer_temperature:g})" if cfg.black_box else
               f"temperature {cfg.temperature:g}, mix {cfg.mix:g}, "
               + (f"top {cfg.top_k}" if cfg.top_k else "whole vocabulary"))
        print0(f"distilling {cfg.teacher} ({teacher.num_params() / 1e6:.2f}M parameters) into a "
               f"{student.num_params() / 1e6:.2f}M student: {len(data):,} items of {cfg.data}; {how}", dist=dist)
        training = start_training(cfg, student, dist, len(data), cfg.batch_size,
                                  student.flops_per_token(T) + teacher.flops_per_token(T) / 3, stage="distill",
                                  tokenizer_sha256=tokenizer.sha256)
        trainer, order = training.trainer, training.order

        generator = torch.Generator(device=dist.device)

        def micro_batch() -> tuple:
            ids = order.next(cfg.batch_size)
            if not cfg.black_box:
                return batch_of(data)(ids)
            generator.manual_seed(cfg.seed * 1_000_003 + dist.rank * 10_007 + trainer.step)  # a resume samples alike
            with torch.no_grad():
                return collate(teacher_examples(teacher, tokenizer, [data.rows[i] for i in ids], T, cfg.answer_tokens,
                                                cfg.answer_temperature, generator), tokenizer.pad_id)

        def next_batches():
            batches = [tuple(t.to(dist.device) for t in micro_batch()) for _ in range(cfg.grad_accum)]
            return batches, sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)

        def loss(model, batch):
            x, y = batch
            if cfg.black_box:  # the teacher's answers are the targets
                return model(x, y)[1]
            with torch.no_grad():
                teacher_h = teacher.hidden(x)

            def head(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
                return distillation_loss(h, weight, teacher_h, teacher.output, y, cfg.temperature, cfg.mix,
                                         cfg.top_k, cfg.loss_chunk)
            return model(x, loss_head=head)[1]

        def validation() -> dict[str, float]:
            metrics = {"val_loss": validation_loss(trainer, len(val), batch_of(val), cfg.eval_batches,
                                                   cfg.batch_size)}
            if corpus_chars:
                metrics["val_bpc"] = metrics["val_loss"] / math.log(2) / corpus_chars
            return metrics

        train_loop(training, next_batches, loss, validation if val is not None else None)
        print0(f"checkpoint: {os.path.join(cfg.out_dir, 'ckpt.pt')}", dist=dist)


if __name__ == "__main__":
    main(sys.argv[1:])
