"""A SentencePiece tokenizer with the ChatGLM2 special-token layout, independent of `transformers`.

The ChatGLM2 model file holds 64,789 pieces (unk 0, bos 1, eos 2, byte fallback 3-258); ChatGLM2
appends five special ids after them. A model we train ourselves has no such extras.
"""
from __future__ import annotations

import hashlib

import numpy as np
import sentencepiece as spm

CHATGLM_PIECES = 64789
CHATGLM_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]  # ids 64789..64793


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SPTokenizer:
    """encode/decode text, batch encode, and the ids every stage needs (bos, eos, pad)."""

    def __init__(self, model_file: str, chatglm_specials: bool | None = None):
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        n = self.sp.vocab_size()
        if chatglm_specials is None:  # the ChatGLM2 file is recognised by its piece count
            chatglm_specials = n == CHATGLM_PIECES
        self.special_tokens = {name: n + i for i, name in enumerate(CHATGLM_SPECIALS)} if chatglm_specials else {}
        self._special_ids = set(self.special_tokens.values())
        self.n_pieces = n
        self.vocab_size = n + len(self.special_tokens)
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id  # ChatGLM2 pads with unk
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.model_file)
        return self._sha256

    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text, with no bos/eos added (the stages add eos where the format says)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def encode_joined(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of all texts in one int32 array, and the (len(texts),) number of ids of each: no
        Python int is made per token (cheaper than encode_batch and a conversion)."""
        arrays = self.sp.encode(texts, num_threads=1, out_type="numpy")
        joined = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int32)
        return joined, np.array([len(a) for a in arrays], dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        """Text of ids, dropping bos/eos/pad and the special ids."""
        drop = self._special_ids | {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in drop])

    def id_to_piece(self, index: int) -> str:
        if index >= self.n_pieces:
            return CHATGLM_SPECIALS[index - self.n_pieces]
        return self.sp.id_to_piece(index)

    def piece_to_id(self, piece: str) -> int:
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        return self.sp.piece_to_id(piece)

    def encode_pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def decode_pieces(self, pieces: list[str]) -> str:
        return self.sp.decode_pieces([p for p in pieces if p not in self.special_tokens])
