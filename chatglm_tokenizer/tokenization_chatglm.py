"""The ChatGLM2 tokenizer as a Hugging Face `PreTrainedTokenizer`, for current `transformers`.

Load it with `AutoTokenizer.from_pretrained(folder, trust_remote_code=True)` from a folder holding
this file, sp_tokenizer.py, tokenizer_config.json and tokenizer.model. The seed's class broke after
transformers 4.33 because it built its SentencePiece model after `super().__init__`, which already asks
for the vocabulary; here the model is built first.
"""
from __future__ import annotations

import os
import shutil

from transformers import PreTrainedTokenizer

from .sp_tokenizer import SPTokenizer


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, padding_side: str = "left", **kwargs):
        self.sp_tokenizer = SPTokenizer(vocab_file)
        self.vocab_file = vocab_file
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("bos_token", "<s>")
        kwargs.setdefault("eos_token", "</s>")
        kwargs.setdefault("pad_token", "<unk>")
        super().__init__(padding_side=padding_side, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp_tokenizer.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {self.sp_tokenizer.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_tokenizer.encode_pieces(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_tokenizer.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_tokenizer.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_tokenizer.decode_pieces(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        # Our models are trained on plain text ids (no [gMASK]/sop prefix), as the seed's were.
        return token_ids_0 + (token_ids_1 or [])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        target = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
