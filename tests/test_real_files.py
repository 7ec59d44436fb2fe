"""Files as the world sends them: saved by Windows editors (byte-order mark, CRLF), in GBK, empty, or
with entries that have nothing but a title. No record is lost silently: every document read is kept or
dropped with a precise reason, and every kept one is in the .bin exactly once."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from babyllama.cleaning import clean_text
from babyllama.corpora import CorpusError, parse_input, read_input
from chatglm_tokenizer import load_tokenizer
from data_process import Config, process
from dataset import bin_files

BOM = "\ufeff"
TEXTS = ["今年全国粮食产量再创新高，农民收入稳步增长。", "中国人民银行宣布下调存款准备金率，保持流动性合理充裕。",
         "床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
         "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。", "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。"]


def write(path, text: str, encoding: str = "utf-8") -> str:
    with open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return str(path)


def files_of_every_format(folder, prefix: str = BOM, newline: str = "\n") -> dict[str, str]:
    """The same six documents in each format, each file starting with `prefix`, lines ending in `newline`."""
    records = [{"text": t} for t in TEXTS]
    return {
        "txt": write(folder / "a.txt", prefix + newline.join(TEXTS) + newline),
        "jsonl": write(folder / "a.jsonl", prefix + newline.join(json.dumps(r, ensure_ascii=False) for r in records)
                       + newline),
        "json": write(folder / "a.json", prefix + json.dumps(records, ensure_ascii=False, indent=2)
                      .replace("\n", newline)),
        "wikipedia": write(folder / "wiki.json", prefix + json.dumps([{"completion": t} for t in TEXTS],
                                                                      ensure_ascii=False, indent=2)),
        "wudao": write(folder / "wudao.json", prefix + json.dumps([{"title": "标题", "content": t} for t in TEXTS],
                                                                   ensure_ascii=False)),
        "baidubaike": write(folder / "bk.json", prefix + newline.join(
            json.dumps({"title": "词条", "summary": t, "sections": []}, ensure_ascii=False) for t in TEXTS)
            + newline),
        "csv": write(folder / "a.csv", prefix + "text" + newline + newline.join(TEXTS) + newline),
    }


def docs(fmt: str, path: str) -> list:
    return list(read_input(parse_input(f"{fmt}:{path}")))


@pytest.mark.parametrize("prefix,newline", [(BOM, "\n"), (BOM, "\r\n"), ("", "\r\n")],
                         ids=["bom", "bom-crlf", "crlf"])
def test_every_format_reads_every_record_with_bom_and_crlf(tmp_path, prefix, newline):
    for fmt, path in files_of_every_format(tmp_path, prefix, newline).items():
        read = docs(fmt, path)
        assert [d.error for d in read] == [None] * len(TEXTS), (fmt, read[:2])
        assert all(TEXTS[i] in read[i].text and BOM not in read[i].text for i in range(len(TEXTS))), fmt


def test_empty_files_are_zero_documents_with_a_warning(tmp_path, capsys):
    for fmt, path in files_of_every_format(tmp_path).items():
        write(path, "")
        assert docs(fmt, path) == [], fmt
        assert f"warning: {path} is empty" in capsys.readouterr().err, fmt


def test_gbk_file_is_read_with_encoding_and_a_one_line_error_without(tmp_path, small_tokenizer):
    bodies = {"csv": "text\n" + "\n".join(TEXTS), "txt": "\n".join(TEXTS),
              "jsonl": "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in TEXTS)}
    for fmt, body in bodies.items():
        path = write(tmp_path / f"gbk.{fmt}", body, encoding="gbk")
        with pytest.raises(CorpusError, match=f"{path}: not UTF-8 text .*--encoding=gb18030"):
            docs(fmt, path)
        with pytest.raises(CorpusError, match="--encoding=gbk2: not an encoding"):
            list(read_input(parse_input(f"{fmt}:{path}"), encoding="gbk2"))
        read = list(read_input(parse_input(f"{fmt}:{path}"), encoding="gb18030"))  # when the user says so
        assert [d.text for d in read] == TEXTS, fmt
    result = subprocess.run([sys.executable, os.path.join(ROOT, "data_process.py"), "--sources=",
                             f"--inputs=csv:{tmp_path / 'gbk.csv'}", f"--out_dir={tmp_path / 'out'}",
                             f"--tokenizer={small_tokenizer}"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the progress bar: one line naming the file
    assert last.startswith("error: ") and "gbk.csv: not UTF-8" in last and result.stderr.count("error") == 1


def test_title_only_entries_are_empty_not_malformed(tmp_path, small_tokenizer):
    lines = [{"title": "只有标题"}, {"title": "词条", "summary": TEXTS[0], "sections": []}, "not an object"]
    path = write(tmp_path / "bk.json", BOM + "\r\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\r\n")
    meta = process(Config(sources="", inputs=f"baidubaike:{path}", out_dir=str(tmp_path / "out"),
                      tokenizer=small_tokenizer, workers=0))
    assert meta["sources"]["baidubaike:bk.json"] == {"read": 3, "kept": 1, "dropped_empty": 1, "dropped_malformed": 1}


def test_documents_read_are_kept_or_dropped_and_each_kept_one_is_in_the_bin_once(tmp_path, small_tokenizer):
    paths = files_of_every_format(tmp_path, BOM, "\r\n")
    inputs = ",".join(f"{fmt}:{path}" for fmt, path in paths.items())
    cfg = Config(sources="", inputs=inputs, out_dir=str(tmp_path / "out"), tokenizer=small_tokenizer, workers=2,
                 val_fraction=0.3, near_dedup=False)
    meta = process(cfg)
    for counts in meta["sources"].values():
        assert counts["read"] == len(TEXTS)
        assert counts["read"] == counts.get("kept", 0) + sum(v for k, v in counts.items() if k.startswith("dropped_"))
    tok = load_tokenizer(small_tokenizer)
    decoded = []
    for f in bin_files(cfg.out_dir, "train") + bin_files(cfg.out_dir, "val"):
        stream = np.fromfile(f, dtype=np.uint16)
        ends = np.flatnonzero(stream == tok.eos_id)
        decoded += [tok.decode(part.tolist()) for part in np.split(stream, ends + 1)[:-1]]
    # The same six texts in seven files: kept once (the first file), dropped as exact duplicates
    # elsewhere, except wudao's and BaiduBaiKe's, whose titles make them other documents.
    expected = [clean_text(t) for t in TEXTS] + [clean_text(f"标题\n{t}") for t in TEXTS] + \
        [clean_text(f"词条\n{t}") for t in TEXTS]
    assert sorted(decoded) == sorted(expected)
    assert sum(c.get("kept", 0) for c in meta["sources"].values()) == len(decoded)


def test_sft_data_process_reads_gbk_with_encoding_and_a_one_line_error_without(tmp_path):
    from sft_data_process import Config as SFTConfig
    from sft_data_process import build as sft_run
    records = [{"instruction": t[:8], "input": "", "output": t} for t in TEXTS]
    path = write(tmp_path / "gbk.json", json.dumps(records, ensure_ascii=False), encoding="gbk")
    settings = dict(builtin="", preference="", inputs=f"alpaca:{path}", out_dir=str(tmp_path / "out"))
    with pytest.raises(CorpusError, match=f"{path}: not UTF-8 text .*--encoding=gb18030"):
        sft_run(SFTConfig(**settings))
    assert not os.path.exists(tmp_path / "out" / "sft_data.csv.tmp")  # the failed run left nothing
    meta = sft_run(SFTConfig(**settings, encoding="gb18030"))
    assert meta["sources"][f"alpaca:{os.path.basename(path)}"] == {"read": 6, "kept": 6}


def test_an_edit_that_keeps_size_and_time_is_seen(tmp_path, small_tokenizer):
    path = write(tmp_path / "a.txt", "\n".join(TEXTS) + "\n")
    cfg = Config(sources="", inputs=f"txt:{path}", out_dir=str(tmp_path / "out"), tokenizer=small_tokenizer, workers=0)
    process(cfg)
    stat = os.stat(path)
    write(path, "\n".join(TEXTS).replace("明月", "白云") + "\n")  # same size in bytes
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    with pytest.raises(CorpusError, match="already holds a corpus made from other inputs"):
        process(cfg)


def test_a_failed_run_keeps_the_old_corpus_and_leaves_no_temp_files(tmp_path, small_tokenizer):
    good = write(tmp_path / "a.txt", "\n".join(TEXTS) + "\n")
    bad = tmp_path / "b.txt"  # UTF-8 text that ends in bytes that are not
    bad.write_bytes(("\n".join(TEXTS[:3]) + "\n").encode() + b"\xff\xfe\n")
    out = tmp_path / "out"
    process(Config(sources="", inputs=f"txt:{good}", out_dir=str(out), tokenizer=small_tokenizer, workers=0))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    with pytest.raises(CorpusError, match="not UTF-8"):
        process(Config(sources="", inputs=f"txt:{good},txt:{bad}", out_dir=str(out), tokenizer=small_tokenizer,
                   workers=0, overwrite=True))
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_leftovers_of_a_killed_run_are_removed_and_nothing_else(tmp_path, small_tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    leftovers = ["train.bin.tmp", "val.bin.tmp", "meta.json.tmp", f"ckpt_0000010.pt.tmp{dead}"]
    kept = [f"ckpt_0000010.pt.tmp{os.getpid()}", "notes.tmp", "my.bin"]  # a live writer's; the user's
    for name in leftovers + kept:
        (out / name).write_bytes(b"x")
    path = write(tmp_path / "a.txt", "\n".join(TEXTS) + "\n")
    process(Config(sources="", inputs=f"txt:{path}", out_dir=str(out), tokenizer=small_tokenizer, workers=0))
    from babyllama.common import remove_stale_temps
    assert remove_stale_temps(str(out), ["ckpt*.pt"]) == [str(out / f"ckpt_0000010.pt.tmp{dead}")]
    assert sorted(os.listdir(out)) == sorted(kept + ["train.bin", "val.bin", "meta.json"])


def test_gzip_json_lines_are_read_as_they_decompress_and_a_truncated_one_is_one_line(tmp_path, small_tokenizer):
    """C4's shards are .json.gz: read like the plain file; a download cut short names the file, once."""
    import gzip
    body = "\n".join(json.dumps({"text": t, "url": "http://x"}, ensure_ascii=False) for t in TEXTS * 50) + "\n"
    plain = write(tmp_path / "c4.jsonl", body)
    packed = tmp_path / "c4-zh.tfrecord-00000-of-01024.json.gz"
    packed.write_bytes(gzip.compress(body.encode()))
    assert [d.text for d in docs("c4", str(packed))] == [d.text for d in docs("c4", plain)]
    assert parse_input(str(packed)).fmt == "json"  # the extension under .gz decides
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(packed.read_bytes()[:len(packed.read_bytes()) // 2])
    assert parse_input(str(cut)).fmt == "jsonl"
    with pytest.raises(CorpusError, match=f"{cut}: damaged or truncated gzip file"):
        docs("c4", str(cut))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "data_process.py"), "--sources=",
                             f"--inputs=c4:{cut}", f"--out_dir={tmp_path / 'out'}", f"--tokenizer={small_tokenizer}"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "cut.jsonl.gz: damaged or truncated gzip file" in last
    assert not (tmp_path / "out" / "train.bin").exists()
