"""Tool calls, reasoning and structured output: the chat template, the built-in tools, the grammar masks,
and serve.py's OpenAI tools / tool_choice / response_format / reasoning_content through the official client."""
import json
import os
import random
import time

import pytest
import torch
from conftest import ROOT

from babyllama.chat_format import (
    CALL,
    MARKERS,
    Answer,
    AnswerStream,
    ToolCall,
    conversation,
    parse_answer,
    reasoning_prefix,
    render_answer,
)
from babyllama.tools import (
    BUILTIN,
    Tool,
    ToolError,
    builtin_tools,
    calculate,
    date_add,
    date_diff,
    run_tool,
    unit_convert,
)
from chatglm_tokenizer import load_tokenizer

jsonschema = pytest.importorskip("jsonschema")

CALCULATOR = BUILTIN["calculator"].spec()
# Random weights never end an unbounded string on their own (a trained model does): the schemas that
# random-weight tests constrain to are bounded
BOUNDED_TOOLS = [
    {"type": "function", "function": {"name": "calculator", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string", "maxLength": 12}},
        "required": ["expression"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "date_add", "parameters": {
        "type": "object", "properties": {"date": BUILTIN["date_add"].parameters["properties"]["date"],
                                         "days": {"type": "integer", "minimum": -999, "maximum": 999}},
        "required": ["date", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "unit_convert", "parameters": {
        **BUILTIN["unit_convert"].parameters, "properties": {
            **BUILTIN["unit_convert"].parameters["properties"],
            "value": {"type": "integer", "minimum": 0, "maximum": 999}}}}}]
CONVERSATION = [
    {"role": "system", "content": "你是助手。"},
    {"role": "user", "content": "3个苹果60元,一个多少元?"},
    {"role": "assistant", "content": None, "reasoning_content": "除法。", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "calculator", "arguments": '{"expression": "60/3"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "20"},
    {"role": "assistant", "content": "一个20元。"},
    {"role": "user", "content": "两个呢?"},
]


@pytest.mark.parametrize("expression, value", [
    ("(3+4)*2.5", "17.5"), ("10/4", "2.5"), ("2**10", "1024"), ("7//2", "3"), ("-3+1", "-2"), ("1/3", "0.3333333333"),
    ("3×4÷2", "6"), ("2^3", "8"), ("0.1+0.2", "0.3"), ("17 % 5", "2")])
def test_the_calculator_computes(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, reason", [
    ("__import__('os').system('true')", "only numbers"), ("a+1", "only numbers"), ("2**1000", "exponent"),
    ("1/0", "division by zero"), ("9**9**9", "exponent"), ("1e99*1e99", "out of range"), ("(1+", "not an arithmetic"),
    ("", "not an arithmetic"), ("[1][0]", "only numbers"), ("'a'*3", "only numbers")])
def test_the_calculator_refuses_what_is_not_bounded_arithmetic(expression, reason):
    with pytest.raises(ToolError, match=reason):
        calculate(expression)


def test_dates_and_units():
    assert date_add("2024-02-27", 3) == "2024-03-01" and date_add("2024-03-01", -1) == "2024-02-29"
    assert date_diff("2024-01-01", "2024-03-01") == "60" and date_diff("2024-03-01", "2024-01-01") == "-60"
    assert unit_convert(3, **{"from": "千米", "to": "米"}) == "3000"
    assert unit_convert(2, **{"from": "斤", "to": "克"}) == "1000"
    assert unit_convert(90, **{"from": "分钟", "to": "小时"}) == "1.5"
    for call, reason in [(lambda: date_add("2024-13-01", 1), "date such as"),
                         (lambda: date_add("2024-01-01", 1.5), "whole"),
                         (lambda: unit_convert(1, **{"from": "米", "to": "克"}), "cannot convert"),
                         (lambda: unit_convert(1, **{"from": "光年", "to": "米"}), "unknown unit"),
                         (lambda: unit_convert("1", **{"from": "米", "to": "米"}), "must be a number")]:
        with pytest.raises(ToolError, match=reason):
            call()


def test_a_tool_that_fails_or_hangs_becomes_an_error_result():
    def hang() -> str:
        time.sleep(3)
        return "late"

    def broken() -> str:
        raise KeyError("x")

    tools = {**BUILTIN, "hang": Tool("hang", "", {}, hang), "broken": Tool("broken", "", {}, broken)}
    start = time.perf_counter()
    assert run_tool("hang", {}, tools, timeout=0.2) == "error: hang did not answer within 0.2 s"
    assert time.perf_counter() - start < 1.5
    assert run_tool("broken", {}, tools).startswith("error: broken failed: KeyError")
    assert run_tool("calculator", {"expression": "1/0"}, tools) == "error: division by zero"
    assert run_tool("calculator", {"expr": "1"}, tools).startswith("error: wrong arguments for calculator")
    assert run_tool("weather", {}, tools).startswith("error: no tool named 'weather'")
    assert run_tool("calculator", {"expression": "6*7"}, tools) == "42"


def test_the_conversation_renders_the_documented_strings():
    tools_text = "<tools>calculator(expression): 计算算术表达式</tools>"
    turns, prompt = conversation([{**m, "content": m["content"] or ""} for m in CONVERSATION], [CALCULATOR])
    assert turns == [
        (tools_text + "你是助手。\n3个苹果60元,一个多少元?",
         '<think>除法。</think><tool_call>{"name": "calculator", "arguments": {"expression": "60/3"}}</tool_call>'),
        ("<tool_response>20</tool_response>", "一个20元。")]
    assert prompt == "两个呢?"
    assert reasoning_prefix(True) == "<think>" and reasoning_prefix(False) == "<think></think>"
    assert reasoning_prefix(None) == ""


@pytest.mark.parametrize("messages, error", [
    ([{"role": "tool", "content": "1"}], "must follow an assistant message with tool_calls"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
    ([{"role": "assistant", "content": "b"}], "must follow a user or tool"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "follows another prompt"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{bad"}}]}, {"role": "tool", "content": "1"}], "is not JSON")])
def test_a_conversation_the_template_cannot_hold_is_named(messages, error):
    with pytest.raises(ValueError, match=error):
        conversation(messages)


ANSWERS = [
    "直接回答。",
    "<think>想一想</think>答案是7。",
    '<think>要算</think><tool_call>{"name": "calculator", "arguments": {"expression": "3+4"}}</tool_call>',
    '前言<tool_call>{"name": "a", "arguments": {}}</tool_call> '
    '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>',
    '<tool_call>{"name": "calculator", "arguments": {"expression": "3+',  # cut short
    '<tool_call>{"name": 3}</tool_call>',  # not a call
    '<tool_call>{"name": "a", "arguments": {}}</tool_call>后面的话',  # text after a call: not a call answer
    "<think>没想完",
    "<thi",
    "a < b <tool",
]


def test_answers_parse_into_reasoning_content_and_calls():
    assert parse_answer(ANSWERS[1]) == Answer("答案是7。", "想一想")
    assert parse_answer(ANSWERS[2]) == Answer("", "要算", [ToolCall("calculator", {"expression": "3+4"})])
    assert parse_answer(ANSWERS[3]) == Answer("前言", None, [ToolCall("a", {}), ToolCall("b", {"x": 1})])
    for malformed in ANSWERS[4:7]:  # a model's broken call comes back as text
        assert parse_answer(malformed) == Answer(malformed)
    assert parse_answer(ANSWERS[7]) == Answer("", "没想完")
    assert parse_answer(ANSWERS[2], calls=False).content.startswith(CALL)
    for answer in [parse_answer(ANSWERS[1]), parse_answer(ANSWERS[2]), parse_answer(ANSWERS[3])]:
        assert parse_answer(render_answer(answer)) == answer


@pytest.mark.parametrize("calls", [True, False])
@pytest.mark.parametrize("text", ANSWERS)
def test_streamed_deltas_add_up_to_the_parsed_answer(text, calls):
    rng = random.Random(len(text))
    stream, sent = AnswerStream(calls=calls), {"reasoning_content": "", "content": ""}
    position = 0
    while position < len(text):
        step = rng.randint(1, 4)
        for key, value in stream.feed(text[position:position + step]).items():
            assert calls is False or CALL not in sent[key] + value  # a call is never streamed as content
            sent[key] += value
        position += step
    last, answer = stream.finish()
    for key, value in last.items():
        sent[key] += value
    assert sent["content"] == answer.content and sent["reasoning_content"] == (answer.reasoning or "")
    assert answer == parse_answer(text, calls)


def test_markers_are_one_piece_of_our_tokenizer(small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    for marker in MARKERS:
        assert len(tok.encode(marker)) == 1 and tok.decode(tok.encode(marker)) == marker
    text = "<tools>{}</tools>问<think>想</think><tool_call>{}</tool_call><tool_response>3</tool_response>"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("thinking", [None, True, False])
def test_the_exported_chat_template_gives_the_ids_we_train_on(small_tokenizer, thinking):
    pytest.importorskip("transformers")
    from dataset_sft import chat_prompt_ids
    from export import CHAT_TEMPLATE, llama_tokenizer
    tok = load_tokenizer(small_tokenizer)
    hf = llama_tokenizer(tok)
    hf.chat_template = CHAT_TEMPLATE
    extra = {} if thinking is None else {"enable_thinking": thinking}
    hf_ids = hf.apply_chat_template(CONVERSATION, tools=[CALCULATOR], tokenize=True, return_dict=False, **extra)
    turns, prompt = conversation([{**m, "content": m["content"] or ""} for m in CONVERSATION], [CALCULATOR])
    ours = chat_prompt_ids(tok, turns, prompt, 10**9) + tok.encode(reasoning_prefix(thinking))
    assert list(hf_ids) == ours


@pytest.fixture(params=["ours", "chatglm"])
def tokenizer(request):
    """Our tokenizer (markers are single pieces) and ChatGLM2's (markers spelt in ordinary pieces, and a
    space SentencePiece puts in front of a text)."""
    path = request.getfixturevalue("small_tokenizer" if request.param == "ours" else "chatglm_path")
    return load_tokenizer(path)


def constrained_sample(tok, grammar: str, seed: int, limit: int = 600, prefix: str = "") -> str:
    from babyllama.grammar import Constraint
    constraint = Constraint(tok, tok.vocab_size + 3, grammar)  # rows past the tokenizer's: never allowed
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(limit):
        allowed = constraint.allowed()
        assert not allowed[tok.vocab_size:].any()
        logits = torch.randn(tok.vocab_size + 3, generator=generator).masked_fill(~allowed, float("-inf"))
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        if token == tok.eos_id:
            return prefix + tok.decode(out)
        constraint.take(token)
        out.append(token)
    pytest.fail(f"no end after {limit} tokens: {tok.decode(out)[:200]!r}")


@pytest.mark.parametrize("reasoning", [False, True])
def test_constrained_calls_parse_and_validate_whatever_the_weights(tokenizer, reasoning):
    pytest.importorskip("llguidance")
    from babyllama.grammar import tool_calls_grammar
    if reasoning and tokenizer.vocab_size > 1000:
        pytest.skip("random logits over 64k ids take too long to sample the end of a free reasoning text; "
                    "our small vocabulary checks that grammar")
    for seed in range(3):
        text = constrained_sample(tokenizer, tool_calls_grammar(BOUNDED_TOOLS, reasoning), seed,
                                  prefix=reasoning_prefix(True) if reasoning else "")
        answer = parse_answer(text)
        assert len(answer.tool_calls) == 1 and answer.content == "", text
        call = answer.tool_calls[0]
        schema = next(t["function"]["parameters"] for t in BOUNDED_TOOLS if t["function"]["name"] == call.name)
        jsonschema.validate(call.arguments, schema)
        assert (answer.reasoning is not None) == reasoning


def test_constrained_json_follows_the_schema(tokenizer):
    pytest.importorskip("llguidance")
    from babyllama.grammar import json_grammar
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99},
                                               "tag": {"enum": ["甲", "乙"]}}, "required": ["ok", "n", "tag"],
              "additionalProperties": False}
    for seed in range(3):
        jsonschema.validate(json.loads(constrained_sample(tokenizer, json_grammar(schema), seed)), schema)


def test_a_schema_that_cannot_be_followed_is_an_error(small_tokenizer):
    pytest.importorskip("llguidance")
    from babyllama.grammar import Constraint, GrammarError, json_grammar
    with pytest.raises(GrammarError):
        Constraint(load_tokenizer(small_tokenizer), 600, json_grammar({"type": "object", "properties": {
            "a": {"type": "string", "pattern": "("}}}))


def test_masks_apply_per_row_in_the_batched_engine(small_tokenizer):
    """A constrained request and a free one decoded together: the constrained one follows its schema, the
    free one writes exactly what it writes alone."""
    pytest.importorskip("llguidance")
    from babyllama.engine import Engine, Request, Sampling
    from babyllama.grammar import Constraint, json_grammar
    from model import ModelArgs, Transformer
    tok = load_tokenizer(small_tokenizer)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=600, max_seq_len=256, multiple_of=16))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}

    def decode(requests: list[tuple[list[int], Sampling]]) -> list[str]:
        engine = Engine(model, tok, max_batch=4)
        texts, done = [""] * len(requests), [False] * len(requests)

        def emitter(i):
            def emit(event):
                texts[i] += event.text
                done[i] = done[i] or event.finish is not None
            return emit
        for i, (ids, sampling) in enumerate(requests):
            engine.submit(Request(ids, sampling, emitter(i)))
        deadline = time.time() + 60
        while not all(done) and time.time() < deadline:
            time.sleep(0.01)
        assert all(done)
        return texts

    prompt = tok.encode("床前明月光") + [tok.bos_id]
    alone = decode([(prompt, Sampling(max_tokens=30))])[0]
    constraint = Constraint(tok, 600, json_grammar(schema))
    constrained, free = decode([(prompt, Sampling(max_tokens=30, constraint=constraint)),
                                (prompt, Sampling(max_tokens=30))])
    jsonschema.validate(json.loads(constrained), schema)
    assert free == alone and constrained != alone


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory, small_tokenizer):
    """serve.py with a random model whose context holds the tools' schemas."""
    pytest.importorskip("openai")
    pytest.importorskip("llguidance")
    from test_serve import serving

    from model import ModelArgs
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=600, max_seq_len=2048, multiple_of=16)
    yield from serving(tmp_path_factory.mktemp("serve_tools"), small_tokenizer, args, "--max_tokens=200")


@pytest.fixture(scope="module")
def client(tools_server):
    """The official openai client on tools_server."""
    import openai
    return openai.OpenAI(base_url=f"{tools_server}/v1", api_key="none", max_retries=0)


def ask(client, **kw):
    return client.chat.completions.create(model="baby-llama2", messages=[{"role": "user", "content": "3加4等于几?"}],
                                          **kw)


def validate_call(call) -> None:
    schema = next(t["function"]["parameters"] for t in BOUNDED_TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_tool_choice_required_returns_a_call_that_validates(client):
    answer = ask(client, tools=BOUNDED_TOOLS, tool_choice="required", n=3, temperature=1.0)
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1 and choice.message.tool_calls[0].id.startswith("call_")
        validate_call(choice.message.tool_calls[0])


def test_a_tool_round_trip(client):
    """The model calls, the client runs the tool and sends its result back, the model answers."""
    first = ask(client, tools=BOUNDED_TOOLS, tool_choice={"type": "function", "function": {"name": "calculator"}})
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "calculator"
    result = run_tool("calculator", json.loads(call.function.arguments))
    messages = [{"role": "user", "content": "3加4等于几?"}, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": result}]
    final = client.chat.completions.create(model="baby-llama2", messages=messages, tools=BOUNDED_TOOLS,
                                           tool_choice="none", max_tokens=10)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.tool_calls is None
    assert isinstance(final.choices[0].message.content, str) and final.usage.prompt_tokens > 0


def test_streamed_tool_calls(client):
    chunks = list(ask(client, tools=BOUNDED_TOOLS, tool_choice={"type": "function", "function": {"name": "date_add"}},
                      stream=True))
    calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "date_add" and calls[0].index == 0
    validate_call(calls[0])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(CALL in (chunk.choices[0].delta.content or "") for chunk in chunks)


def test_response_format_json_schema_and_json_object(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    answer = ask(client, response_format={"type": "json_schema", "json_schema": {"name": "check", "schema": schema}},
                 n=2, temperature=1.0)
    for choice in answer.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)
    streamed = ask(client, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
                   stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in streamed)), schema)


def test_reasoning_content_is_there_when_asked_and_not_otherwise(client):
    asked = ask(client, reasoning_effort="high", max_tokens=8).choices[0].message
    assert isinstance(asked.model_extra.get("reasoning_content"), str)  # the model's text inside the open think
    off = ask(client, reasoning_effort="none", max_tokens=8).choices[0].message
    assert "reasoning_content" not in off.model_extra and "</think>" not in off.content
    streamed = list(ask(client, reasoning_effort="high", max_tokens=8, stream=True))
    assert any(c.choices[0].delta.model_extra.get("reasoning_content") for c in streamed if c.choices)


@pytest.mark.parametrize("request_args, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": BOUNDED_TOOLS, "tool_choice": {"type": "function", "function": {"name": "weather"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}], "tool_choice": "required"},
     "tools"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": [{"role": "tool", "content": "1"}]}, "messages"),
])
def test_what_the_tools_api_cannot_do_is_a_400(client, request_args, param):
    import openai
    args = {"messages": [{"role": "user", "content": "你好"}], **request_args}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="baby-llama2", **args)
    assert e.value.body["param"] == param


def test_with_tool_choice_auto_whatever_the_model_writes_comes_back(client):
    """Unconstrained, a random model writes no valid call: its text comes back as content, never an error."""
    for answer in ask(client, tools=BOUNDED_TOOLS, n=3, temperature=1.0, max_tokens=20).choices:
        assert answer.finish_reason in ("stop", "length") and isinstance(answer.message.content, str)


def test_look_ups_answer_from_the_tables(lookup_tables, tmp_path):
    tools = builtin_tools(lookup_tables)
    assert run_tool("idiom_meaning", {"idiom": " 画蛇添足"}, tools) == "长" * 60
    assert run_tool("char_reading", {"char": chr(0x4e01)}, tools) == "p1g"  # the IPA ɡ read as g
    assert run_tool("char_reading", {"char": "龘"}, tools) == "error: '龘' is not in the table"
    assert run_tool("idiom_meaning", {"idiom": ""}, tools) == "error: 'idiom' must be a non-empty text"
    assert run_tool("idiom_meaning", {"word": "x"}, tools).startswith("error: wrong arguments for idiom_meaning")
    missing = run_tool("char_reading", {"char": "行"}, builtin_tools(str(tmp_path)))
    assert missing == (f"error: the table {tmp_path}/dictionary/dictionary.json is not there: "
                       "run `python download_data.py --sources=dictionary`")
    (tmp_path / "idioms").mkdir()
    (tmp_path / "idioms" / "idioms.json").write_text('[{"word": "画蛇添足", "expl', encoding="utf-8")  # cut short
    damaged = run_tool("idiom_meaning", {"idiom": "画蛇添足"}, builtin_tools(str(tmp_path)))
    assert damaged.startswith(f"error: {tmp_path}/idioms/idioms.json") and "\n" not in damaged


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "data/raw/idioms/idioms.json")) or
                    not os.path.isfile(os.path.join(ROOT, "data/raw/dictionary/dictionary.json")),
                    reason="the real tables are not downloaded (python download_data.py --sources=idioms,dictionary)")
def test_look_ups_on_the_real_tables():
    tools = builtin_tools(os.path.join(ROOT, "data/raw"))
    assert "多余" in run_tool("idiom_meaning", {"idiom": "画蛇添足"}, tools)
    assert run_tool("char_reading", {"char": "行"}, tools) == "xíng"  # the package writes xínɡ


def test_held_out_look_ups_never_reach_training(lookup_tables):
    from babyllama.tool_tasks import HELD_OUT_TEMPLATES, MAX_LOOKUP_CHARS, numbers_key, tasks
    train = [t for t in tasks("train", 2000, raw_dir=lookup_tables) if t.kind == "lookup"]
    numbers = [t for t in tasks("numbers", 600, raw_dir=lookup_tables) if t.kind == "lookup"]
    templates = [t for t in tasks("templates", 300, raw_dir=lookup_tables) if t.kind == "lookup"]
    assert {t.call.name for t in train} == {t.call.name for t in numbers} == {"idiom_meaning", "char_reading"}
    assert {t.template for t in templates} == {"idiom_explain", "char_pinyin"} <= set(HELD_OUT_TEMPLATES)
    assert not {numbers_key(t.call) for t in train} & {numbers_key(t.call) for t in numbers}
    tools = builtin_tools(lookup_tables)
    for t in train + numbers + templates:
        assert run_tool(t.call.name, t.call.arguments, tools) == t.result and t.holds_result(t.answer)
        assert len(t.result) <= MAX_LOOKUP_CHARS  # 画蛇添足's long meaning is never asked
    assert not [t for t in tasks("train", 300) if t.kind == "lookup"]  # no tables given, no look-ups


def test_look_ups_are_offered_only_where_asked_for():
    from babyllama.tool_tasks import all_tools, tools_for_training
    names = [t["function"]["name"] for t in all_tools()]
    assert names == ["calculator", "date_add", "date_diff", "unit_convert"]
    assert [t["function"]["name"] for t in all_tools(lookups=True)] == names + ["idiom_meaning", "char_reading"]
    rng = random.Random(0)
    offered = {t["function"]["name"] for _ in range(200) for t in tools_for_training(rng, "calculator")}
    assert offered == set(names)
    offered = {t["function"]["name"] for _ in range(200) for t in tools_for_training(rng, "char_reading", True)}
    assert offered == set(names) | {"idiom_meaning", "char_reading"}


def test_held_out_tool_tasks_never_reach_training():
    from babyllama.tool_tasks import HELD_OUT_TEMPLATES, TEMPLATES, numbers_key, tasks
    train = list(tasks("train", 3000))
    numbers, templates = list(tasks("numbers", 300)), list(tasks("templates", 300))
    assert not {t.template for t in train} & set(HELD_OUT_TEMPLATES)
    assert {t.template for t in templates} == {t for t in HELD_OUT_TEMPLATES if not TEMPLATES[t].lookup}
    assert {t.template for t in numbers} <= set(TEMPLATES) - set(HELD_OUT_TEMPLATES)
    assert not {t.question for t in train} & {t.question for t in numbers + templates}
    assert not {numbers_key(t.call) for t in train} & {numbers_key(t.call) for t in numbers}
    assert numbers_key(ToolCall("calculator", {"expression": "37*24"})) == \
        numbers_key(ToolCall("calculator", {"expression": "24+37"})) == "calculator:24,37"
    assert [t.question for t in tasks("numbers", 20)] == [t.question for t in numbers[:20]]  # the same every time


def test_every_tool_task_checks_out():
    from babyllama.tool_tasks import tasks
    for split in ("train", "numbers", "templates"):
        for t in tasks(split, 200):
            assert run_tool(t.call.name, t.call.arguments) == t.result and t.holds_result(t.answer)
            tools_turns, direct = t.turns([CALCULATOR]), t.turns(None)
            assert len(tools_turns) == 2 and parse_answer(tools_turns[0][1]).tool_calls == [t.call]
            assert t.holds_result(parse_answer(direct[0][1]).content)
    assert not next(tasks("train", 1)).holds_result("答案是 12345678")


def test_tool_scores_reward_equivalent_arguments_and_right_results():
    from babyllama.tool_tasks import ToolTask, score_call
    t = ToolTask("arithmetic", "x", "37乘24?", ToolCall("calculator", {"expression": "37*24"}), "888", "是888。", "")
    assert score_call(t, Answer("", None, [ToolCall("calculator", {"expression": "24*37"})])) == {
        "valid_call": True, "right_tool": True, "right_arguments": True}
    wrong = Answer("", None, [ToolCall("calculator", {"expression": "24+37"})])
    assert score_call(t, wrong)["right_arguments"] is False
    assert score_call(t, Answer("", None, [ToolCall("date_add", {})]))["right_tool"] is False
    assert score_call(t, Answer("888")) == {"valid_call": False, "right_tool": False, "right_arguments": False}
    assert t.holds_result("一共888元") and not t.holds_result("一共8888元") and not t.holds_result("888.5")


def test_chat_runs_the_calls_the_model_makes_and_hands_back_the_results(small_tokenizer):
    """chat.py's loop with a model that answers from a script: the call is run, its result is the next
    prompt, the model's answer to it ends the turn."""
    import io

    from chat import Config, reply
    tok = load_tokenizer(small_tokenizer)
    script = ['<think>乘法</think><tool_call>{"name": "calculator", "arguments": {"expression": "37*24"}}</tool_call>',
              "是888。"]
    seen_prompts = []

    class Scripted:
        class args:
            max_seq_len = 2048

        def generate_stream(self, prompts, *_, **__):
            seen_prompts.append(tok.decode(prompts[0]))
            for token in tok.encode(script[len(seen_prompts) - 1]) + [tok.eos_id]:
                yield [token]

    history, out = [], io.StringIO()
    reply(Scripted(), tok, history, "<tools>calculator(expression)</tools>37乘24?", Config(), None, True, out)
    assert [p for p, _ in history] == ["<tools>calculator(expression)</tools>37乘24?",
                                       "<tool_response>888</tool_response>"]
    assert [a for _, a in history] == script
    assert seen_prompts[1].endswith("<tool_response>888</tool_response>")
    assert '-> 888]' in out.getvalue()


def test_the_server_lists_and_runs_its_built_in_tools(tools_server):
    from test_serve import http, post
    listed = http("GET", f"{tools_server}/v1/tools").json()["data"]
    assert [t["function"]["name"] for t in listed] == list(BUILTIN)
    run = f"{tools_server}/v1/tools/run"
    assert post(run, {"name": "calculator", "arguments": {"expression": "24*37"}}).json() == {
        "name": "calculator", "content": "888"}
    assert post(run, {"name": "calculator", "arguments": '{"expression": "1/0"}'}).json()["content"] == (
        "error: division by zero")  # as a tool call carries them: a JSON string; a failing call is a result
    missing = post(run, {"name": "weather", "arguments": {}})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "name"
    for bad in ({"name": "calculator", "arguments": "{"}, {"name": 3}, {"name": "calculator", "arguments": [1]}):
        assert post(run, bad).status_code == 400, bad


def test_the_web_page_folds_the_reasoning_and_shows_each_call_beside_its_result(tools_server, tmp_path):
    from test_serve import chromium_page, post
    question = "3加4等于几?"
    with chromium_page(tools_server, tmp_path) as browser:
        browser.find_element("id", "tools").click()
        # A forced call to the calculator (a random model calls nothing of itself), then the model answers.
        browser.execute_script("send(arguments[0], arguments[1])", question, {
            "tools": BOUNDED_TOOLS, "tool_choice": {"type": "function", "function": {"name": "calculator"}}})
        finished = "return messages.length > 1 && messages.at(-1).role === 'assistant' && !messages.at(-1).tool_calls"
        deadline = time.time() + 120
        while time.time() < deadline and not browser.execute_script(finished):
            time.sleep(0.2)
        assert browser.execute_script(finished)
        messages = browser.execute_script("return messages")
        call = messages[1]["tool_calls"][0]["function"]
        assert call["name"] == "calculator" and messages[2]["role"] == "tool"
        jsonschema.validate(json.loads(call["arguments"]), BOUNDED_TOOLS[0]["function"]["parameters"])
        result = post(f"{tools_server}/v1/tools/run", call).json()["content"]
        row = browser.find_elements("class name", "tool")[0]
        assert row.find_element("class name", "call").text == f"calculator({call['arguments']})"
        assert row.find_element("class name", "result").text == f"→ {result}" and messages[2]["content"] == result

        browser.find_element("id", "reset").click()
        browser.find_element("id", "tools").click()
        browser.find_element("id", "think").click()
        browser.find_element("id", "question").send_keys(question)
        browser.find_element("id", "send").click()
        deadline = time.time() + 120
        while time.time() < deadline and browser.execute_script("return messages.length") < 2:
            time.sleep(0.2)
        fold = browser.find_element("class name", "reasoning")
        assert fold.tag_name == "details" and fold.get_attribute("open") is None  # folded away
        shown = browser.execute_script("return document.querySelector('.reasoning .thought').textContent")
        reply = post(f"{tools_server}/v1/chat/completions", {"messages": [{"role": "user", "content": question}],
                                                             "temperature": 0, "reasoning_effort": "medium"}).json()
        assert shown == reply["choices"][0]["message"]["reasoning_content"] and shown
        assert browser.execute_script("return messages[1].content") == (reply["choices"][0]["message"]["content"] or "")
