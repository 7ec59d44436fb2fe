"""The chat template: how a conversation of system, user, assistant and tool messages, with reasoning and
tool calls, becomes the seed's turns `prompt + [bos] + answer + [eos]` (dataset_sft.py).

A prompt is a user message (the first one after the offered tools and the system messages) or the results
of the tool calls the assistant just made; an answer is what the assistant wrote: its reasoning between
think markers, its text, then its calls, each a JSON object between call markers:

    prompt 1   <tools>calculator(expression): 计算算术表达式</tools>你是助手。\\n3个苹果60元，一个多少元？
    answer 1   <think>除法。</think><tool_call>{"name": "calculator", "arguments": {"expression": "60/3"}}</tool_call>
    prompt 2   <tool_response>20</tool_response>
    answer 2   一个苹果20元。

Our tokenizer (train_tokenizer.py) holds each marker as one piece; ChatGLM2's spells them with several
ordinary pieces (docs/13_tools.md). The offered tools are one signature a line; calls are JSON as
json.dumps(ensure_ascii=False) writes it, as the exported tokenizer's chat template (export.py) does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

THINK, END_THINK = "<think>", "</think>"
CALL, END_CALL = "<tool_call>", "</tool_call>"
RESPONSE, END_RESPONSE = "<tool_response>", "</tool_response>"
TOOLS, END_TOOLS = "<tools>", "</tools>"
MARKERS = [THINK, END_THINK, CALL, END_CALL, RESPONSE, END_RESPONSE, TOOLS, END_TOOLS]


@dataclass
class ToolCall:
    name: str
    arguments: dict


@dataclass
class Answer:
    """What an assistant turn holds: reasoning (None when it wrote no think block), text and calls."""
    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def function_of(tool: dict) -> dict:
    """The function description of an OpenAI tool ({"type": "function", "function": {...}}) or of a bare one."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


def tool_signature(tool: dict) -> str:
    """`name(argument, ...): description`: a small model's context holds a signature, not a JSON schema
    (the schema is enforced when decoding is constrained: grammar.py)."""
    function = function_of(tool)
    arguments = ", ".join((function.get("parameters") or {}).get("properties") or {})
    description = function.get("description")
    return f"{function['name']}({arguments})" + (f": {description}" if description else "")


def render_tools(tools: list[dict]) -> str:
    return TOOLS + "\n".join(map(tool_signature, tools)) + END_TOOLS if tools else ""


def render_call(call: ToolCall) -> str:
    return CALL + json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False) + END_CALL


def render_answer(answer: Answer) -> str:
    reasoning = "" if answer.reasoning is None else THINK + answer.reasoning + END_THINK
    return reasoning + answer.content + "".join(map(render_call, answer.tool_calls))


def render_results(results: list[str]) -> str:
    return "".join(RESPONSE + r + END_RESPONSE for r in results)


def parse_call(text: str) -> ToolCall | None:
    """The call a call block's JSON describes, or None when it is not {"name": str, "arguments": object}."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or \
            not isinstance(value.get("arguments", {}), dict):
        return None
    return ToolCall(value["name"], value.get("arguments", {}))


def parse_answer(text: str, calls: bool = True) -> Answer:
    """An answer's parts (its calls only when calls: tools were offered). A think block opened and never
    closed is all reasoning; a call block that is cut short or whose JSON does not describe a call leaves
    the text after the reasoning as content, markers and all: a model's malformed call comes back as
    text, never as an error."""
    reasoning = None
    if text.startswith(THINK):
        reasoning, closed, text = text[len(THINK):].partition(END_THINK)
        if not closed:
            return Answer("", reasoning)
    first = text.find(CALL) if calls else -1
    if first < 0:
        return Answer(text, reasoning)
    calls, rest = [], text[first:]
    while rest:
        body, closed, after = rest[len(CALL):].partition(END_CALL)
        call = parse_call(body) if rest.startswith(CALL) and closed else None
        if call is None:
            return Answer(text, reasoning)
        calls.append(call)
        rest = after.lstrip()
    return Answer(text[:first], reasoning, calls)


def conversation(messages: list[dict], tools: list[dict] | None = None) -> tuple[list[tuple[str, str]], str]:
    """(earlier turns as (prompt, answer) texts, the prompt the model answers next) of messages whose
    content is text: role system, user, assistant (content, reasoning_content, tool_calls as OpenAI
    writes them) or tool. ValueError naming the message for what the template cannot hold."""
    prefix = render_tools(tools or []) + "".join(m["content"] + "\n" for m in messages if m["role"] == "system")
    turns: list[tuple[str, str]] = []
    pending: str | None = None
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user":
            if pending is not None:
                raise ValueError(f"messages[{i}]: a user message follows another prompt without an assistant answer")
            pending, prefix = prefix + m["content"], ""
        elif role == "tool":
            if pending is None and not (turns and CALL in turns[-1][1]):
                raise ValueError(f"messages[{i}]: a tool message must follow an assistant message with tool_calls")
            pending = (pending or "") + render_results([m["content"]])
        elif role == "assistant":
            if pending is None:
                raise ValueError(f"messages[{i}]: an assistant message must follow a user or tool message")
            turns.append((pending, render_answer(assistant_answer(m, i))))
            pending = None
    if pending is None:
        raise ValueError("the last message must come from the user or a tool")
    return turns, pending


def assistant_answer(message: dict, i: int) -> Answer:
    """An OpenAI assistant message as an Answer; tool call arguments come as a JSON string or an object."""
    calls = []
    for j, call in enumerate(message.get("tool_calls") or []):
        where = f"messages[{i}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where} needs a function with a name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                raise ValueError(f"{where}.function.arguments is not JSON") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}.function.arguments must be a JSON object")
        calls.append(ToolCall(function["name"], arguments))
    reasoning = message.get("reasoning_content")
    return Answer(message.get("content") or "", reasoning if isinstance(reasoning, str) else None, calls)


def reasoning_prefix(reasoning: bool | None) -> str:
    """What the answer starts with: the open think marker when reasoning is asked for, an empty think block
    when it is turned off, nothing when the model decides."""
    return {True: THINK, False: THINK + END_THINK, None: ""}[reasoning]


def held_back(text: str, marker: str) -> str:
    """text without its end when that end may be the start of marker (the next pieces will tell)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text


class AnswerStream:
    """An answer arriving piece by piece, told apart into reasoning and content deltas as soon as each part
    is sure: text that may be the start of a marker waits, and with tools offered everything from a call
    marker on waits for the end, when the calls are parsed whole."""

    def __init__(self, prefix: str = "", calls: bool = False):
        self.text, self.calls = prefix, calls
        self.sent = {"reasoning_content": 0, "content": 0}

    def _sure(self) -> tuple[str | None, str]:
        text = self.text
        if THINK.startswith(text):
            return None, ""
        rest = text
        reasoning = None
        if text.startswith(THINK):
            reasoning, closed, rest = text[len(THINK):].partition(END_THINK)
            if not closed:
                return held_back(reasoning, END_THINK), ""
        if self.calls:
            first = rest.find(CALL)
            return reasoning, rest[:first] if first >= 0 else held_back(rest, CALL)
        return reasoning, rest

    def _delta(self, reasoning: str | None, content: str) -> dict:
        delta = {}
        for key, value in (("reasoning_content", reasoning), ("content", content)):
            if value is not None and len(value) > self.sent[key]:
                delta[key] = value[self.sent[key]:]
                self.sent[key] = len(value)
        return delta

    def feed(self, text: str) -> dict:
        """The delta ({"reasoning_content": ..., "content": ...}, either or none) that text makes sure."""
        self.text += text
        return self._delta(*self._sure())

    def finish(self) -> tuple[dict, Answer]:
        """The last delta, and the whole answer parsed."""
        answer = parse_answer(self.text, self.calls)
        return self._delta(answer.reasoning, answer.content), answer
