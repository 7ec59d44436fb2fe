"""Text cleaning: NFKC, control characters, whitespace, and the People's Daily tag marks, one text at a
time (clean_text, the definition) or a batch in a few numpy passes (clean_texts, strip_pku_tags; tests
check that they equal the one-at-a-time forms)."""
from __future__ import annotations

import functools
import re
import unicodedata

import numpy as np

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


def strip_pku_tags(lines: list[str]) -> list[str]:
    r"""Each line without its PKU tags (`/` then ASCII letters, an optional `]` and more letters), `[`
    and whitespace: what re.sub(r"/[A-Za-z]+\]?[A-Za-z]*|\[|\s", "", line) gives, for many lines in a
    few numpy passes (the regex pays for each of the million tags of People's Daily)."""
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
