"""Continuous batching (engine.py): requests that join and leave a running batch get exactly what they
would get alone; a cancelled request frees its row; each row samples with its own settings."""
import queue
import threading
import time

import pytest
import torch

from babyllama.engine import Engine, Event, Request, Sampling
from model import KVCache, ModelArgs, SlotKVCache, Transformer


class Tok:
    """The part of a tokenizer the engine uses: eos and decode (one character per id)."""
    eos_id = 2

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(0x4E00 + i) for i in ids)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=96, multiple_of=16)
    m = Transformer(args).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)  # peaked logits: greedy choices far from ties
    return m


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 300, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def collect(engine: Engine, ids: list[int], sampling: Sampling) -> tuple[Request, queue.Queue]:
    events: queue.Queue = queue.Queue()
    request = Request(ids, sampling, events.put)
    engine.submit(request)
    return request, events


def wait_end(events: queue.Queue, timeout: float = 60) -> tuple[str, Event]:
    text = ""
    while True:
        event = events.get(timeout=timeout)
        text += event.text
        if event.finish:
            return text, event


def test_slot_cache_step_equals_separate_caches(model):
    """Rows of different lengths decoded in one step give the logits each gets with its own cache."""
    seqs = [ids + [7] for ids in prompts(4)]  # two tokens at least
    slots = SlotKVCache(model.args, 4, model.args.max_seq_len, "cpu", torch.float32)
    alone = []
    with torch.no_grad():
        for ids in seqs:
            cache = KVCache(model.args, 1, len(ids), "cpu", torch.float32)
            model.hidden(torch.tensor([ids[:-1]]), cache=cache)
            slots.add(cache)
            alone.append(model(torch.tensor([ids[-1:]]), cache=cache)[0][0, -1])
        together = model(torch.tensor([[ids[-1]] for ids in seqs]), cache=slots)[0][:, -1]
        assert torch.allclose(together, torch.stack(alone), atol=1e-5)
        slots.remove(1)  # the last row moves into row 1
        again = model(torch.tensor([[5]] * 3), cache=slots)[0][:, -1]
    assert slots.lengths[:3].tolist() == [len(seqs[0]) + 1, len(seqs[3]) + 1, len(seqs[2]) + 1]
    for row, ids in zip(range(3), (seqs[0], seqs[3], seqs[2])):
        with torch.no_grad():
            want = model(torch.tensor([ids + [5]]))[0][0, -1]
        assert torch.allclose(again[row], want, atol=1e-4)


def test_requests_that_join_and_leave_get_what_they_get_alone(model):
    engine = Engine(model, Tok(), max_batch=4)
    seqs = prompts(10)
    lengths = [5 + 7 * (i % 4) for i in range(10)]  # different answer lengths: rows leave at different steps
    expected = [model.generate([ids], n, eos_id=None)[0] for ids, n in zip(seqs, lengths)]
    waiting = []
    for i, (ids, n) in enumerate(zip(seqs, lengths)):
        waiting.append(collect(engine, ids, Sampling(max_tokens=n)))
        if i % 3 == 0:
            time.sleep(0.01)  # some join a batch already running
    for (request, events), want in zip(waiting, expected):
        text, end = wait_end(events)
        assert request.out == want and end.finish == "length" and end.tokens == len(want)
        assert text == Tok().decode(want)  # the streamed pieces spell the whole answer
    assert not engine.active and not engine.waiting and engine.cache.n == 0


def test_a_request_arriving_mid_step_gets_its_first_token_before_the_step_ends(model, monkeypatch):
    """It is prefilled between two layers of the running step (its time to the first token does not
    include the rest of the step), then joins the batch and gets what it gets alone."""
    engine = Engine(model, Tok(), max_batch=2)
    order: list[tuple[str, Event | None]] = []
    first_ids, second_ids = prompts(2)
    first = Request(first_ids, Sampling(max_tokens=12), lambda e: order.append(("first", e)))
    second = Request(second_ids, Sampling(max_tokens=5), lambda e: order.append(("second", e)))
    layer = model.layers[0]
    forward = layer.forward

    def arrives_during_a_step(x, *rest):
        if x.shape[1] == 1 and len(first.out) == 4 and not any(who == "step" for who, _ in order):
            order.append(("step", None))
            engine.submit(second)
        return forward(x, *rest)
    monkeypatch.setattr(layer, "forward", arrives_during_a_step)
    engine.submit(first)
    deadline = time.time() + 60
    while sum(1 for _, e in order if e is not None and e.finish) < 2 and time.time() < deadline:
        time.sleep(0.01)
    marker = [who for who, _ in order].index("step")
    assert order[marker + 1][0] == "second" and order[marker + 1][1].text  # before the step's own token
    assert first.out == model.generate([first_ids], 12, eos_id=None)[0]
    assert second.out == model.generate([second_ids], 5, eos_id=None)[0]
    assert not engine.active and not engine.joining and engine.cache.n == 0


def test_a_cancelled_request_frees_its_row(model):
    engine = Engine(model, Tok(), max_batch=1)
    first, first_events = collect(engine, [5, 6, 7], Sampling(max_tokens=90))
    second, second_events = collect(engine, [8, 9], Sampling(max_tokens=3))
    assert first_events.get(timeout=30).text  # the first is running, the second waits for its row
    first.cancel()
    assert wait_end(first_events)[1].finish == "cancelled"
    assert wait_end(second_events, timeout=10)[1].finish == "length" and len(second.out) == 3


def test_stop_strings_end_the_answer_and_are_not_shown(model):
    engine = Engine(model, Tok(), max_batch=2)
    ids = prompts(1)[0]
    full = model.generate([ids], 20, eos_id=None)[0]
    stop = Tok().decode(full[5:7])
    text, end = wait_end(collect(engine, ids, Sampling(max_tokens=20, stop=[stop]))[1])
    whole = Tok().decode(full)
    assert end.finish == "stop" and text == whole[:whole.index(stop)]


def test_each_row_samples_with_its_own_settings(model):
    engine = Engine(model, Tok(), max_batch=4, seed=0)
    ids = prompts(1)[0]
    greedy = model.generate([ids], 30, eos_id=None)[0]
    jobs = [collect(engine, ids, Sampling(max_tokens=30, temperature=t)) for t in (0.0, 2.0, 0.0, 2.0)]
    outs = []
    for request, events in jobs:
        wait_end(events)
        outs.append(request.out)
    assert outs[0] == outs[2] == greedy  # greedy rows are greedy beside sampling ones
    assert outs[1] != greedy and outs[3] != greedy and outs[1] != outs[3]


def test_a_request_that_fails_is_answered_with_the_error_and_the_others_go_on(model, monkeypatch):
    """Whatever stage it fails in (its prefill, or a step of the batch), no request is left waiting."""
    engine = Engine(model, Tok(), max_batch=2)
    sample = engine._sample

    def failing(logits, requests):
        if any(r.sampling.temperature == 1.5 for r in requests):
            raise RuntimeError("sampling failed")
        return sample(logits, requests)
    monkeypatch.setattr(engine, "_sample", failing)
    ids = prompts(1)[0]
    bad, bad_events = collect(engine, ids, Sampling(max_tokens=8, temperature=1.5))
    assert wait_end(bad_events, timeout=10)[1].finish == "error"
    good, good_events = collect(engine, ids, Sampling(max_tokens=8))
    assert wait_end(good_events, timeout=10)[1].finish == "length" and len(good.out) == 8
    assert not engine.active and not engine.joining and not engine.waiting


def test_a_long_prompt_is_refused_at_submit(model):
    engine = Engine(model, Tok(), max_batch=1)
    with pytest.raises(ValueError, match="context"):
        engine.submit(Request([3] * 96, Sampling(max_tokens=4), lambda e: None))
    done = threading.Event()
    engine.submit(Request([3] * 95, Sampling(max_tokens=4), lambda e: done.set() if e.finish else None))
    assert done.wait(10)  # one token of room: still answered


class ByteTok:
    """Byte-level pieces, as sentencepiece's byte fallback makes them: id b is the byte b, so a Chinese
    character takes three ids and a window that ends inside one decodes to U+FFFD."""
    eos_id = 256

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_streamed_text_is_whole_characters_that_spell_the_answer(model):
    """Each emitted piece is whole characters (none cut inside its bytes), and the pieces of a long answer,
    each decoded from its last few tokens, spell exactly the decoding of all its tokens."""
    engine = Engine(model, ByteTok(), max_batch=1)
    answer = "小模型也能说完整的话。Hello, 世界!" * 3
    pieces: list[str] = []
    request = Request([1], Sampling(max_tokens=1000, stop=["不会出现"]), lambda e: pieces.append(e.text))
    for byte in answer.encode():
        assert engine._extend(request, byte) is None
    assert engine._extend(request, ByteTok.eos_id) == "stop"
    assert "".join(pieces) == answer and not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > len(answer) // 2  # streamed as it came, not all at the end
