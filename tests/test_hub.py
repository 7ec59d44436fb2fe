"""Hub downloads (hub.py, download_data.py) against a local HTTP server that answers in the Hugging Face hub's
URL layout, so that huggingface_hub's own code runs, pointed at it by HF_ENDPOINT: a download, an
interrupted one resumed, a corrupted file found by its hash, an endpoint that cannot be reached. No test
touches the internet."""
import gzip
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ROOT

pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(ThreadingHTTPServer):
    """Datasets repos {repo: {path: bytes}}; `corrupt` paths are served with other bytes than their hash
    says; `stall` paths send 12 MB on the first GET and then nothing. Requests are logged."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.repos, self.corrupt, self.stall, self.log = repos, set(), set(), []
        self.release = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def send_json(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.log.append(("GET", self.path, self.headers.get("Range")))
        info = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/revision/([^/?]+)(\?.*)?", self.path)
        if info:
            files = self.server.repos.get(info[1])
            if files is None:
                return self.send_json({"error": "Repository not found"}, 404)
            return self.send_json({"id": info[1], "sha": COMMIT, "cardData": {"license": "cc-by-4.0"},
                                   "siblings": [{"rfilename": p} for p in files]})
        self.resolve(send_body=True)

    def do_HEAD(self) -> None:
        self.server.log.append(("HEAD", self.path, None))
        self.resolve(send_body=False)

    def resolve(self, send_body: bool) -> None:
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
        data = self.server.repos.get(m[1], {}).get(m[3]) if m else None
        if data is None:
            return self.send_json({"error": "Entry not found"}, 404)
        sha256 = hashlib.sha256(data).hexdigest()
        if m[3] in self.server.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        start = int(re.match(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-"))[1])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{sha256}"')
        self.send_header("X-Linked-Etag", f'"{sha256}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not send_body:
            return
        if m[3] in self.server.stall and not start:
            self.server.stall.discard(m[3])
            self.wfile.write(data[:12 << 20])  # more than huggingface_hub's 10 MB chunk: one is written
            self.wfile.flush()
            self.server.release.wait(60)  # until the test has killed the downloader
            return
        self.wfile.write(data[start:])


WIKI = json.dumps([{"completion": f"第{i}篇百科条目，内容是关于中国历史与文化的介绍。" * 20} for i in range(300)],
                  ensure_ascii=False).encode()
C4_SHARDS = {f"multilingual/c4-zh.tfrecord-{i:05d}-of-01024.json.gz": gzip.compress("".join(
    json.dumps({"text": f"第{i}个分片的第{j}篇网页，讲的是城市里的新鲜事和生活常识。" * 5, "url": "http://x"},
               ensure_ascii=False) + "\n" for j in range(50)).encode()) for i in range(4)}
ALPACA = json.dumps([{"instruction": "你好", "input": "", "output": "你好！"}], ensure_ascii=False).encode()


@pytest.fixture
def hub():
    server = FakeHub({"pleisto/wikipedia-cn-20230720-filtered": {"wikipedia-cn-20230720-filtered.json": WIKI},
                      "shibing624/alpaca-zh": {"alpaca_gpt4_data_zh.json": ALPACA}, "allenai/c4": C4_SHARDS})
    yield server
    server.shutdown()


def download(raw_dir, *flags, endpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_ETAG_TIMEOUT": "5",
           "HF_HUB_DOWNLOAD_TIMEOUT": "5", "HF_HOME": str(raw_dir / "hf_home")}
    env.pop("HF_ENDPOINT", None)
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return subprocess.run([sys.executable, os.path.join(ROOT, "download_data.py"), f"--raw_dir={raw_dir}", *flags],
                          capture_output=True, text=True, timeout=120, env=env)


def test_download_verifies_records_and_is_idempotent(hub, tmp_path):
    result = download(tmp_path, "--sources=wikipedia_cn,alpaca_zh", endpoint=hub.url)
    assert result.returncode == 0, result.stderr[-2000:]
    path = tmp_path / "wikipedia_cn" / "wikipedia-cn-20230720-filtered.json"
    assert path.read_bytes() == WIKI
    record = json.loads((tmp_path / "wikipedia_cn" / "SOURCE.json").read_text())
    assert record["repo"] == "pleisto/wikipedia-cn-20230720-filtered" and record["revision"] == COMMIT
    assert record["files"] == [{"path": "wikipedia-cn-20230720-filtered.json", "size": len(WIKI),
                                "sha256": hashlib.sha256(WIKI).hexdigest()}]
    assert record["licence"] == "cc-by-4.0" and record["endpoint"] == hub.url
    gets = len([r for r in hub.log if r[0] == "GET"])
    again = download(tmp_path, "--sources=wikipedia_cn,alpaca_zh", endpoint=hub.url)
    assert again.returncode == 0 and "already in" in again.stdout
    assert len([r for r in hub.log if r[0] == "GET"]) == gets  # nothing fetched twice


def test_mirror_flag_sets_the_endpoint(hub, tmp_path):
    result = download(tmp_path, "--sources=alpaca_zh", f"--mirror={hub.url}", endpoint="http://127.0.0.1:9")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "alpaca_zh" / "alpaca_gpt4_data_zh.json").read_bytes() == ALPACA


def test_a_killed_download_resumes_where_it_stopped(hub, tmp_path):
    big = os.urandom(24 << 20)
    hub.repos["pleisto/wikipedia-cn-20230720-filtered"]["wikipedia-cn-20230720-filtered.json"] = big
    hub.stall.add("wikipedia-cn-20230720-filtered.json")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "download_data.py"), f"--raw_dir={tmp_path}",
                             "--sources=wikipedia_cn"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "wikipedia_cn" / "wikipedia-cn-20230720-filtered.json.part"
    deadline = time.time() + 60
    while time.time() < deadline and not (partial.exists() and partial.stat().st_size >= 10 << 20):
        time.sleep(0.1)
    proc.kill()  # mid-file, as a closed laptop or a Ctrl-C would
    proc.wait()
    hub.release.set()
    assert partial.stat().st_size >= 10 << 20
    result = download(tmp_path, "--sources=wikipedia_cn", endpoint=hub.url)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "wikipedia_cn" / "wikipedia-cn-20230720-filtered.json").read_bytes() == big
    ranges = [r[2] for r in hub.log if r[0] == "GET" and "resolve" in r[1] and r[2]]
    assert ranges and int(re.match(r"bytes=(\d+)-", ranges[-1])[1]) >= 10 << 20  # continued, not restarted


def test_a_corrupted_file_is_found_by_its_hash_and_removed(hub, tmp_path):
    hub.corrupt.add("wikipedia-cn-20230720-filtered.json")
    result = download(tmp_path, "--sources=wikipedia_cn", endpoint=hub.url)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "wikipedia-cn-20230720-filtered.json" in last and "sha256" in last
    assert not (tmp_path / "wikipedia_cn" / "wikipedia-cn-20230720-filtered.json").exists()
    assert not (tmp_path / "wikipedia_cn" / "SOURCE.json").exists()


def test_an_unreachable_endpoint_is_one_line_naming_it_and_the_mirror(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = download(tmp_path, "--sources=wikipedia_cn", endpoint=closed)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot download wikipedia_cn from "
                                                   f"{closed}/datasets/pleisto/wikipedia-cn-20230720-filtered")
    assert "--mirror=" in lines[0] and "HF_ENDPOINT" in lines[0]


def test_data_process_takes_hub_sources_by_name(hub, tmp_path, small_tokenizer):
    assert download(tmp_path, "--sources=wikipedia_cn,c4_zh", endpoint=hub.url).returncode == 0

    def process(out: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, os.path.join(ROOT, "data_process.py"), "--sources=wikipedia_cn,c4_zh",
                               f"--raw_dir={tmp_path}", f"--tokenizer={small_tokenizer}", f"--out_dir={tmp_path / out}",
                               "--workers=0"], capture_output=True, text=True, timeout=120)
    result = process("out")
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["sources"]["wikipedia_cn"]["read"] == 300 and meta["sources"]["c4_zh"]["read"] == 4 * 50
    # A download that did not finish (no SOURCE.json; a .part may be lying there) is not read as a corpus.
    (tmp_path / "c4_zh" / "SOURCE.json").unlink()
    result = process("out2")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the download of c4_zh into {tmp_path / 'c4_zh'} is not complete (no SOURCE.json): run "
        "`python download_data.py --sources=c4_zh` again")
