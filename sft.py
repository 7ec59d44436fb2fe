"""Supervised fine-tuning: teach a pretrained model to answer, on sft_data/sft_data.csv.

    python sft.py                                          # full fine-tuning of out/pretrain/ckpt.pt
    python sft.py --lora=true --lora_rank=16 --out_dir=out/sft_lora
    torchrun --nproc_per_node=4 sft.py --init_from=out/baby_92m/ckpt.pt --tokenizer=chatglm_tokenizer/tokenizer.model

The loss counts only answer tokens (and the eos closing each answer); batches are padded to their
longest sample, and hold samples of similar length (--group_by_length) so that little is padding.
With --lora the adapters alone train; ckpt.pt keeps them apart (adapter.pt too) and every loader
(eval.py, chat.py, export) merges them into plain weights.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from babyllama.checkpoint import load_model_and_tokenizer, save_atomic
from babyllama.common import print0
from babyllama.configurator import Fraction, InputFile, OutputDir, Positive, PositiveFloat, SeqLen
from babyllama.lora import apply_lora, lora_state_dict
from babyllama.trainer import TrainConfig, start_training, train_loop, training_stage, validation_loss
from chatglm_tokenizer import OUR_TOKENIZER
from dataset_sft import SFTDataset


@dataclass
class Config(TrainConfig):
    init_from: InputFile = "out/pretrain/ckpt.pt"  # the pretrained model (our ckpt.pt or the seed's .pth)
    data: InputFile = "sft_data/sft_data.csv"  # prompt, answer, history
    val_data: InputFile = "sft_data/sft_val.csv"  # held-out samples for the validation loss ('' for none)
    tokenizer: InputFile = OUR_TOKENIZER  # the tokenizer the model was pretrained with
    out_dir: OutputDir = "out/sft"
    max_seq_len: SeqLen = 0  # 0: the model's
    batch_size: Positive = 16  # samples per micro-step in each process
    group_by_length: bool = True  # a micro-step's samples of similar length: less padding, faster steps
    epochs: PositiveFloat = 2.0  # passes over the data, when max_steps is 0
    lora: bool = False  # train low-rank adapters only
    lora_rank: Positive = 8
    lora_alpha: PositiveFloat = 16.0
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3"  # names of the linear layers that get adapters
    lora_dropout: Fraction = 0.0
    eval_interval: Positive = 100
    eval_batches: Positive = 20
    save_interval: Positive = 200


def lora_settings(cfg: Config) -> dict | None:
    if not cfg.lora:
        return None
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
            "targets": [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]}


def main(argv: list[str] | None = None) -> None:
    with training_stage(Config, argv, __doc__) as (cfg, dist):
        model, _, tokenizer = load_model_and_tokenizer(cfg.init_from, cfg.tokenizer)
        args = model.args
        max_seq_len = min(cfg.max_seq_len or args.max_seq_len, args.max_seq_len)
        data = SFTDataset(cfg.data, tokenizer, max_seq_len)
        val = SFTDataset(cfg.val_data, tokenizer, max_seq_len) if cfg.val_data else None
        lora = lora_settings(cfg)
        if lora:
            wrapped = apply_lora(model, **lora)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print0(f"LoRA rank {cfg.lora_rank} on {wrapped} layers: {trainable:,} trainable parameters", dist=dist)
        model.train()
        print0(f"SFT of {cfg.init_from}: {len(data):,} samples", dist=dist)
        training = start_training(cfg, model, dist, len(data), cfg.batch_size, model.flops_per_token(max_seq_len),
                                  stage="sft", tokenizer_sha256=tokenizer.sha256, expect={"lora": lora},
                                  lengths=data.lengths() if cfg.group_by_length else None)
        trainer, order = training.trainer, training.order

        def next_batches():
            batches = [data.batch(order.next(cfg.batch_size), tokenizer.pad_id) for _ in range(cfg.grad_accum)]
            tokens = sum(int((x != tokenizer.pad_id).sum()) for x, _ in batches)  # processed, padding excluded
            return [(x.to(dist.device), y.to(dist.device)) for x, y in batches], tokens

        def validation() -> dict[str, float]:
            return {"val_loss": validation_loss(trainer, len(val), lambda ids: val.batch(ids, tokenizer.pad_id),
                                                cfg.eval_batches, cfg.batch_size, shuffle=False)}

        train_loop(training, next_batches, lambda m, batch: m(batch[0], batch[1])[1], validation if val else None,
                   lambda: {"lora": lora})
        if lora and training.writes_checkpoints:
            save_atomic({"lora": lora, "adapters": lora_state_dict(model), "base": cfg.init_from},
                        os.path.join(cfg.out_dir, "adapter.pt"))
        print0(f"checkpoint: {os.path.join(cfg.out_dir, 'ckpt.pt')}; "
               f"try it: python chat.py --ckpt={cfg.out_dir}/ckpt.pt", dist=dist)


if __name__ == "__main__":
    main(sys.argv[1:])
