"""Pretraining: next-token prediction on the token stream made by data_process.py.

    python pretrain.py config/pretrain_tiny.py            # the demo's model (tiny_shallow) on data/demo, on the CPU
    python pretrain.py --model=tiny --max_steps=200       # the flags alone: the 6-layer tiny preset
    python pretrain.py config/pretrain_tiny.py --init_from=out/pretrain/ckpt.pt --out_dir=out/long \
        --max_seq_len=1024 --rope_scaling=yarn --max_steps=300 # continue at 4x the length (docs/11_long_context.md)
    torchrun --nproc_per_node=4 pretrain.py config/pretrain_baby_92m.py    # several GPUs
    torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \\
        --nproc_per_node=8 pretrain.py config/pretrain_baby_218m.py       # several machines

A run resumes from out_dir/ckpt.pt when it is there (model, optimizer, step, data position, RNG), so
an interrupted run continues exactly; Ctrl-C or SIGTERM saves a checkpoint before exiting.
"""
from __future__ import annotations

import functools
import math
import os
import sys
from dataclasses import dataclass

import torch

from babyllama.checkpoint import ContextSettings, load_model
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
    one_of,
    read_model_preset,
)
from babyllama.schedule import window_length_at
from babyllama.trainer import TrainConfig, start_training, train_loop, training_stage, validation_loss
from chatglm_tokenizer import OUR_TOKENIZER, load_tokenizer
from dataset import pretraining_splits
from model import INITS, ModelArgs, Transformer, init_residual_projections


@dataclass
class Config(TrainConfig, ContextSettings):
    data: str = "data/demo"  # .bin files or folders (their train.bin/val.bin), comma-separated
    tokenizer: InputFile = OUR_TOKENIZER  # the tokenizer the corpus was made with
    out_dir: OutputDir = "out/pretrain"  # ckpt.pt, metrics.jsonl
    model: str = "tiny"  # model preset in config/ (tiny, baby_92m, baby_218m) or a path to one
    max_seq_len: SeqLen = 0  # 0 keeps the preset's (with --init_from and --rope_scaling: continue at a longer one)
    dropout: Fraction = 0.0
    init_from: InputFile = ""  # start from these weights: our ckpt.pt or the seed's .pth
    init: one_of(*INITS) = "seed"  # starting weights of the residual projections (model.init_residual_projections)
    batch_size: Positive = 16  # windows per micro-step in each process
    max_steps: NonNegative = 2000  # optimizer steps; the LR schedule is counted in these
    lr: PositiveFloat = 1e-3  # peak learning rate
    min_lr: NonNegativeFloat = 1e-4  # at the last step, the end of the decay (whichever --lr_schedule)
    warmup_steps: NonNegative = 100
    weight_decay: NonNegativeFloat = 0.1
    eval_batches: Positive = 20  # batches of val.bin per validation
    document_mask: bool = False  # attention stays inside each document (an eos starts the next), as the
    # held-out score and a chat read one; off: a window's documents see the ones before them
    seq_len_warmup: NonNegative = 0  # steps over which the training windows grow from a quarter of the
    # context to all of it (schedule.window_length_at: their first tokens); 0: off
    aligned_windows: bool = False  # each training window starts at a document's start (dataset.aligned_window_starts)
    check_settings: bool = False  # check the settings and the model's shape, then stop before reading any data


def build_model_args(cfg: Config) -> ModelArgs:
    return cfg.applied(read_model_preset(cfg.model, dropout=cfg.dropout))


def main(argv: list[str] | None = None) -> None:
    with training_stage(Config, argv, __doc__) as (cfg, dist):
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        args = build_model_args(cfg)
        if cfg.check_settings:
            print0(f"settings checked: model {cfg.model} with {args.n_layers} layers of {args.dim}, "
                   f"context {args.max_seq_len}", dist=dist)
            return
        tokenizer = load_tokenizer(cfg.tokenizer)
        # A corpus made with another tokenizer is named before any vocabulary mismatch.
        data, val, corpus_chars = pretraining_splits(cfg.data, tokenizer.sha256, args.max_seq_len,
                                                     tokenizer.eos_id if cfg.aligned_windows else None)
        if tokenizer.n_pieces > args.vocab_size:
            raise ValueError(f"model vocab_size {args.vocab_size} is smaller than the tokenizer's {tokenizer.n_pieces} "
                             "pieces")
        if args.vocab_size > tokenizer.vocab_size:
            print0(f"note: the model has {args.vocab_size:,} ids and the tokenizer {tokenizer.vocab_size:,}: the "
                   "ids past the tokenizer's are trained never to appear and never decoded", dist=dist)
        if cfg.seq_len_warmup:
            # A graph for each of the warmup's lengths: one graph for all would make every full-length step slower.
            torch._dynamo.config.automatic_dynamic_shapes = False
        model = Transformer(args)
        init_residual_projections(model, cfg.init)
        model.document_eos = tokenizer.eos_id if cfg.document_mask else None
        print0(f"model {cfg.model}: {model.num_params() / 1e6:.2f}M parameters "
               f"({model.num_params(count_tied_twice=True) / 1e6:.2f}M counting the tied embedding twice"
               + (f", {model.num_active_params() / 1e6:.2f}M active a token" if args.n_experts else "") + "); "
               f"{data.n_tokens:,} training tokens in {len(data):,} windows of {args.max_seq_len}", dist=dist)
        flops_per_token = functools.cache(model.flops_per_token)  # by window length: a warmup's are shorter
        training = start_training(cfg, model, dist, len(data), cfg.batch_size,
                                  flops_per_token(args.max_seq_len), stage="pretrain",
                                  tokenizer_sha256=tokenizer.sha256)
        trainer, order = training.trainer, training.order
        if training.state is None and cfg.init_from:
            init, _ = load_model(cfg.init_from, model_args=args)
            trainer.raw_model.load_state_dict(init.state_dict())
            print0(f"initialised from {cfg.init_from}", dist=dist)

        def next_batches():
            length = window_length_at(trainer.step, cfg.seq_len_warmup, args.max_seq_len)
            training.flops_per_token = flops_per_token(length)
            batches = [tuple(t[:, :length].to(dist.device) for t in data.batch(order.next(cfg.batch_size)))
                       for _ in range(cfg.grad_accum)]
            return batches, sum(inputs.numel() for inputs, _ in batches)

        def validation() -> dict[str, float]:
            metrics = {"val_loss": validation_loss(trainer, len(val), val.batch, cfg.eval_batches, cfg.batch_size)}
            if corpus_chars:
                metrics["val_bpc"] = metrics["val_loss"] / math.log(2) / corpus_chars
            return metrics

        train_loop(training, next_batches, lambda m, batch: m(batch[0], batch[1])[1],
                   validation if val is not None else None)
        print0(f"checkpoint: {os.path.join(cfg.out_dir, 'ckpt.pt')}; plot: python plot.py {cfg.out_dir}", dist=dist)


if __name__ == "__main__":
    main(sys.argv[1:])
