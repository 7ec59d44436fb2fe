"""Checkpoints: written atomically (a temp file, then a rename), the newest few kept; loaded whether
they are our ckpt.pt (model + model_args + training state) or the seed's raw state_dict .pth, with the
model's shape read from the file and every mismatch named."""
from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch

from babyllama.common import pick_device
from babyllama.configurator import Device, InputFile, NonNegativeFloat, SeqLen, one_of
from babyllama.errors import UsageError
from chatglm_tokenizer import OUR_TOKENIZER, SPTokenizer, load_tokenizer
from model import ROPE_SCALINGS, ModelArgs, Transformer


class CheckpointError(UsageError):
    """A checkpoint that does not fit the model; the message says which key and why."""


def clean_state_dict(state: dict) -> dict:
    """Strip the `_orig_mod.` prefix torch.compile adds (the seed's .pth files have it)."""
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def load_state_dict_strict(model: Transformer, state: dict, source: str = "checkpoint") -> None:
    state = clean_state_dict(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing keys {missing[:8]}"
                              f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                              f"{'...' if len(unexpected) > 8 else ''}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{source}: key {key} has shape {tuple(value.shape)} "
                                  f"but the model expects {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True)


def model_args_from_state_dict(state: dict, n_heads: int = 8, **overrides) -> ModelArgs:
    """Infer the shape of a raw state_dict (the seed's .pth); the head count cannot be read off
    the weights, so it is given (all the seed's models use 8)."""
    state = clean_state_dict(state)
    missing = [k for k in ("tok_embeddings.weight", "layers.0.attention.wk.weight", "layers.0.feed_forward.w1.weight")
               if k not in state]
    if missing:
        raise CheckpointError(f"not a Llama2 state_dict of this project or the seed: no {missing[0]}")
    vocab_size, dim = state["tok_embeddings.weight"].shape
    n_layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    head_dim = dim // n_heads
    args = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab_size,
                n_kv_heads=state["layers.0.attention.wk.weight"].shape[0] // head_dim,
                hidden_dim=state["layers.0.feed_forward.w1.weight"].shape[0],
                tie_embeddings="output.weight" not in state or torch.equal(state["output.weight"],
                                                                           state["tok_embeddings.weight"]),
                qk_norm="layers.0.attention.q_norm.weight" in state,
                value_embeddings=sum(k.endswith("attention.value_embedding.weight") for k in state),
                bigram_buckets=len(state["bigram_embeddings.weight"]) if "bigram_embeddings.weight" in state else 0,
                x0_scalars="layers.0.x0_lambdas" in state,
                feed_forward="swiglu" if "layers.0.feed_forward.w3.weight" in state else "relu2")
    args.update(overrides)
    return ModelArgs(**args)


def read_checkpoint(path: str, mmap: bool = False) -> object:
    """torch.load of a checkpoint file, with a one-line error for a path that is missing, a directory, or
    a file that is not a PyTorch checkpoint (empty, truncated by an interrupted copy, another format).
    mmap: the tensors stay on disk until used (a cheap look at the other entries)."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; expected a checkpoint file (ckpt.pt or a .pth)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # torch.load fails in many ways on a bad file (zip, pickle, EOF, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (empty, truncated or another kind of "
                              f"file?): {reason}") from None


def load_model(path: str, device: str | torch.device = "cpu", model_args: ModelArgs | None = None,
               context: ContextSettings | None = None, **arg_overrides) -> tuple[Transformer, dict]:
    """Load our ckpt.pt (model + model_args + training state) or a raw state_dict .pth, reading as far
    as context says (RoPE tables are not weights: any window loads).

    Returns the model in eval mode and the checkpoint dict (empty apart from 'model' for a raw .pth)."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict or a state_dict, got {type(ckpt).__name__}")
    if "model" in ckpt and isinstance(ckpt["model"], dict):
        state = ckpt["model"]
        if model_args is None:
            if "model_args" not in ckpt:
                raise CheckpointError(f"{path}: has 'model' but no 'model_args'; pass model_args")
            model_args = ModelArgs(**{**ckpt["model_args"], **arg_overrides})
    else:
        state, ckpt = ckpt, {}
        if model_args is None:
            try:
                model_args = model_args_from_state_dict(state, **arg_overrides)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
    if context is not None:
        model_args = context.applied(model_args)
    model = Transformer(model_args)
    if ckpt.get("lora"):  # an SFT run with adapters: rebuild them, load, and merge them in
        from babyllama.lora import apply_lora, merge_lora
        apply_lora(model, **ckpt["lora"])
        model.load_state_dict(clean_state_dict(state), strict=True)
        merge_lora(model)
    else:
        load_state_dict_strict(model, state, source=path)
    return model.to(device).eval(), ckpt


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temp file, then rename: a crash mid-write never replaces a good file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(out_dir: str, state: dict, step: int, keep_last: int) -> str:
    """Write ckpt_<step>.pt, point ckpt.pt at it (a hard link, renamed into place) and keep only the
    newest keep_last numbered files. Returns the path of ckpt.pt."""
    os.makedirs(out_dir, exist_ok=True)
    numbered = os.path.join(out_dir, f"ckpt_{step:07d}.pt")
    save_atomic(state, numbered)
    latest = os.path.join(out_dir, "ckpt.pt")
    link_tmp = latest + ".link"
    if os.path.exists(link_tmp):
        os.remove(link_tmp)
    try:
        os.link(numbered, link_tmp)
    except OSError:  # file systems without hard links: a second write
        save_atomic(state, link_tmp)
    os.replace(link_tmp, latest)
    for old in sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))[:-keep_last or None]:
        os.remove(old)
    return latest


def load_model_and_tokenizer(path: str, tokenizer_path: str, device: str | torch.device = "cpu",
                             quantize: str = "", context: ContextSettings | None = None,
                             ) -> tuple[Transformer, dict, SPTokenizer]:
    """A checkpoint's model (as load_model) and the tokenizer to read it with, refused together when
    they do not belong together: the checkpoint records another tokenizer's sha256, or the tokenizer
    has more pieces than the model has ids (its ids would index past the embedding). The model decodes
    only the tokenizer's ids. quantize="int8" gives the model int8 weights (quantize.py; for inference)."""
    tokenizer = load_tokenizer(tokenizer_path)
    model, ckpt = load_model(path, device, context=context)
    if ckpt.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        raise ValueError(f"{path} was trained with another tokenizer than {tokenizer_path}")
    if tokenizer.n_pieces > model.args.vocab_size:
        raise ValueError(f"{tokenizer_path} has {tokenizer.n_pieces:,} pieces but the model in {path} has "
                         f"{model.args.vocab_size:,} ids: they do not belong together")
    model.limit_vocab(tokenizer.vocab_size)
    if quantize == "int8":
        from babyllama.quantize import KERNEL_WIDTH, quantize_int8
        left_float = quantize_int8(model)
        if left_float:
            print(f"note: --quantize=int8 leaves {len(left_float)} layers float ({', '.join(left_float[:3])}"
                  f"{', ...' if len(left_float) > 3 else ''}): the int8 kernel needs input widths that are "
                  f"multiples of {KERNEL_WIDTH}", file=sys.stderr)
    return model, ckpt, tokenizer


@dataclass
class ContextSettings:
    """How far a model reads: the window it was trained with, or a longer one with its RoPE scaled
    (docs/11_long_context.md)."""
    max_seq_len: SeqLen = 0  # 0: the window the model was trained with
    rope_scaling: one_of("", "none", *ROPE_SCALINGS[1:]) = ""  # '': the model's own; none: unscaled
    rope_factor: NonNegativeFloat = 0.0  # 0: max_seq_len / the length the positions were trained at

    def applied(self, args: ModelArgs) -> ModelArgs:
        """args reading max_seq_len tokens with this scaling; the factor, unless given, stretches the
        trained length to the window."""
        trained = args.trained_len
        length = self.max_seq_len or args.max_seq_len
        scaling = {"": args.rope_scaling, "none": ""}.get(self.rope_scaling, self.rope_scaling)
        if not scaling:
            return replace(args, max_seq_len=length, rope_scaling="", rope_factor=1.0, rope_original_len=0)
        return replace(args, max_seq_len=length, rope_scaling=scaling,
                       rope_factor=self.rope_factor or max(1.0, length / trained), rope_original_len=trained)


@dataclass
class ModelSettings(ContextSettings):
    """The settings of every command that runs a trained model (chat, serve, the evaluations): a
    command's Config inherits them and may give ckpt another default."""
    ckpt: InputFile = "out/sft/ckpt.pt"  # our ckpt.pt or the seed's .pth
    tokenizer: InputFile = OUR_TOKENIZER  # the tokenizer the model was trained with
    device: Device = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1...
    quantize: one_of("", "int8") = ""  # int8: int8 weights (babyllama/quantize.py), faster decoding on a CPU


def read_as_trained(model: Transformer, checkpoint: dict, eos_id: int) -> bool:
    """Attention kept inside each document when the checkpoint's run trained so (--document_mask), so that a
    window of several documents is read as training read it; True when it is."""
    model.document_eos = eos_id if checkpoint.get("config", {}).get("document_mask") else None
    return model.document_eos is not None


def load_for_inference(settings: ModelSettings) -> tuple[Transformer, dict, SPTokenizer]:
    """The model of settings.ckpt on its device (quantized if asked), its checkpoint and its tokenizer."""
    return load_model_and_tokenizer(settings.ckpt, settings.tokenizer, pick_device(settings.device),
                                    settings.quantize, context=settings)
