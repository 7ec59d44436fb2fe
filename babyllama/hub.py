"""The seed's public corpora from the Hugging Face hub (datasets repos), through huggingface_hub: resumable
(an interrupted file continues where it stopped), verified (size, and sha256 for files the hub stores in
LFS or Xet, git's blob hash for the others), idempotent, recorded in data/raw/<source>/SOURCE.json (repo,
the commit downloaded, files with their sha256, licence).

HF_ENDPOINT (or download_data.py --mirror) points it at a mirror, e.g. https://hf-mirror.com from
mainland China.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass

from babyllama.common import write_json_atomic
from babyllama.errors import UsageError

DEFAULT_ENDPOINT = "https://huggingface.co"
MIRROR_HINT = "behind a firewall or in mainland China use a mirror: --mirror=https://hf-mirror.com (or set HF_ENDPOINT)"


@dataclass(frozen=True)
class HubSource:
    repo: str  # a datasets repo
    files: tuple[str, ...]  # paths inside it
    fmt: str  # the data_process.py / sft_data_process.py format of its files
    licence: str  # as the dataset card states it (the card's own field wins when it has one)
    revision: str = "main"


# Names, repos and files as the README's data table lists them.
HUB_SOURCES: dict[str, HubSource] = {
    "wikipedia_cn": HubSource("pleisto/wikipedia-cn-20230720-filtered", ("wikipedia-cn-20230720-filtered.json",),
                              "wikipedia", "cc-by-sa-3.0"),
    "medical": HubSource("shibing624/medical", ("pretrain/train_encyclopedia.json", "pretrain/medical_book_zh.json"),
                         "medical", "apache-2.0"),
    # mC4's Chinese part (the seed's C4_zh): 4 of its 1,024 training shards, JSON lines in gzip, at the commit
    # that added the multilingual set (later commits renamed its files).
    "c4_zh": HubSource("allenai/c4", tuple(f"multilingual/c4-zh.tfrecord-{i:05d}-of-01024.json.gz" for i in range(4)),
                       "c4", "odc-by", revision="1ddc917116b730e1859edef32896ec5c16be51d0"),
    "alpaca_zh": HubSource("shibing624/alpaca-zh", ("alpaca_gpt4_data_zh.json",), "alpaca", "cc-by-nc-4.0"),
    "belle": HubSource("BelleGroup/train_1M_CN", ("Belle_open_source_1M.json",), "belle", "gpl-3.0"),
}


class HubError(UsageError):
    pass


def endpoint(mirror: str = "") -> str:
    return (mirror or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def file_hashes(path: str) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, read once."""
    sha256, blob = hashlib.sha256(), hashlib.sha1()
    blob.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            blob.update(chunk)
    return sha256.hexdigest(), blob.hexdigest()


def verify(path: str, size: int | None, etag: str | None) -> str:
    """The file's sha256, or HubError (and the file removed) when its size or hash is not the hub's."""
    problem = None
    if size is not None and os.path.getsize(path) != size:
        problem = f"{os.path.getsize(path):,} bytes where the hub has {size:,}"
    sha256, blob = file_hashes(path)
    if problem is None and etag and re.fullmatch(r"[0-9a-f]{64}", etag) and sha256 != etag:
        problem = f"sha256 {sha256[:12]}... where the hub has {etag[:12]}..."
    if problem is None and etag and re.fullmatch(r"[0-9a-f]{40}", etag) and blob != etag:
        problem = f"git hash {blob[:12]}... where the hub has {etag[:12]}..."
    if problem:
        os.remove(path)
        raise HubError(f"{path}: {problem}: the download is corrupted and was removed; run again")
    return sha256


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def fetch_hub(name: str, raw_dir: str, mirror: str = "") -> str:
    """Download source `name` into raw_dir/name (nothing to do when SOURCE.json says it is there)."""
    from huggingface_hub import HfApi
    source, url = HUB_SOURCES[name], endpoint(mirror)
    target = os.path.join(raw_dir, name)
    record_path = os.path.join(target, "SOURCE.json")
    if os.path.isfile(record_path) and _still_there(target, record_path):
        return f"{name}: already in {target}"
    where = f"{url}/datasets/{source.repo}"
    try:
        info = HfApi(endpoint=url).dataset_info(source.repo, revision=source.revision)
        files = [download_file(source.repo, path, info.sha, url, target) for path in source.files]
    except HubError:
        raise
    except Exception as e:  # whatever the network or the hub answered: one line, with the way out
        raise HubError(f"cannot download {name} from {where}: {_reason(e)}; {MIRROR_HINT}") from None
    card = info.card_data
    licence = card.get("license") if card is not None and hasattr(card, "get") else None
    write_json_atomic(record_path, {"source": name, "repo": source.repo, "revision": info.sha, "endpoint": url,
                                    "files": files, "licence": licence or source.licence, "format": source.fmt,
                                    "downloaded": time.strftime("%Y-%m-%d %H:%M:%S")})
    return f"{name}: {len(files)} file(s) from {where}@{info.sha[:10]} verified in {target}"


def download_file(repo: str, path: str, commit: str, url: str, target: str) -> dict:
    """One file of the repo at that commit into target/path, continuing target/path.part when an earlier run
    was interrupted (huggingface_hub's own downloads start over in a new process); verified, then renamed."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers
    meta = get_hf_file_metadata(hf_hub_url(repo, path, repo_type="dataset", revision=commit, endpoint=url))
    dest = os.path.join(target, path)
    part = dest + ".part"
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(part, "ab") as f:
        done = f.tell()
        if meta.size is not None and done > meta.size:  # not a prefix of this file: start over
            f.truncate(0)
            done = 0
        http_get(meta.location, f, resume_size=done, headers=build_hf_headers(), expected_size=meta.size,
                 displayed_filename=path)
    sha256 = verify(part, meta.size, meta.etag)
    os.replace(part, dest)
    return {"path": path, "size": os.path.getsize(dest), "sha256": sha256}


def _still_there(target: str, record_path: str) -> bool:
    """SOURCE.json's files are all there with their sizes (a cheap check; the hashes were checked then)."""
    with open(record_path, encoding="utf-8") as f:
        record = json.load(f)
    paths = [(os.path.join(target, e["path"]), e["size"]) for e in record["files"]]
    return all(os.path.isfile(path) and os.path.getsize(path) == size for path, size in paths)
