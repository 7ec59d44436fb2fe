"""Constrained decoding: the tokens a grammar allows next, for tool calls and JSON answers (llguidance).

A request that must call a tool (tool_choice "required" or a named function) or answer in JSON
(response_format json_object / json_schema) gets a Constraint: before each token is sampled, every token
that cannot continue the grammar is masked out, so what it writes parses and validates whatever the
weights. The masks are computed per row of the batch, each request with its own grammar (engine.py).
"""
from __future__ import annotations

import functools
import json

import numpy as np
import torch

from babyllama.chat_format import CALL, END_CALL, END_THINK, function_of
from babyllama.common import require

ASKED_BY = "constrained decoding (tool_choice, response_format)"


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot build a matcher from."""


def llguidance():
    return require("llguidance", ASKED_BY)


@functools.cache
def guidance_tokenizer(tok):
    """llguidance's view of our SentencePiece tokenizer: each id's bytes (a piece's '▁' is a space, byte
    pieces their byte, control and extra ids special). A model's rows past these ids are masked apart."""
    lib = llguidance()
    sp = tok.sp
    pieces, special = [], []
    for i in range(tok.vocab_size):
        if i >= tok.n_pieces or sp.is_control(i) or sp.is_unknown(i):
            pieces.append(b"\xff" + (sp.id_to_piece(i) if i < tok.n_pieces else f"<extra{i}>").encode())
            special.append(i)
        elif sp.is_byte(i):
            pieces.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
        else:
            pieces.append(sp.id_to_piece(i).replace("\u2581", " ").encode())
    source = _Pieces(pieces, special, tok.bos_id, tok.eos_id, tok.encode)
    dummy_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
    if dummy_prefix:  # encode() would add a space in front: tokenize text inside an answer greedily instead
        greedy = lib.LLTokenizer(lib.TokenizerWrapper(source), eos_token=tok.eos_id)
        source.encode = greedy.greedy_tokenize
    return lib.LLTokenizer(lib.TokenizerWrapper(source), eos_token=tok.eos_id)


class _Pieces:
    """What llguidance.TokenizerWrapper reads: the pieces' bytes, special ids, bos, eos and a tokenize call."""

    def __init__(self, tokens: list[bytes], special: list[int], bos: int, eos: int, encode):
        self.tokens, self.special_token_ids, self.bos_token_id, self.eos_token_id = tokens, special, bos, eos
        self.encode = encode

    def __call__(self, text: str | bytes) -> list[int]:
        return list(self.encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text))


# JSON written as json.dumps writes it (and as the chat template and the training data do): no free whitespace
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_rule(schema: dict) -> str:
    return "%json" + json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


def think_rule(reasoning: bool) -> str:
    """With reasoning (the answer opened by the think marker): a text without '<', then the closing marker."""
    return f'/[^<]*/ {json.dumps(END_THINK)} ' if reasoning else ""


def tool_calls_grammar(tools: list[dict], reasoning: bool = False) -> str:
    """Lark: one call block, a call of one of the tools with arguments valid for its parameters, after the
    reasoning when there is some. One call, not several: a model that would go on calling ends there, and
    the client answers it."""
    functions = [function_of(t) for t in tools]
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                               "arguments": f.get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return (f"start: {think_rule(reasoning)}call\n"
            f"call: {json.dumps(CALL)} {json_rule(schema)} {json.dumps(END_CALL)}\n")


def json_grammar(schema: dict, reasoning: bool = False) -> str:
    return f"start: {think_rule(reasoning)}answer\nanswer: {json_rule(schema)}\n"


class Constraint:
    """One request's grammar: which tokens may come next, and the tokens it has taken."""

    def __init__(self, tok, vocab_size: int, grammar: str):
        lib = llguidance()
        self.tokenizer = guidance_tokenizer(tok)
        error = lib.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(error.splitlines()[0])
        self.matcher = lib.LLMatcher(self.tokenizer, grammar, log_level=0)
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """A bool per token id: may it come next (eos only once the grammar is complete)."""
        return allowed_tokens([self])[0]

    def take(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(self.matcher.get_error().splitlines()[0])


def allowed_tokens(constraints: list[Constraint | None]) -> torch.Tensor | None:
    """(rows, vocab) bools: the tokens each row's grammar allows next; a row without a constraint allows every
    token. None when no row has a constraint."""
    rows = [(c.matcher, i) for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return None
    first = next(c for c in constraints if c is not None)
    known, vocab_size = first.tokenizer.vocab_size, first.vocab_size
    words = (known + 31) // 32
    bits = torch.full((len(constraints), words), -1, dtype=torch.int32)
    for matcher, row in rows:  # in this thread: on few cores a pool's hand-offs cost more than the masks
        matcher.unsafe_compute_mask_ptr(bits[row].data_ptr(), words * 4)
    unpacked = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")  # token i is bit i
    allowed = torch.ones(len(constraints), vocab_size, dtype=torch.bool)
    allowed[:, :known] = torch.from_numpy(unpacked[:, :known].view(np.bool_))
    for row, c in enumerate(constraints):
        if c is not None:
            allowed[row, known:] = False  # ids past the tokenizer's are padding of the model's rows
    return allowed
