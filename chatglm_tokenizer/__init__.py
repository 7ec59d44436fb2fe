"""Tokenizers: one loader for the ChatGLM2 model file and for SentencePiece models we train."""
from __future__ import annotations

import os

from babyllama.chat_format import MARKERS
from babyllama.errors import UsageError

from .sp_tokenizer import SPTokenizer, file_sha256

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "tokenizer.model")  # ChatGLM2's file, where load_tokenizer() looks without a path
MIN_VOCAB = 3 + len(MARKERS) + 256  # ours: unk, bos, eos, the chat template's markers, the 256 byte pieces
OUR_TOKENIZER = "data/tokenizer/tokenizer.model"  # where train_tokenizer.py writes ours: the commands' default
WHERE_TO_GET = ("get the ChatGLM2-6B tokenizer.model from https://huggingface.co/THUDM/chatglm2-6b "
                "(file tokenizer.model) and put it at chatglm_tokenizer/tokenizer.model, pass its path, "
                "or train your own with train_tokenizer.py")

__all__ = ["SPTokenizer", "load_tokenizer", "resolve_tokenizer_path", "file_sha256", "DEFAULT_MODEL", "OUR_TOKENIZER",
           "MIN_VOCAB"]


class TokenizerNotFound(UsageError, FileNotFoundError):
    pass


def resolve_tokenizer_path(path: str | None = None) -> str:
    """The model file for a path (a .model file or a folder holding tokenizer.model), or the default."""
    path = path or DEFAULT_MODEL
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(path):
        raise TokenizerNotFound(f"tokenizer model {path} not found: {WHERE_TO_GET}")
    return path


def load_tokenizer(path: str | None = None) -> SPTokenizer:
    """The tokenizer at path (default chatglm_tokenizer/tokenizer.model); a file that is not a
    SentencePiece model is a one-line ValueError."""
    path = resolve_tokenizer_path(path)
    try:
        return SPTokenizer(path)
    except RuntimeError as e:  # sentencepiece: "could not parse ModelProto" and the like
        raise UsageError(f"{path} is not a SentencePiece tokenizer model ({str(e).strip()[:80]})") from None
