"""An OpenAI-compatible HTTP server for a chat model, with a web chat page at /.

    python serve.py --ckpt=out/sft/ckpt.pt                    # http://127.0.0.1:8000
    python serve.py --host=0.0.0.0 --api_key=secret           # reachable from elsewhere, key required

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="baby-llama2", messages=[{"role": "user", "content": "你好"}])

Endpoints: GET /v1/models and /v1/models/{id}, POST /v1/chat/completions and /v1/completions (stream or not,
with usage when stream_options asks; temperature, top_p, max_tokens or max_completion_tokens, stop, n; content
as a string or text parts). Chat takes tools, tool_choice (none, auto, required, a named function), tool
messages, response_format (json_object, json_schema) and reasoning_effort ('none' turns reasoning off), and
returns tool_calls and reasoning_content (docs/13_tools.md); a forced call or a JSON answer is decoded under
a grammar, so it parses and validates. GET /v1/tools lists the built-in tools (tools.py) and POST /v1/tools/run
runs one ({"name", "arguments"} -> {"content"}, with a time limit): the web page offers them and runs the calls
the model makes, showing each beside its result. Requests are decoded together (continuous batching, engine.py): up to
--max_batch at once, each streamed token by token; more wait in arrival order. A client that goes away
frees its place at once. A bad request gets a 4xx JSON error in OpenAI's shape.
"""
import asyncio
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from babyllama.chat_format import Answer, AnswerStream, conversation, reasoning_prefix
from babyllama.checkpoint import ModelSettings, load_for_inference
from babyllama.configurator import NonNegative, Port, Positive, parse_config
from babyllama.engine import Engine, Event, Sampling
from babyllama.engine import Request as EngineRequest
from babyllama.errors import UsageError, one_line_errors
from babyllama.grammar import Constraint, GrammarError, json_grammar, tool_calls_grammar
from babyllama.tools import BUILTIN, run_tool
from dataset_sft import chat_prompt_ids

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "babyllama", "serve_page.html")


@dataclass
class Config(ModelSettings):
    host: str = "127.0.0.1"  # 0.0.0.0 to accept connections from other machines
    port: Port = 8000
    api_key: str = ""  # when set, requests need `Authorization: Bearer <key>`
    model_name: str = "baby-llama2"  # the id /v1/models reports
    max_tokens: Positive = 256  # default and upper bound of max_tokens
    max_batch: Positive = 8  # requests decoded together; more wait in arrival order
    seed: int = 0  # of the sampling generator
    threads: NonNegative = 0  # torch's threads for decoding; 0: all but one, left to the HTTP side (BENCHMARKS.md)


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


def unicode_of(value: str, name: str) -> str:
    """value, unless it holds what UTF-8 cannot encode (a lone surrogate from a JSON escape): then 400."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, f"'{name}' is not valid Unicode (a lone surrogate?)", name) from None
    return value


def text_of(content: Any, i: int) -> str:
    """A message's content: a string, or a list of parts of which only text ones are read by this model."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise RequestError(400, f"messages[{i}].content: this model reads text parts only "
                                    '({"type": "text", "text": "..."})', "messages")
        return "".join(p["text"] for p in content)
    raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")


ROLES = ("system", "user", "assistant", "tool")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


def chat_messages(messages: Any) -> list[dict]:
    """The messages with their content as text (an assistant's may be empty beside its tool_calls)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(400, f"messages[{i}] needs a role ({', '.join(ROLES)}) and a content", "messages")
        content = m.get("content")
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            content = ""
        content = unicode_of(text_of(content, i), f"messages[{i}].content")
        checked.append({**m, "content": content})
    return checked


def offered_tools(body: dict) -> list[dict]:
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) and isinstance(t["function"].get("parameters", {}), dict)
            for t in tools):
        raise RequestError(400, "'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\": ..., "
                                "\"parameters\": {...}}}", "tools")
    return tools


def chosen_tools(body: dict, tools: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the tools the prompt offers, the tools an answer must call: empty when it may answer in text)."""
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return [], []
    if choice in ("auto", "required"):
        if not tools:
            raise RequestError(400, f"tool_choice '{choice}' needs 'tools'", "tool_choice")
        return tools, tools if choice == "required" else []
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise RequestError(400, "'tool_choice' must be none, auto, required or {\"type\": \"function\", "
                                "\"function\": {\"name\": NAME}} naming one of 'tools'", "tool_choice")
    return tools, named


def reasoning_wanted(body: dict) -> bool | None:
    """reasoning_effort: 'none' turns reasoning off, the others on; absent, the model decides."""
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if effort not in REASONING_EFFORTS:
        raise RequestError(400, f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}",
                           "reasoning_effort")
    return effort != "none"


def answer_schema(body: dict) -> dict | None:
    """The JSON schema response_format asks the answer to follow (json_object: any object), or None."""
    fmt = body.get("response_format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"type": "object"}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict) \
            and isinstance(fmt["json_schema"].get("schema", {}), dict):
        return fmt["json_schema"].get("schema") or {"type": "object"}
    raise RequestError(400, "'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                            "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                       "response_format")


@dataclass
class ChatPlan:
    """How a chat request is answered: the prompt's ids, what the answer starts with, whether calls are
    parsed out of it, whether reasoning is shown, and the grammar it must follow (None: free text) with the
    request field its schemas came from."""
    ids: list[int]
    prefix: str
    calls: bool
    show_reasoning: bool
    grammar: str | None
    grammar_from: str = ""


def chat_plan(body: dict, tok) -> ChatPlan:
    messages, tools = chat_messages(body.get("messages")), offered_tools(body)
    offered, forced = chosen_tools(body, tools)
    reasoning, schema = reasoning_wanted(body), answer_schema(body)
    try:
        turns, prompt = conversation(messages, offered)
    except ValueError as e:
        raise RequestError(400, str(e), "messages") from None
    prefix = reasoning_prefix(reasoning)
    ids = chat_prompt_ids(tok, turns, prompt, 10**9) + (tok.encode(prefix) if prefix else [])
    if forced:
        grammar, grammar_from = tool_calls_grammar(forced, reasoning is True), "tools"
    elif schema is not None:
        grammar, grammar_from = json_grammar(schema, reasoning is True), "response_format"
    else:
        grammar, grammar_from = None, ""
    return ChatPlan(ids, prefix, bool(offered), reasoning is not False, grammar, grammar_from)


class Server:
    """The model, its tokenizer and the engine that decodes every request."""

    def __init__(self, cfg: Config):
        self.model, _, self.tok = load_for_inference(cfg)
        self.engine = Engine(self.model, self.tok, cfg.max_batch, seed=cfg.seed)


def create_app(cfg: Config, server: "Server | None" = None):
    # No `from __future__ import annotations` in this file: FastAPI reads the `Request` annotations of
    # the handlers below at run time, and they name a class imported here.
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="baby-llama2-chinese")
    served = server or Server(cfg)

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
        except ClientDisconnect:  # the client hung up before sending the whole body: nobody to answer
            raise RequestError(400, "the request body was cut short") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not JSON") from None
        except RecursionError:
            raise RequestError(400, "the request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def check_model(body: dict) -> None:
        if body.get("model") not in (None, cfg.model_name):
            raise RequestError(404, f"The model '{body['model']}' does not exist (this server has "
                                    f"'{cfg.model_name}')", "model", "model_not_found")

    def sampling(body: dict) -> Sampling:
        limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        return Sampling(max_tokens=int(number(body, limit, cfg.max_tokens, 1, cfg.max_tokens)),
                        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
                        top_p=number(body, "top_p", 1.0, 0.0, 1.0), stop=stop_list(body))

    def choices_wanted(body: dict) -> int:
        n = body.get("n", 1)
        if n is None:
            return 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cfg.max_batch:
            raise RequestError(400, f"'n' must be a whole number from 1 to {cfg.max_batch}", "n")
        return n

    def usage_in_stream(body: dict) -> bool:
        options = body.get("stream_options")
        if options is None:
            return False
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise RequestError(400, "'stream_options' must be an object such as {\"include_usage\": true}",
                               "stream_options")
        return bool(options.get("include_usage")) and bool(body.get("stream"))

    def constraint(plan: ChatPlan | None) -> Constraint | None:
        if plan is None or plan.grammar is None:
            return None
        try:
            return Constraint(served.tok, served.model.args.vocab_size, plan.grammar)
        except GrammarError as e:
            raise RequestError(400, f"the schema cannot be followed: {e}", plan.grammar_from) from None

    async def respond(request: Request, body: dict, ids: list[int], plan: ChatPlan | None = None):
        """Submit n requests to the engine (plan: a chat request's, None for a completion); stream their
        events, or gather them into one answer."""
        check_model(body)
        n, settings, with_usage = choices_wanted(body), sampling(body), usage_in_stream(body)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emitter(index: int):
            def emit(event: Event) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))
                except RuntimeError:  # the event loop is gone (shutting down)
                    pass
            return emit

        jobs = [EngineRequest(ids, replace(settings, stop=list(settings.stop), constraint=constraint(plan)),
                              emitter(i)) for i in range(n)]
        try:
            for job in jobs:
                served.engine.submit(job)
        except ValueError as e:
            for job in jobs:
                job.cancel()
            raise RequestError(400, str(e), "messages" if plan else "prompt", "context_length_exceeded") from None
        created, rid = int(time.time()), f"{'chatcmpl' if plan else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        answers = [AnswerStream(plan.prefix, plan.calls) for _ in range(n)] if plan else []

        def shown(delta: dict) -> dict:
            return delta if plan.show_reasoning else {k: v for k, v in delta.items() if k != "reasoning_content"}

        def calls_of(answer: Answer) -> list[dict]:
            return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                     "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                    for c in answer.tool_calls]

        def finish_reason(answer: Answer, finish: str) -> str:
            return "tool_calls" if answer.tool_calls and finish == "stop" else finish

        def chunk(index: int, delta: dict | str, finish: str | None) -> dict:
            if plan:
                choice = {"index": index, "delta": delta, "finish_reason": finish}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                        "choices": [choice]}
            return {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                    "choices": [{"index": index, "text": delta, "finish_reason": finish, "logprobs": None}]}

        def usage(generated: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": generated, "total_tokens": len(ids) + generated}

        async def until_all_end() -> AsyncIterator[tuple[int, Event]]:
            """The events of the n jobs as they come; a client that goes away cancels them all."""
            async def watch() -> None:  # polled on its own: while an answer is decoded, events never pause
                while not await request.is_disconnected():
                    await asyncio.sleep(1.0)
                events.put_nowait((-1, None))

            watcher, left = asyncio.create_task(watch()), n
            try:
                while left:
                    index, event = await events.get()
                    if event is None:  # the client went away
                        return
                    left -= event.finish is not None
                    yield index, event
            finally:
                watcher.cancel()
                for job in jobs:
                    job.cancel()

        def chat_chunks(index: int, event: Event) -> list[dict]:
            """A chat event's chunks: the delta it makes sure; at the end the rest, the calls, the reason."""
            delta = shown(answers[index].feed(event.text))
            if not event.finish:
                return [chunk(index, delta, None)] if delta else []
            last, answer = answers[index].finish()
            for key, rest in shown(last).items():  # what feed sent, finish does not send again
                delta[key] = delta.get(key, "") + rest
            calls = [{"index": k, **call} for k, call in enumerate(calls_of(answer))]
            chunks = [chunk(index, delta, None)] if delta else []
            if calls:
                chunks.append(chunk(index, {"tool_calls": calls}, None))
            return chunks + [chunk(index, {}, finish_reason(answer, event.finish))]

        def chat_choice(index: int, text: str, finish: str) -> dict:
            answers[index].feed(text)
            answer = answers[index].finish()[1]
            message = {"role": "assistant", "content": answer.content or (None if answer.tool_calls else "")}
            if answer.reasoning is not None and plan.show_reasoning:
                message["reasoning_content"] = answer.reasoning
            if answer.tool_calls:
                message["tool_calls"] = calls_of(answer)
            return {"index": index, "message": message, "finish_reason": finish_reason(answer, finish)}

        if body.get("stream"):
            async def stream() -> AsyncIterator[str]:
                if plan:
                    for index in range(n):
                        yield f"data: {json.dumps(chunk(index, {'role': 'assistant'}, None), ensure_ascii=False)}\n\n"
                generated = 0
                async for index, event in until_all_end():
                    generated += event.tokens if event.finish else 0
                    if plan:
                        for c in chat_chunks(index, event):
                            yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
                    elif event.text or event.finish:
                        yield f"data: {json.dumps(chunk(index, event.text, event.finish), ensure_ascii=False)}\n\n"
                if with_usage:  # OpenAI's last chunk: no choices, the usage of the whole request
                    last = {**chunk(0, "", None), "choices": [], "usage": usage(generated)}
                    yield f"data: {json.dumps(last, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(stream(), media_type="text/event-stream")

        texts, finishes, generated = [""] * n, ["stop"] * n, 0
        async for index, event in until_all_end():
            texts[index] += event.text
            if event.finish:
                finishes[index], generated = event.finish, generated + event.tokens
        if plan:
            choices = [chat_choice(i, texts[i], finishes[i]) for i in range(n)]
            return {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                    "choices": choices, "usage": usage(generated)}
        choices = [{"index": i, "text": texts[i], "finish_reason": finishes[i], "logprobs": None} for i in range(n)]
        return {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                "choices": choices, "usage": usage(generated)}

    model_card = {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "baby-llama2-chinese"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        check_key(request)
        check_model({"model": model_id})
        return model_card

    @app.get("/v1/tools")
    async def builtin_tools(request: Request):
        check_key(request)
        return {"object": "list", "data": [t.spec() for t in BUILTIN.values()]}

    @app.post("/v1/tools/run")
    async def run_builtin_tool(request: Request):
        body = await json_body(request)
        name, arguments = body.get("name"), body.get("arguments", {})
        if isinstance(arguments, str):  # as a tool call carries them
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise RequestError(400, "'arguments' is not JSON", "arguments") from None
        if not isinstance(name, str) or not isinstance(arguments, dict):
            raise RequestError(400, "expected {\"name\": a built-in tool, \"arguments\": {...}}")
        if name not in BUILTIN:
            raise RequestError(404, f"no built-in tool '{name}' (GET /v1/tools lists them)", "name")
        return {"name": name, "content": await asyncio.to_thread(run_tool, name, arguments)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await json_body(request)
        plan = chat_plan(body, served.tok)
        return await respond(request, body, plan.ids, plan)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string", "prompt")
        unicode_of(prompt, "prompt")
        return await respond(request, body, served.tok.encode(prompt))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read()

    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    return app


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        cfg = parse_config(Config, argv, __doc__)
        app = create_app(cfg)
        listener = listen(cfg.host, cfg.port)
        import uvicorn
        torch.set_num_threads(cfg.threads or max(1, torch.get_num_threads() - 1))
        print(f"serving {cfg.ckpt} at http://{cfg.host}:{listener.getsockname()[1]} (OpenAI API under /v1; "
              f"decoding threads: {torch.get_num_threads()})", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (as uvicorn binds: address reuse on); UsageError when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


if __name__ == "__main__":
    main(sys.argv[1:])
