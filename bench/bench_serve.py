"""Serving throughput and latency: 8 clients at once against one at a time, through serve.py's HTTP API.

    python bench/bench_serve.py --tokenizer=../shared/chatglm_tokenizer/tokenizer.model --shapes=tiny,baby_92m
    python bench/bench_serve.py --ckpt=out/sft/ckpt.pt --tokenizer=data/tokenizer/tokenizer.model

For each model it starts serve.py (one process, --max_batch=16), then measures in the same run:
aggregate generated tokens/s when the same requests come one after another and when 8 clients send them
at once (--repeats pairs of the two, interleaved; the medians and each pair's ratio); the time to the first
token (a one-token answer, median of 5) when the server is idle and while 8 other clients are streaming long
answers. Greedy decoding, so both ways generate the same tokens. A shape
without --ckpt gets random weights (its answers never end early); the vocabulary is the tokenizer's.

With --constrained, it measures instead what constrained decoding costs: 8 clients at once, each answer
free or under a JSON schema (response_format, one string field of at least 2,000 characters: random weights
never end it early, so both ways decode the same number of rows and tokens), in
--repeats interleaved pairs; the time per generated token of the constrained runs against the free ones.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from babyllama.configurator import read_model_preset  # noqa: E402
from chatglm_tokenizer import load_tokenizer  # noqa: E402
from model import Transformer  # noqa: E402

QUESTIONS = ["成语“画蛇添足”是什么意思？", "“水”字是什么意思？", "请写一首关于秋天的诗。", "介绍一下长城。",
             "成语“守株待兔”是什么意思？", "“山”字是什么意思？", "怎样学好数学？", "北京有哪些名胜古迹？"]


class Server:
    def __init__(self, ckpt: str, tokenizer: str, extra: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={ckpt}",
                                      f"--tokenizer={tokenizer}", f"--port={self.port}", "--max_batch=16",
                                      "--max_tokens=4096", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                self.banner = self.proc.stdout.readline().strip()  # "serving ... (...; decoding threads: N)"
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"serve.py failed: {self.proc.stderr.read()[-2000:]}") from None
                time.sleep(0.5)
        raise SystemExit("serve.py did not start in 5 minutes")

    def ask(self, question: str, max_tokens: int, stream: bool = False, **extra) -> tuple[int, float, float]:
        """(completion tokens, seconds to the first streamed text, seconds in all); extra: more request fields."""
        began = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
                "stream": stream, **extra}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if not stream:
            reply = json.loads(response.read())
            return reply["usage"]["completion_tokens"], float("nan"), time.perf_counter() - began
        first, pieces = float("nan"), 0
        for line in response.fp:
            line = line.decode().strip()
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                pieces += 1
                if first != first:
                    first = time.perf_counter() - began
        conn.close()
        return pieces, first, time.perf_counter() - began

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def measure(server: Server, max_tokens: int, clients: int, repeats: int) -> dict:
    server.ask(QUESTIONS[0], 8)  # warm up
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(clients)]
    alone, together, ratios = [], [], []
    for _ in range(repeats):  # interleaved, so a slow spell of a shared machine hits both ways alike
        began = time.perf_counter()
        tokens = sum(server.ask(q, max_tokens)[0] for q in questions)
        alone.append(tokens / (time.perf_counter() - began))
        began = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            tokens = sum(n for n, _, _ in pool.map(lambda q: server.ask(q, max_tokens), questions))
        together.append(tokens / (time.perf_counter() - began))
        ratios.append(together[-1] / alone[-1])
    # The time to the first token: a one-token answer, whatever text that token makes.
    idle_ttft = statistics.median(server.ask(q, 1)[2] for q in QUESTIONS[:5])
    stop = threading.Event()

    def busy_client(q: str) -> None:
        while not stop.is_set():
            server.ask(q, max_tokens * 4, stream=True)
    with ThreadPoolExecutor(clients) as pool:
        for q in questions:
            pool.submit(busy_client, q)
        time.sleep(2.0)  # all of them decoding
        busy_ttft = statistics.median(server.ask(q, 1)[2] for q in QUESTIONS[:5])
        stop.set()
    return {"clients": clients, "tokens_per_s_alone": statistics.median(alone),
            "tokens_per_s_together": statistics.median(together), "throughput_ratio": statistics.median(ratios),
            "throughput_ratios": ratios,
            "ttft_idle_ms": idle_ttft * 1e3, "ttft_busy_ms": busy_ttft * 1e3, "ttft_ratio": busy_ttft / idle_ttft}


SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"answer": {"type": "string", "minLength": 2000}}, "required": ["answer"]}}}


def measure_constrained(server: Server, max_tokens: int, clients: int, repeats: int) -> dict:
    """Generated tokens/s of clients at once, free and under SCHEMA, in interleaved pairs."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(clients)]
    server.ask(QUESTIONS[0], 8, response_format=SCHEMA)  # warm up, the grammar engine's tokenizer included
    rates: dict[str, list[float]] = {"free": [], "constrained": []}
    for _ in range(repeats):
        for kind, extra in (("free", {}), ("constrained", {"response_format": SCHEMA})):
            began = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                tokens = sum(n for n, _, _ in pool.map(lambda q, e=extra: server.ask(q, max_tokens, **e), questions))
            rates[kind].append(tokens / (time.perf_counter() - began))
    ratios = [f / c for f, c in zip(rates["free"], rates["constrained"])]  # time per token, constrained / free
    return {"clients": clients, "tokens_per_s_free": statistics.median(rates["free"]),
            "tokens_per_s_constrained": statistics.median(rates["constrained"]),
            "time_per_token_ratio": statistics.median(ratios), "ratios": ratios}


def random_checkpoint(shape: str, vocab_size: int, folder: str) -> str:
    torch.manual_seed(0)
    args = read_model_preset(shape, vocab_size=vocab_size)
    path = os.path.join(folder, f"{shape}.pt")
    torch.save({"model": Transformer(args).state_dict(), "model_args": asdict(args)}, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="", help="a trained model (else random weights of --shapes)")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--shapes", default="tiny,baby_92m", help="presets given random weights when no --ckpt")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=128, help="tokens per answer in the throughput runs")
    parser.add_argument("--repeats", type=int, default=5, help="pairs of throughput runs (medians reported)")
    parser.add_argument("--serve_flags", default="", help="extra serve.py flags, e.g. --quantize=int8")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--constrained", action="store_true", help="measure constrained decoding's cost instead")
    args = parser.parse_args()
    if args.repeats < 1 or args.clients < 1 or args.max_tokens < 1:
        parser.error("--repeats, --clients and --max_tokens must be at least 1")
    if args.ckpt and not os.path.isfile(args.ckpt):
        parser.error(f"--ckpt={args.ckpt}: no such file")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        try:
            vocab = load_tokenizer(args.tokenizer).vocab_size
            models = [(args.ckpt, args.ckpt)] if args.ckpt else [
                (f"{s} (random weights, vocab {vocab})", random_checkpoint(s, vocab, folder))
                for s in args.shapes.split(",")]
        except (FileNotFoundError, ValueError) as e:  # a missing tokenizer, an unknown preset
            raise SystemExit(f"error: {e}") from None
        for name, ckpt in models:
            server = Server(ckpt, args.tokenizer, args.serve_flags.split())
            try:
                threads = server.banner.rsplit("decoding threads: ", 1)[-1].rstrip(")")
                run = measure_constrained if args.constrained else measure
                rows.append({"model": name, "server": threads,
                             **run(server, args.max_tokens, args.clients, args.repeats)})
            finally:
                server.close()
    machine = f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores"
    if args.constrained:
        print(f"| model | tokens/s, {args.clients} clients, free | under a JSON schema | time per token, constrained / "
              f"free | ratios of the {args.repeats} pairs |  ({machine})")
        for r in rows:
            print(f"| {r['model']} | {r['tokens_per_s_free']:.1f} | {r['tokens_per_s_constrained']:.1f} | "
                  f"{r['time_per_token_ratio']:.2f}x | {', '.join(f'{x:.2f}' for x in r['ratios'])} |")
    else:
        print_table(rows, args.clients, args.repeats, machine)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)


def print_table(rows: list[dict], clients: int, repeats: int, machine: str) -> None:
    print(f"| model | serve.py's decoding threads | tokens/s, 1 at a time | tokens/s, {clients} clients | ratio | "
          f"first token idle (ms) | first token, {clients} busy (ms) | ratio | ratios of the {repeats} pairs "
          f"|  ({machine})")
    for r in rows:
        print(f"| {r['model']} | {r['server']} | {r['tokens_per_s_alone']:.1f} | {r['tokens_per_s_together']:.1f} | "
              f"{r['throughput_ratio']:.2f}x | {r['ttft_idle_ms']:.0f} | {r['ttft_busy_ms']:.0f} | "
              f"{r['ttft_ratio']:.2f}x | {', '.join(f'{x:.2f}' for x in r['throughput_ratios'])} |")


if __name__ == "__main__":
    main()
