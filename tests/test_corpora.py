import json
import random
import re

import pytest

from babyllama.cleaning import clean_text, strip_pku_tags
from babyllama.corpora import CorpusError, parse_input, read_input, read_peoples_daily


def docs_of(spec: str):
    return list(read_input(parse_input(spec)))


def texts(docs):
    return [d.text for d in docs if d.error is None]


def test_wikipedia_cn(tmp_path):
    f = tmp_path / "wiki.json"
    f.write_text(json.dumps([{"completion": "维基百科一"}, {"completion": "维基百科二"}], ensure_ascii=False))
    assert texts(docs_of(f"wikipedia:{f}")) == ["维基百科一", "维基百科二"]


def test_baidubaike_keeps_every_section_and_the_last_record(tmp_path):
    f = tmp_path / "baike.json"
    rows = [{"title": f"词条{i}", "summary": f"摘要{i}",
             "sections": [{"title": "历史", "content": f"历史{i}"}, {"title": "现状", "content": f"现状{i}"}]}
            for i in range(3)]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    out = texts(docs_of(f"baidubaike:{f}"))
    assert len(out) == 3
    assert out[2] == "词条2\n摘要2\n历史\n历史2\n现状\n现状2"


def test_c4_medical_jsonl_and_a_malformed_line(tmp_path):
    f = tmp_path / "c4.jsonl"
    f.write_text('{"text": "第一行"}\n{"text": broken\n\n{"text": "第三行"}\n[1, 2]\n')
    docs = docs_of(f"c4:{f}")
    assert texts(docs) == ["第一行", "第三行"]
    errors = [(d.where, d.error) for d in docs if d.error]
    assert errors[0][0] == f"{f}:2" and "malformed JSON" in errors[0][1]
    assert errors[1][0] == f"{f}:5" and "not a JSON object" in errors[1][1]
    assert texts(docs_of(f"medical:{f}")) == ["第一行", "第三行"]


def test_wudao_title_and_content(tmp_path):
    f = tmp_path / "wudao.json"
    f.write_text(json.dumps([{"title": "标题", "content": "正文"}, {"title": "无正文"}], ensure_ascii=False))
    docs = docs_of(f"wudao:{f}")
    assert texts(docs) == ["标题\n正文"]
    assert "missing" in docs[1].error and docs[1].where.endswith("record 1")


def test_generic_formats(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("一行\n\n二行\n三行\n")
    assert texts(docs_of(str(txt))) == ["一行", "二行", "三行"]
    assert texts(docs_of(f"txt_blocks:{txt}")) == ["一行", "二行\n三行"]
    js = tmp_path / "b.jsonl"
    js.write_text('{"content": "内容"}\n')
    assert texts(docs_of(f"jsonl:{js}:content")) == ["内容"]
    csv = tmp_path / "c.csv"
    csv.write_text('id,body\n1,"正文,带逗号"\n2,第二\n')
    assert texts(docs_of(f"csv:{csv}:body")) == ["正文,带逗号", "第二"]


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    f = tmp_path / "d.parquet"
    pd.DataFrame({"body": ["甲", "乙"]}).to_parquet(f)
    assert texts(docs_of(f"parquet:{f}:body")) == ["甲", "乙"]


def test_named_field_that_no_record_has(tmp_path):
    f = tmp_path / "c4.jsonl"
    f.write_text('{"text": "x"}\n')
    with pytest.raises(CorpusError, match="no record has 'content'"):
        docs_of(f"jsonl:{f}:content")
    csv = tmp_path / "c.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(CorpusError, match="no column 'text'"):
        docs_of(f"csv:{csv}:text")


def test_unreadable_inputs(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        parse_input(f"jsonl:{tmp_path}/missing.jsonl")
    with pytest.raises(CorpusError, match="unknown format"):
        parse_input(str(tmp_path))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        docs_of(str(bad))
    broken = tmp_path / "list.json"
    broken.write_text('[{"completion": "a"},')
    with pytest.raises(CorpusError, match="malformed JSON"):
        docs_of(f"wikipedia:{broken}")
    for spec in ("json", "jsonl", "wikipedia"):  # the first bytes are read to tell a list from lines
        utf16 = tmp_path / f"utf16_{spec}.json"
        utf16.write_bytes('[{"text": "一"}]'.encode("utf-16"))
        with pytest.raises(CorpusError, match="not UTF-8"):
            docs_of(f"{spec}:{utf16}")


def test_peoples_daily_loses_tags_brackets_and_spaces(tmp_path):
    path = tmp_path / "199801.txt"
    path.write_text("19980101-01-001-001/m  迈向/v  [中国/ns  政府/n]nt  １/m  张/q\n\n"
                    "新/a  世纪/n  \u3000/w  1/2/m\n", encoding="utf-8")
    docs = list(read_peoples_daily(str(path), "pd"))
    assert [d.text for d in docs] == ["19980101-01-001-001迈向中国政府１张", "新世纪1/2"]
    assert [d.where for d in docs] == [f"{path}:1", f"{path}:3"]  # the blank line is no document


@pytest.mark.parametrize("seed", range(3))
def test_strip_pku_tags_equals_the_regex(seed):
    """The numpy passes remove what the regex does, on lines full of slashes, brackets, letters and
    every kind of whitespace, a tag cut by the end of a line included."""
    pattern = re.compile(r"/[A-Za-z]+\]?[A-Za-z]*|\[|\s")
    alphabet = list("/[]aZq中1 \t\u3000\x1c\x85") + ["\ud800", "😀"]
    rng = random.Random(seed)
    for _ in range(500):
        lines = ["".join(rng.choices(alphabet, k=rng.randint(0, 12))) for _ in range(rng.randint(1, 6))]
        assert strip_pku_tags(lines) == [pattern.sub("", line) for line in lines]


def test_clean_text():
    raw = "\ufeffＡＢＣ１２３\u3000全角　空格\x00\x07\r\n\r\n\r\n\n  第二段   多个   空格  \t\n"
    assert clean_text(raw) == "ABC123 全角 空格\n\n第二段 多个 空格"


CLEANING_CASES = ["e\u200d\u0301x", "ｅ\u0301", "\u1100\u1161", "Å\r\nB\rC", "𝐀𝐁 ①", "ﾊﾟ", "ﬁ",
                  "\u3000全角　空格\t，？！", "\x00ab\x85c\ufeff", "e\u0301", "正常的中文句子。",
                  "坏\ud800代理\udfff对", "\ud83d\ude00", "½ ㈠ ㎏"]


@pytest.mark.parametrize("text", CLEANING_CASES)
def test_clean_text_fast_path_is_nfkc(text):
    """The one-pass translation must give what NFKC followed by dropping controls gives."""
    import unicodedata

    from babyllama.cleaning import _BLANK_LINES_RE, _CONTROL_RE, _LINE_EDGES_RE, _SPACES_RE
    expected = _CONTROL_RE.sub("", unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n"))
    expected = _BLANK_LINES_RE.sub("\n\n", _LINE_EDGES_RE.sub("\n", _SPACES_RE.sub(" ", expected))).strip()
    assert clean_text(text) == expected


def test_clean_texts_equals_clean_text_one_by_one():
    """The batched cleaning (one numpy pass) gives clean_text's result for every text, also where a
    text ends in "\\r" and the next starts with "\\n", and drops lone surrogates (json.loads makes them
    from "\\ud800"; sentencepiece cannot encode them)."""
    from babyllama.cleaning import clean_texts
    texts = CLEANING_CASES + ["a\r", "\nb", "", "\r", "\n\r", "  lead\t\ttabs  \n  \n\n\n\nend  ", "\u3000"]
    texts += ["".join(texts), "人民日报，１９９８年。" * 50]
    assert clean_texts(texts) == [clean_text(t) for t in texts]
    assert clean_texts([]) == []
    assert clean_text("坏\ud800代理\udfff对") == "坏代理对"


def write_parquet(path, rows: int, row_group: int, chars: int, seed: int = 0) -> None:
    """rows documents of `chars` random CJK characters each (incompressible), row_group rows at a time."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能"
                             .encode(), dtype=np.uint8).reshape(-1, 3)  # 3 bytes each in UTF-8
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            data = alphabet[rng.integers(0, len(alphabet), n * chars)].tobytes()
            offsets = np.arange(n + 1, dtype=np.int32) * (3 * chars)
            texts = pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data))
            writer.write_table(pa.table({"id": np.arange(start, start + n), "text": texts}, schema=schema))


def test_parquet_is_read_a_row_group_at_a_time_with_the_same_documents(tmp_path):
    import pandas as pd
    path = tmp_path / "shards.parquet"
    write_parquet(path, rows=5000, row_group=700, chars=50)
    whole = pd.read_parquet(path, columns=["text"])["text"].tolist()
    streamed = docs_of(f"parquet:{path}:text")
    assert [d.text for d in streamed] == whole and streamed[-1].where.endswith(":row 5000")


PEAK_RSS = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from babyllama.corpora import parse_input, read_input
docs = read_input(parse_input("parquet:" + sys.argv[2] + ":text"))
first = next(docs)  # everything imported and the file opened
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
n, chars = 1, len(first.text)
for doc in docs:
    n, chars = n + 1, chars + len(doc.text)
print(n, chars, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_a_parquet_file_larger_than_the_memory_bound_streams(tmp_path):
    """A 1.2 GB parquet file (row groups of 15 MB) is read with less than 256 MiB more memory than reading its
    first row takes."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    path = tmp_path / "big.parquet"
    write_parquet(path, rows=2_000_000 // 5, row_group=5_000, chars=1000)  # 400k rows of 1,000 CJK chars
    size = os.path.getsize(path)
    assert size > 1_000_000_000
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, ROOT, str(path)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows, chars, first_mib, peak_mib = map(int, result.stdout.split())
    assert rows == 400_000 and chars == 400_000_000
    assert peak_mib - first_mib < 256, f"peak RSS {peak_mib} MiB ({first_mib} after the first row)"
