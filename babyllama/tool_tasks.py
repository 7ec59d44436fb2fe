"""Tool tasks whose answers can be checked: Chinese arithmetic word problems (the calculator), date
arithmetic and unit conversion, each made from a template and numbers drawn by a seeded generator; and,
when the tables are there (tools.LOOKUPS), look-ups of an idiom's meaning or a character's reading.

Each task is a question, the call that answers it, the tool's result and the final answer, with a short
worked reasoning. As SFT samples it is a conversation of two turns (the call, then the answer after the
result) when tools are offered, or one turn answered directly when they are not.

Held out, never trained on (tests check both): the templates of HELD_OUT_TEMPLATES (split 'templates'),
and, of the other templates, every call whose numbers (numbers_key: the tool and its numbers in order of
size, whatever the template; for a look-up, the word) hash into the held-out share (split 'numbers').
"""
from __future__ import annotations

import datetime
import json
import random
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from babyllama.chat_format import Answer, ToolCall, render_answer, render_results, render_tools
from babyllama.tools import (
    BUILTIN,
    LOOKUPS,
    RAW_DIR,
    UNITS,
    Tool,
    ToolError,
    builtin_tools,
    lookup_path,
    lookup_table,
    run_tool,
)

NAMES = ["小明", "小红", "小刚", "小丽", "王叔叔", "李阿姨", "张老师", "妈妈"]
HELD_OUT_NUMBERS = 0.1  # share of number draws kept for the 'numbers' split
MAX_LOOKUP_CHARS = 48  # look-up tasks only ask for values a short answer can quote


@dataclass
class ToolTask:
    kind: str  # arithmetic, date, unit, lookup
    template: str  # the template's name
    question: str
    call: ToolCall
    result: str  # what the tool returns
    answer: str  # the final answer, holding the result
    reasoning: str  # how the call follows from the question

    @property
    def direct_reasoning(self) -> str:
        """The reasoning worked out without the tool: the result computed in the head."""
        return f"{self.reasoning}结果是{self.result}。"

    @property
    def expected(self) -> str:
        """What a right final answer holds: the result, as the answer writes it."""
        return chinese_date(self.result) if self.call.name == "date_add" else self.result

    def holds_result(self, text: str) -> bool:
        return re.search(rf"(?<![\d.]){re.escape(self.expected)}(?![\d.])", text) is not None

    def turns(self, tools: list[dict] | None) -> list[tuple[str, str]]:
        """The conversation as (prompt, answer) turns: with tools, the call then the answer after the result;
        without, the answer at once."""
        if tools is None:
            return [(self.question, render_answer(Answer(self.answer, self.direct_reasoning)))]
        return [(render_tools(tools) + self.question, render_answer(Answer("", self.reasoning, [self.call]))),
                (render_results([self.result]), self.answer)]


@dataclass
class Template:
    name: str
    kind: str
    draw: Callable[[random.Random], dict] | None  # the numbers (and names) of one task; None for a look-up
    make: Callable[[dict], tuple[str, ToolCall, Callable[[str], str], str]]  # question, call, answer(result), reasoning
    lookup: str = ""  # for a look-up, its tool: tasks() draws the word from that tool's table


def arithmetic(name: str, draw: Callable[[random.Random], dict], question: str, expression: str, answer: str,
               reasoning: str) -> Template:
    def make(v: dict) -> tuple[str, ToolCall, Callable[[str], str], str]:
        return (question.format(**v), ToolCall("calculator", {"expression": expression.format(**v)}),
                lambda r: answer.format(r=r, **v), reasoning.format(**v))
    return Template(name, "arithmetic", draw, make)


def two(low: int, high: int, ordered: bool = False) -> Callable[[random.Random], dict]:
    def draw(rng: random.Random) -> dict:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if ordered and a < b:
            a, b = b, a
        return {"a": a, "b": b, "name": rng.choice(NAMES)}
    return draw


def divisible(low: int, high: int) -> Callable[[random.Random], dict]:
    def draw(rng: random.Random) -> dict:
        b, k = rng.randint(low, high), rng.randint(low, high)
        return {"a": b * k, "b": b, "name": rng.choice(NAMES)}
    return draw


def three(rng: random.Random) -> dict:
    b, c = rng.randint(10, 300), rng.randint(10, 300)
    return {"a": b + c + rng.randint(1, 500), "b": b, "c": c, "name": rng.choice(NAMES)}


def discount(rng: random.Random) -> dict:
    return {"a": rng.randint(20, 999), "d": rng.randint(5, 9)}


ARITHMETIC = [
    arithmetic("buy_more", two(12, 999), "{name}有{a}个苹果,又买了{b}个,现在一共有多少个苹果?", "{a}+{b}",
               "一共有{r}个苹果。", "原有{a}个,又买了{b}个,两数相加。"),
    arithmetic("unit_price", two(12, 99), "一本书{a}元,买{b}本需要多少元?", "{a}*{b}", "需要{r}元。",
               "单价{a}元乘数量{b}本。"),
    arithmetic("share", divisible(3, 60), "{a}元平均分给{b}个人,每人分到多少元?", "{a}/{b}", "每人分到{r}元。",
               "总数{a}元除以{b}人。"),
    arithmetic("take_away", two(12, 999, ordered=True), "仓库里有{a}吨粮食,运走了{b}吨,还剩多少吨?", "{a}-{b}",
               "还剩{r}吨。", "原有{a}吨减去运走的{b}吨。"),
    arithmetic("speed", two(12, 99), "一辆汽车每小时行驶{a}千米,{b}小时行驶多少千米?", "{a}*{b}",
               "行驶{r}千米。", "速度{a}千米每小时乘时间{b}小时。"),
    arithmetic("discount", discount, "一件衣服原价{a}元,打{d}折后是多少元?", "{a}*{d}/10", "打折后是{r}元。",
               "打{d}折就是原价{a}元乘{d}再除以10。"),
    arithmetic("area", two(12, 99), "长方形的长是{a}米,宽是{b}米,面积是多少平方米?", "{a}*{b}",
               "面积是{r}平方米。", "长{a}米乘宽{b}米。"),
    arithmetic("reading", divisible(3, 40), "{name}每天读{b}页书,读完一本{a}页的书需要多少天?", "{a}/{b}",
               "需要{r}天。", "总页数{a}除以每天{b}页。"),
    arithmetic("groups", divisible(3, 40), "学校有{a}名学生,每{b}人一组,可以分成多少组?", "{a}/{b}",
               "可以分成{r}组。", "学生{a}名除以每组{b}人。"),
    arithmetic("more_than", two(12, 999, ordered=True), "商店下午卖出{a}瓶水,上午卖出{b}瓶,下午比上午多卖多少瓶?",
               "{a}-{b}", "下午多卖{r}瓶。", "下午{a}瓶减去上午{b}瓶。"),
    arithmetic("boxes", two(12, 99), "一箱有{a}个鸡蛋,{b}箱一共有多少个鸡蛋?", "{a}*{b}", "一共有{r}个鸡蛋。",
               "每箱{a}个乘{b}箱。"),
    arithmetic("change", three, "{name}有{a}元,买了一个{b}元的书包和一支{c}元的笔,还剩多少元?", "{a}-{b}-{c}",
               "还剩{r}元。", "{a}元减去书包{b}元,再减去笔{c}元。"),
]


def chinese_date(iso: str) -> str:
    d = datetime.date.fromisoformat(iso)
    return f"{d.year}年{d.month}月{d.day}日"


def a_date(rng: random.Random) -> str:
    return (datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randint(0, 365 * 30))).isoformat()


def date_template(name: str, question: str, days_sign: int) -> Template:
    def draw(rng: random.Random) -> dict:
        return {"date": a_date(rng), "n": rng.randint(2, 400)}

    def make(v: dict) -> tuple[str, ToolCall, Callable[[str], str], str]:
        word = "之后" if days_sign > 0 else "之前"
        return (question.format(d=chinese_date(v["date"]), n=v["n"]),
                ToolCall("date_add", {"date": v["date"], "days": days_sign * v["n"]}),
                lambda r: f"是{chinese_date(r)}。", f"从{chinese_date(v['date'])}{word}数{v['n']}天。")
    return Template(name, "date", draw, make)


def between_template(name: str, question: str) -> Template:
    def draw(rng: random.Random) -> dict:
        return {"start": a_date(rng), "end": a_date(rng)}

    def make(v: dict) -> tuple[str, ToolCall, Callable[[str], str], str]:
        start, end = sorted([v["start"], v["end"]])
        return (question.format(s=chinese_date(start), e=chinese_date(end)),
                ToolCall("date_diff", {"start": start, "end": end}), lambda r: f"相差{r}天。",
                "用结束日期减去开始日期。")
    return Template(name, "date", draw, make)


UNIT_GROUPS: dict[str, list[str]] = {}
for unit, (quantity, _) in UNITS.items():
    UNIT_GROUPS.setdefault(quantity, []).append(unit)


def unit_template(name: str, question: str) -> Template:
    def draw(rng: random.Random) -> dict:
        source, target = rng.sample(UNIT_GROUPS[rng.choice(sorted(UNIT_GROUPS))], 2)
        return {"v": rng.randint(2, 999), "from": source, "to": target}

    def make(v: dict) -> tuple[str, ToolCall, Callable[[str], str], str]:
        return (question.format(v=v["v"], f=v["from"], t=v["to"]),
                ToolCall("unit_convert", {"value": v["v"], "from": v["from"], "to": v["to"]}),
                lambda r: f"{v['v']}{v['from']}等于{r}{v['to']}。", f"把{v['from']}换算成{v['to']}。")
    return Template(name, "unit", draw, make)


def lookup_template(name: str, tool: str, argument: str, question: str, answer: str, reasoning: str) -> Template:
    """A look-up: its draw is a word of the tool's table (tasks() draws it, the table is read at run time)."""
    def make(v: dict) -> tuple[str, ToolCall, Callable[[str], str], str]:
        return (question.format(w=v["word"]), ToolCall(tool, {argument: v["word"]}),
                lambda r: answer.format(w=v["word"], r=r), reasoning)
    return Template(name, "lookup", None, make, tool)


TEMPLATES = {t.name: t for t in ARITHMETIC + [
    date_template("days_after", "{d}之后{n}天是哪一天?", 1),
    date_template("days_before", "{d}之前{n}天是哪一天?", -1),
    between_template("days_between", "从{s}到{e}一共多少天?"),
    unit_template("convert", "{v}{f}等于多少{t}?"),
    unit_template("rope", "一根绳子长{v}{f},合多少{t}?"),
    lookup_template("idiom_lookup", "idiom_meaning", "idiom", "查一下成语“{w}”的意思。", "“{w}”的意思是:{r}",
                    "查成语的意思。"),
    lookup_template("idiom_explain", "idiom_meaning", "idiom", "“{w}”这个成语怎么解释?", "“{w}”的意思是:{r}",
                    "查成语的意思。"),
    lookup_template("char_lookup", "char_reading", "char", "“{w}”字怎么读?", "“{w}”读{r}。", "查这个字的读音。"),
    lookup_template("char_pinyin", "char_reading", "char", "“{w}”的拼音是什么?", "“{w}”读{r}。",
                    "查这个字的读音。"),
]}
# the 'templates' split
HELD_OUT_TEMPLATES = ["more_than", "boxes", "change", "days_before", "rope", "idiom_explain", "char_pinyin"]


def numbers_key(call: ToolCall) -> str:
    """The tool and the numbers its call holds, in order of size: 37*24 and 24*37 under any template share it;
    for a look-up, the word looked up."""
    if call.name in LOOKUPS:
        return call.name + ":" + "".join(map(str, call.arguments.values()))
    numbers = sorted(re.findall(r"\d+(?:\.\d+)?", json.dumps(call.arguments)), key=lambda n: (float(n), n))
    return call.name + ":" + ",".join(numbers)


def numbers_held_out(call: ToolCall) -> bool:
    return zlib.crc32(numbers_key(call).encode()) % 1000 < HELD_OUT_NUMBERS * 1000


def task(template: Template, values: dict, raw_dir: str = RAW_DIR) -> ToolTask:
    question, call, answer, reasoning = template.make(values)
    result = run_tool(call.name, call.arguments, builtin_tools(raw_dir))
    if result.startswith("error"):
        raise ValueError(f"template {template.name} made a failing call {call}: {result}")
    return ToolTask(template.kind, template.name, question, call, result, answer(result), reasoning)


def lookup_words(raw_dir: str) -> dict[str, list[str]]:
    """For each look-up tool whose table is under raw_dir, the words its tasks may ask (short values only)."""
    words = {}
    for tool in LOOKUPS:
        try:
            table = lookup_table(tool, raw_dir)
        except ToolError:
            continue
        words[tool] = sorted(w for w, value in table.items() if len(value) <= MAX_LOOKUP_CHARS)
    return words


def missing_lookups(raw_dir: str) -> str | None:
    """A line naming the look-ups left out of the tasks for want of their tables, or None."""
    missing = [tool for tool in LOOKUPS if tool not in lookup_words(raw_dir)]
    if not missing:
        return None
    return ("look-up tool tasks left out (" + ", ".join(missing) + "): no table at "
            + ", ".join(lookup_path(tool, raw_dir) for tool in missing) + "; run `python download_data.py --sources="
            + ",".join(LOOKUPS[tool][0] for tool in missing) + "`")


def tasks(split: str, n: int, seed: int = 0, raw_dir: str | None = None) -> Iterator[ToolTask]:
    """n tasks of a split: 'train' (the other templates, numbers not held out), 'numbers' (the same
    templates, held-out numbers) or 'templates' (the held-out templates, any numbers). With raw_dir, the
    look-ups whose tables are there (lookup_words) are among them."""
    if split not in ("train", "numbers", "templates"):
        raise ValueError(f"unknown split {split!r} (train, numbers, templates)")
    words = lookup_words(raw_dir) if raw_dir is not None else {}
    names = [name for name, t in TEMPLATES.items() if (name in HELD_OUT_TEMPLATES) == (split == "templates")
             and (not t.lookup or t.lookup in words)]
    rng = random.Random(f"{split}:{seed}")
    made = 0
    while made < n:
        template = TEMPLATES[rng.choice(names)]
        values = {"word": rng.choice(words[template.lookup])} if template.lookup else template.draw(rng)
        t = task(template, values, raw_dir or RAW_DIR)
        if split != "templates" and numbers_held_out(t.call) != (split == "numbers"):
            continue
        made += 1
        yield t


def offered_tools(lookups: bool) -> list[str]:
    """The names of the tools a task's prompt may offer: the computing ones, and the look-ups when their tasks
    are asked for. Spelled by our tokenizer, six signatures and a call overflow the demo model's 256-token
    window (docs/13_tools.md), so the look-ups are only offered where they are trained and scored."""
    return [name for name in BUILTIN if lookups or name not in LOOKUPS]


def tools_for_training(rng: random.Random, right: str, lookups: bool = False) -> list[dict]:
    """The right tool and some of the other offered ones, in a random order (evaluation offers all of them)."""
    others = [name for name in offered_tools(lookups) if name != right]
    names = [right] + rng.sample(others, rng.randint(0, len(others)))
    rng.shuffle(names)
    return [BUILTIN[name].spec() for name in names]


def all_tools(lookups: bool = False) -> list[dict]:
    """Every offered tool, as evaluation and GRPO put them in the prompt."""
    return [BUILTIN[name].spec() for name in offered_tools(lookups)]


SCORES = ("valid_call", "right_tool", "right_arguments", "right_answer", "right_answer_without_tools")  # eval.py


def score_call(t: ToolTask, answer: Answer, tools: dict[str, Tool] = BUILTIN) -> dict[str, bool]:
    """Whether the answer made a call that parses, to the right tool, whose result is the task's (arguments
    that compute the same, e.g. 24*37 for 37*24, are right)."""
    call = answer.tool_calls[0] if answer.tool_calls else None
    right_tool = call is not None and call.name == t.call.name
    return {"valid_call": call is not None, "right_tool": right_tool,
            "right_arguments": right_tool and run_tool(call.name, call.arguments, tools) == t.result}
