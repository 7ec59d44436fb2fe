"""An OpenAI-compatible HTTP server for a chat model, with a web chat page at /.

    python serve.py --ckpt=out/sft/ckpt.pt                    # http://127.0.0.1:8000
    python serve.py --host=0.0.0.0 --api_key=secret           # reachable from elsewhere, key required

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="baby-llama2", messages=[{"role": "user", "content": "你好"}])

Endpoints: GET /v1/models, POST /v1/chat/completions and /v1/completions (stream or not; temperature,
top_p, max_tokens, stop). Requests are answered one generation at a time, in arrival order. A bad
request gets a 4xx JSON error in OpenAI's shape and the server goes on serving.
"""
import asyncio
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from checkpoint import load_model_and_tokenizer
from common import pick_device
from configurator import Device, InputFile, Port, Positive, parse_config
from dataset_sft import chat_prompt_ids

PAGE = "serve_page.html"


@dataclass
class Config:
    ckpt: InputFile = "out/sft/ckpt.pt"
    tokenizer: InputFile = "data/tokenizer/tokenizer.model"
    host: str = "127.0.0.1"  # 0.0.0.0 to accept connections from other machines
    port: Port = 8000
    api_key: str = ""  # when set, requests need `Authorization: Bearer <key>`
    model_name: str = "baby-llama2"  # the id /v1/models reports
    max_tokens: Positive = 256  # default and upper bound of max_tokens
    device: Device = "auto"


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(400, f"'{name}' must be a number from {low} to {high}", name)
    return float(value)


def stop_list(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise RequestError(400, "'stop' must be a string or a list of strings", "stop")


def chat_turns(messages: Any) -> tuple[list[tuple[str, str]], str]:
    """(earlier user/assistant pairs, the last user message); a system message is put before the first
    user message (the model has no system role)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    system, history, pending = "", [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise RequestError(400, f"messages[{i}] needs a role (system, user, assistant) and a string content",
                               "messages")
        if m["role"] == "system":
            system += m["content"] + "\n"
        elif m["role"] == "user":
            pending = (system + m["content"]) if not history and pending is None else m["content"]
        elif pending is not None:
            history.append((pending, m["content"]))
            pending = None
    if pending is None:
        raise RequestError(400, "the last message must come from the user", "messages")
    return history, pending


class Generator:
    """The model behind a lock: one generation at a time, each streamed as text pieces."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model, _, self.tok = load_model_and_tokenizer(cfg.ckpt, cfg.tokenizer, pick_device(cfg.device))
        self.lock = threading.Lock()

    def stream(self, ids: list[int], max_tokens: int, temperature: float, top_p: float,
               stop: list[str]) -> Iterator[tuple[str, str | None]]:
        """(new text, finish reason or None) pieces; the last piece carries 'stop' or 'length'."""
        limit = self.model.args.max_seq_len
        if len(ids) >= limit:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; this model's context is {limit}",
                               "messages", "context_length_exceeded")
        max_tokens = min(max_tokens, limit - len(ids))
        out: list[int] = []
        shown = ""
        with self.lock:
            for step in self.model.generate_stream([ids], max_tokens, temperature=temperature, top_p=top_p,
                                                   eos_id=self.tok.eos_id):
                if step[0] is None or step[0] == self.tok.eos_id:
                    yield "", "stop"
                    return
                out.append(step[0])
                text = self.tok.decode(out)
                for s in stop:
                    if s in text:
                        yield text[len(shown):text.index(s)], "stop"
                        return
                if not text.endswith("\ufffd") and not any(text.endswith(s[:k]) for s in stop for k in
                                                           range(1, len(s))):
                    yield text[len(shown):], None
                    shown = text
        yield self.tok.decode(out)[len(shown):], "length"


def create_app(cfg: Config, generator: "Generator | None" = None):
    # No `from __future__ import annotations` in this file: FastAPI reads the `Request` annotations of
    # the handlers below at run time, and they name a class imported here.
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    app = FastAPI(title="baby-llama2-chinese")
    gen = generator or Generator(cfg)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError):
        return JSONResponse(error_body(e.message, param=e.param, code=e.code), status_code=e.status)

    def check_key(request: Request) -> None:
        if cfg.api_key and request.headers.get("authorization") != f"Bearer {cfg.api_key}":
            raise RequestError(401, "missing or wrong API key", code="invalid_api_key")

    async def json_body(request: Request) -> dict:
        check_key(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def settings(body: dict) -> dict:
        return {"max_tokens": int(number(body, "max_tokens", cfg.max_tokens, 1, cfg.max_tokens)),
                "temperature": number(body, "temperature", 1.0, 0.0, 2.0),
                "top_p": number(body, "top_p", 1.0, 0.0, 1.0), "stop": stop_list(body)}

    def respond(body: dict, ids: list[int], kind: str):
        params = settings(body)
        created, rid = int(time.time()), f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        pieces = gen.stream(ids, **params)
        first = next(pieces)  # errors (a prompt too long) surface here, before any byte is sent

        def chunk(text: str, finish: str | None) -> dict:
            if kind == "chat":
                choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                        "choices": [choice]}
            return {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

        if body.get("stream"):
            def events() -> Iterator[str]:
                if kind == "chat":
                    opening = chunk("", None)
                    opening["choices"][0]["delta"] = {"role": "assistant"}
                    yield f"data: {json.dumps(opening, ensure_ascii=False)}\n\n"
                for text, finish in [first, *pieces]:
                    yield f"data: {json.dumps(chunk(text, finish), ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        results = [first, *pieces]
        answer, finish = "".join(text for text, _ in results), results[-1][1]
        n_answer = len(gen.tok.encode(answer)) if answer else 0
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_answer, "total_tokens": len(ids) + n_answer}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                    "choices": [choice], "usage": usage}
        return {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                "choices": [{"index": 0, "text": answer, "finish_reason": finish, "logprobs": None}], "usage": usage}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "baby-llama2-chinese"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await json_body(request)
        history, question = chat_turns(body.get("messages"))
        ids = chat_prompt_ids(gen.tok, history, question, 10**9)
        return await asyncio.to_thread(respond, body, ids, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string", "prompt")
        return await asyncio.to_thread(respond, body, gen.tok.encode(prompt), "completion")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        import os
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), PAGE), encoding="utf-8") as f:
            return f.read()

    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    return app


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, argv, __doc__)
    try:
        app = create_app(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    listener = listen(cfg.host, cfg.port)
    import uvicorn
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"serving {cfg.ckpt} at http://{cfg.host}:{listener.getsockname()[1]} (OpenAI API under /v1)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (as uvicorn binds: address reuse on), or a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


if __name__ == "__main__":
    main(sys.argv[1:])
