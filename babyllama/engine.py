"""Continuous batching: one thread owns the model and decodes every active request in one batch.

A new request is prefilled at once, between two layers of the step that is running, and gets its first
token there; it takes a free row of the KV cache when that step ends. It leaves as soon as it ends (eos,
a stop string, its token limit) or its client goes away, freeing its row. Each keeps its own sampling
settings, and its own grammar when its answer is constrained (a mask on its row's logits). Requests
beyond max_batch wait in arrival order. At batch 1 decoding is bound by reading the weights, so a batch
of rows costs little more per step than one row: this is where serving many users at once gets its
throughput (BENCHMARKS.md).

    engine = Engine(model, tokenizer, max_batch=8)
    engine.submit(Request(ids, Sampling(max_tokens=64), emit=print))   # emit(Event) from the engine thread
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from babyllama.grammar import allowed_tokens
from model import KVCache, SlotKVCache, Transformer, keep_top_p

if TYPE_CHECKING:
    from babyllama.grammar import Constraint


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # strings that end the answer (not included)
    constraint: Constraint | None = None  # a grammar the answer must follow (grammar.py); one per request


@dataclass
class Event:
    """What a request's emit receives: text as soon as it is whole, then one final event with the reason
    ('stop', 'length', 'cancelled' or 'error') and the number of tokens generated."""
    text: str = ""
    finish: str | None = None
    tokens: int = 0


def failure(error: Exception, request: Request) -> Event:
    """The final event of a request that decoding failed on."""
    return Event(f"[server error: {type(error).__name__}: {error}]", "error", len(request.out))


class Request:
    def __init__(self, ids: list[int], sampling: Sampling, emit: Callable[[Event], None]):
        self.ids, self.sampling, self.emit = ids, sampling, emit
        self.out: list[int] = []  # tokens generated so far
        self.text = ""  # text emitted so far: that of out[:read]
        self.prefix = self.read = 0  # see Engine._pending
        self.cancelled = False

    def cancel(self) -> None:
        """Called from any thread (a client that went away): the engine frees the row at its next step."""
        self.cancelled = True


class Engine:
    def __init__(self, model: Transformer, tokenizer, max_batch: int = 8, seed: int = 0):
        self.model, self.tok = model, tokenizer
        device = model.freqs_cos.device
        self.cache = SlotKVCache(model.args, max_batch, model.args.max_seq_len, device,
                                 model.tok_embeddings.weight.dtype)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []  # active[row] is the request in that row of the cache
        self.joining: list[tuple[Request, KVCache]] = []  # prefilled, to take the next free rows
        self.wake = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="decode", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request; ValueError when its prompt leaves no room in the model's context."""
        limit = self.model.args.max_seq_len
        if not request.ids or len(request.ids) >= limit:
            raise ValueError(f"the prompt has {len(request.ids)} tokens; this model's context is {limit}")
        request.sampling.max_tokens = min(request.sampling.max_tokens, limit - len(request.ids))
        with self.wake:
            self.waiting.append(request)
            self.wake.notify()

    def _loop(self) -> None:
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.waiting or self.active)
            try:
                self._admit()
                if self.active:
                    self._step()
            except Exception as e:  # never leave a client waiting forever: end every request with the error
                for request in self.active + [r for r, _ in self.joining] + list(self.waiting):
                    request.emit(failure(e, request))
                self.active.clear()
                self.joining.clear()
                self.waiting.clear()
                self.cache.n = 0

    def _admit(self) -> None:
        """Prefill waiting requests into free rows, in arrival order."""
        self._prefill_waiting()
        self._join()

    @torch.inference_mode()
    def _prefill_waiting(self) -> None:
        """Prefill waiting requests (as many as rows are free) and give each its first token at once;
        those it does not end go to self.joining, to take a row when no step is running."""
        while self.waiting and len(self.active) + len(self.joining) < self.cache.slots:
            with self.wake:
                request = self.waiting.popleft()
            if request.cancelled:
                request.emit(Event(finish="cancelled"))
                continue
            try:
                prefill, finish = self._prefill(request)
            except Exception as e:  # taken off the queue, not yet in a row: answered here, the rest go on
                request.emit(failure(e, request))
                continue
            if finish:
                request.emit(Event(finish=finish, tokens=len(request.out)))
            else:
                self.joining.append((request, prefill))

    def _prefill(self, request: Request) -> tuple[KVCache, str | None]:
        """The request's prompt in a cache of its own, and its first token: (cache, finish reason)."""
        ids = request.ids
        prefill = KVCache(self.model.args, 1, len(ids), self.freqs_device, self.cache.k[0].dtype)
        hidden = self.model.hidden(torch.tensor([ids], device=self.freqs_device), cache=prefill)
        return prefill, self._extend(request, self._sample(self.model.next_token_logits(hidden[:, -1]), [request])[0])

    def _join(self) -> None:
        for request, prefill in self.joining:
            self.cache.add(prefill)
            self.active.append(request)
        self.joining.clear()

    @property
    def freqs_device(self) -> torch.device:
        return self.model.freqs_cos.device

    @torch.inference_mode()
    def _step(self) -> None:
        """One token for every active request. A request that arrives meanwhile is prefilled between two
        layers, so its first token need not wait for the step to end; it joins the batch after it."""
        self._drop([row for row, r in enumerate(self.active) if r.cancelled], "cancelled")
        if not self.active:
            return

        def between_layers() -> None:
            if self.waiting:
                self._prefill_waiting()
        last = torch.tensor([[r.out[-1]] for r in self.active], device=self.freqs_device)
        hidden = self.model.hidden(last, cache=self.cache, between_layers=between_layers)
        between_layers()
        logits = self.model.next_token_logits(hidden[:, -1])
        self._accept(list(self.active), self._sample(logits, self.active))
        self._join()

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """One token per row, each row with its request's temperature and top_p (0 temperature: greedy),
        among the tokens its grammar allows when it has one."""
        allowed = allowed_tokens([r.sampling.constraint for r in requests])
        if allowed is not None:
            logits.masked_fill_(~allowed[:, :logits.shape[-1]].to(logits.device), float("-inf"))
        greedy = logits.argmax(-1)
        temperature = torch.tensor([r.sampling.temperature for r in requests], device=logits.device)
        if not bool((temperature > 0).any()):
            return greedy.tolist()
        top_p = torch.tensor([r.sampling.top_p for r in requests], device=logits.device)
        scaled = keep_top_p(logits / temperature.clamp(min=1e-6)[:, None], top_p[:, None])
        sampled = torch.multinomial(scaled.softmax(-1), 1, generator=self.generator).squeeze(-1)
        return torch.where(temperature > 0, sampled, greedy).tolist()

    def _accept(self, requests: list[Request], tokens: list[int]) -> None:
        """Give each request its new token: emit the text it completes; end those that are done."""
        ended: dict[int, str] = {}
        for request, token in zip(requests, tokens):
            finish = self._extend(request, token)
            if finish:
                ended[self.active.index(request)] = finish
        for row in sorted(ended, reverse=True):  # from the last row: rows moved into freed ones are kept ones
            self._drop([row], ended[row])

    def _extend(self, request: Request, token: int) -> str | None:
        """Add token to the request's answer and emit what is new; the finish reason when it ends."""
        if token != self.tok.eos_id:
            request.out.append(token)
            if request.sampling.constraint is not None:
                request.sampling.constraint.take(token)
        pending = self._pending(request)
        if token == self.tok.eos_id:
            request.emit(Event(pending))
            return "stop"
        stops = request.sampling.stop
        seen = request.text + pending
        for s in stops:
            if s in seen[max(0, len(request.text) - len(s)):]:
                request.emit(Event(seen[len(request.text):seen.index(s, max(0, len(request.text) - len(s)))]))
                return "stop"
        if len(request.out) >= request.sampling.max_tokens:
            request.emit(Event(pending))
            return "length"
        # Hold back a character still missing bytes, and what may be the start of a stop string.
        if pending and not pending.endswith("\ufffd") and not any(
                seen.endswith(s[:k]) for s in stops for k in range(1, len(s))):
            request.emit(Event(pending))
            request.text += pending
            request.prefix, request.read = request.read, len(request.out)
        return None

    def _pending(self, request: Request) -> str:
        """The text of the tokens not emitted yet. Only the last few tokens are decoded (decoding the whole
        answer at every step would grow with its length): the text of out[prefix:] past that of
        out[prefix:read], where read is where the emitted text ends and prefix the token before it."""
        before = self.tok.decode(request.out[request.prefix:request.read])
        return self.tok.decode(request.out[request.prefix:])[len(before):]

    def _drop(self, rows: list[int], reason: str) -> None:
        for row in sorted(rows, reverse=True):
            request = self.active[row]
            self.cache.remove(row)
            self.active[row] = self.active[-1]
            self.active.pop()
            request.emit(Event(finish=reason, tokens=len(request.out)))
