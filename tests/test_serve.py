import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict

import pytest
import torch
from conftest import ROOT

from model import ModelArgs, Transformer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


class Response:
    def __init__(self, status_code: int, text: str):
        self.status_code, self.text = status_code, text

    def json(self):
        return json.loads(self.text)


def http(method: str, url: str, data: bytes | None = None, timeout: float = 30) -> Response:
    """A plain HTTP request with the standard library (the tests need no HTTP client package)."""
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return Response(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        return Response(e.code, e.read().decode())


def start_server(folder, tokenizer, args: ModelArgs, *flags: str, endless: bool = False):
    """serve.py in a process of its own, for a random model of this shape; (url, process). An endless
    model never ends an answer itself: eos's logit is 0, below the largest of the others."""
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
        if endless:
            model.output.weight[2] = 0
    torch.save({"model": model.state_dict(), "model_args": asdict(args)}, folder / "ckpt.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={folder / 'ckpt.pt'}",
                             f"--tokenizer={tokenizer}", f"--port={port}", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if http("GET", f"{url}/v1/models").status_code == 200:
                return url, proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"server did not start: {proc.communicate()[1][-2000:]}")


def serving(folder, tokenizer, args: ModelArgs, *flags: str, endless: bool = False):
    """A fixture's body: the url of a server of this shape while the module's tests run, then stopped."""
    url, proc = start_server(folder, tokenizer, args, *flags, endless=endless)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_tokenizer):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=600, max_seq_len=64, multiple_of=16)
    yield from serving(tmp_path_factory.mktemp("serve"), small_tokenizer, args, "--max_tokens=24")


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory, small_tokenizer):
    """A model big enough that a long answer takes a while, with two rows of batch."""
    args = ModelArgs(dim=256, n_layers=6, n_heads=4, vocab_size=600, max_seq_len=512, multiple_of=16)
    yield from serving(tmp_path_factory.mktemp("slow"), small_tokenizer, args, "--max_tokens=400", "--max_batch=2",
                       endless=True)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def ask(url, question, **kw):
    reply = client(url).chat.completions.create(model="baby-llama2", messages=[{"role": "user", "content": question}],
                                                temperature=0, max_tokens=16, **kw)
    return reply.choices[0].message.content, reply.choices[0].finish_reason


def test_models_chat_and_stream(server):
    assert [m.id for m in client(server).models.list().data] == ["baby-llama2"]
    text, finish = ask(server, "你好")
    assert finish in ("stop", "length") and isinstance(text, str)
    stream = client(server).chat.completions.create(model="baby-llama2", stream=True, temperature=0, max_tokens=16,
                                                    messages=[{"role": "user", "content": "你好"}])
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == text  # the stream spells out the same greedy answer
    completion = client(server).completions.create(model="baby-llama2", prompt="床前明月光", max_tokens=8,
                                                   temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_are_all_answered_correctly(server):
    questions = [f"第{i}个问题" for i in range(8)]
    alone = [ask(server, q)[0] for q in questions]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda q: ask(server, q)[0], questions))
    assert together == alone


def test_bad_requests_get_4xx_in_openai_shape_and_serving_goes_on(server):
    def post(path, body):
        return http("POST", f"{server}{path}", body if isinstance(body, bytes) else json.dumps(body).encode())
    cases = [post("/v1/chat/completions", b"not json"),
             post("/v1/chat/completions", {"model": "x"}),
             post("/v1/chat/completions", {"messages": [{"role": "user"}]}),
             post("/v1/chat/completions", {"messages": [{"role": "user", "content": "字" * 200}]}),
             post("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "temperature": 9}),
             post("/v1/completions", {"prompt": ""}),
             post("/v1/nowhere", {})]
    for response in cases:
        assert 400 <= response.status_code < 500, response.text
        error = response.json()["error"]
        assert set(error) >= {"message", "type"} and error["message"]
    assert cases[3].json()["error"]["code"] == "context_length_exceeded"
    assert ask(server, "还在吗")[1] in ("stop", "length")


def test_api_key_is_required_when_set(small_tokenizer, tmp_path):
    from starlette.testclient import TestClient

    from serve import Config, create_app
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=32, multiple_of=16)
    torch.save({"model": Transformer(args).state_dict(), "model_args": asdict(args)}, tmp_path / "ckpt.pt")
    app = create_app(Config(ckpt=str(tmp_path / "ckpt.pt"), tokenizer=small_tokenizer, api_key="secret"))
    with TestClient(app) as test:
        assert test.get("/v1/models").status_code == 401
        assert test.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200
        page = test.get("/")
        assert page.status_code == 200 and "/v1/chat/completions" in page.text
        body = json.dumps({"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4})
        assert test.post("/v1/chat/completions", content=body,
                         headers={"Authorization": "Bearer secret"}).status_code == 200


@contextlib.contextmanager
def chromium_page(url: str, tmp_path) -> Iterator:
    """Headless Chromium (selenium) showing the server's web page; skips where either is not installed."""
    import shutil
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=900,700", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        browser.get(f"{url}/")
        yield browser
    finally:
        browser.quit()


def test_web_page_streams_an_answer_in_chromium(server, tmp_path):
    with chromium_page(server, tmp_path) as browser:
        for turn, question in enumerate(["你好", "再说一遍"], 1):
            browser.find_element("id", "question").send_keys(question)
            browser.find_element("id", "send").click()
            deadline = time.time() + 60
            while time.time() < deadline and browser.execute_script("return messages.length") < 2 * turn:
                time.sleep(0.1)
            assert browser.execute_script("return messages.length") == 2 * turn
        shown = [e.text for e in browser.find_elements("class name", "assistant")]
        replies = browser.execute_script("return messages.filter(m => m.role === 'assistant').map(m => m.content)")
        assert shown == ["模型：" + r for r in replies]
        # The page's first answer is the API's greedy answer to the same question.
        first = client(server).chat.completions.create(model="baby-llama2", temperature=0,
                                                       messages=[{"role": "user", "content": "你好"}])
        assert replies[0] == first.choices[0].message.content
        if os.environ.get("WEB_SCREENSHOT"):
            browser.save_screenshot(os.environ["WEB_SCREENSHOT"])
        browser.find_element("id", "reset").click()
        assert browser.execute_script("return messages.length") == 0


def post(url: str, body, timeout: float = 30) -> Response:
    return http("POST", url, body if isinstance(body, bytes) else json.dumps(body).encode(), timeout)


@pytest.fixture(scope="module")
def padded_server(tmp_path_factory, small_tokenizer):
    """A model with more ids than its tokenizer has (a vocabulary padded for speed)."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=700, max_seq_len=64, multiple_of=16)
    yield from serving(tmp_path_factory.mktemp("padded"), small_tokenizer, args, "--max_tokens=24")


EDGES = [0, 1, -1, float("nan"), float("inf"), 1e308, 10**30, 0.5, None, "1", True]


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_every_sampling_setting_at_its_edges_is_answered_in_seconds(padded_server, endpoint):
    """An answer or a 400 for each, streamed or not, never a hang; then a normal request is served."""
    chat = endpoint == "chat/completions"
    hello = {"messages": [{"role": "user", "content": "你好"}]} if chat else {"prompt": "你好"}
    url = f"{padded_server}/v1/{endpoint}"
    for name in ("temperature", "top_p", "max_tokens", "n"):
        for value in EDGES:
            for stream in (False, True):
                body = json.dumps({**hello, "max_tokens": 4, "stream": stream, name: value}).encode()
                reply = post(url, body, timeout=10)
                assert reply.status_code in (200, 400), (name, value, reply.status_code, reply.text)
                assert "server error" not in reply.text, (name, value, reply.text)
                if reply.status_code == 400:
                    assert name in reply.json()["error"]["message"], (name, value, reply.text)
    normal = post(url, {**hello, "max_tokens": 4}, timeout=10)
    assert normal.status_code == 200 and normal.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_padded_vocabulary_never_ends_an_answer_in_error(padded_server):
    """Ids past the tokenizer's are never sampled: 104 sampled answers, none with an error finish."""
    finishes = []
    for _ in range(13):
        reply = post(f"{padded_server}/v1/completions", {"prompt": "床前明月光", "n": 8, "temperature": 1.5,
                                                         "max_tokens": 24}).json()
        finishes += [c["finish_reason"] for c in reply["choices"]]
    assert len(finishes) == 104 and set(finishes) <= {"stop", "length"}, finishes


def test_malformed_bodies_of_every_kind_get_4xx(server):
    chat, completions = f"{server}/v1/chat/completions", f"{server}/v1/completions"
    hello = [{"role": "user", "content": "你好"}]
    cases = {"deeply nested": post(chat, b"[" * 100_000),
             "lone surrogate prompt": post(completions, b'{"prompt": "\\ud800"}'),
             "lone surrogate message": post(chat, b'{"messages": [{"role": "user", "content": "a\\udfff"}]}'),
             "n=0": post(chat, {"messages": hello, "n": 0}), "n=1.5": post(chat, {"messages": hello, "n": 1.5}),
             "n too many": post(chat, {"messages": hello, "n": 1000}),
             "max_tokens=0": post(chat, {"messages": hello, "max_tokens": 0}),
             "top_p=nan": post(chat, b'{"messages": [{"role": "user", "content": "a"}], "top_p": NaN}'),
             "stop=3": post(chat, {"messages": hello, "stop": 3}), "a list": post(chat, [1, 2])}
    for name, response in cases.items():
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        assert response.json()["error"]["message"], name


def test_n_choices_and_usage_counts_generated_tokens(server):
    reply = post(f"{server}/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}], "n": 3,
                                                    "max_tokens": 10, "temperature": 0})
    body = reply.json()
    assert reply.status_code == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    answers = {c["message"]["content"] for c in body["choices"]}
    assert len(answers) == 1  # greedy: the same answer three times
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 30
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    one = post(f"{server}/v1/completions", {"prompt": "床前明月光", "max_tokens": 7, "temperature": 0}).json()
    if one["choices"][0]["finish_reason"] == "length":
        assert one["usage"]["completion_tokens"] == 7  # counted as generated, not re-encoded from the text
    assert one["usage"]["completion_tokens"] <= 7


def stream_chunks(url: str, body: dict, drop_after: int | None = None) -> list[tuple[float, dict]]:
    """(arrival time, chunk) of a streamed completion; with drop_after, hang up after that many bytes."""
    import http.client
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    chunks, received = [], 0
    while True:
        line = response.fp.readline()
        received += len(line)
        if drop_after is not None and received >= drop_after:
            connection.sock.close()  # the client goes away mid-stream
            return chunks
        if not line:
            return chunks
        line = line.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            chunks.append((time.perf_counter(), json.loads(line[6:])))


def test_the_first_chunk_comes_before_the_answer_ends(slow_server):
    began = time.perf_counter()
    chunks = stream_chunks(slow_server, {"prompt": "床前明月光", "max_tokens": 200, "temperature": 0})
    texts = [c["choices"][0]["text"] for _, c in chunks]
    first = next(t for t, c in chunks if c["choices"][0]["text"])
    end = chunks[-1][0]
    assert len(texts) > 50  # a long answer, streamed piece by piece
    assert first - began < 0.25 * (end - began), f"first chunk at {first - began:.2f} s of {end - began:.2f} s"


def test_clients_that_hang_up_mid_stream_free_their_rows(slow_server):
    body = {"prompt": "床前明月光", "max_tokens": 400, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: stream_chunks(slow_server, body, drop_after=300), range(20)))
    began = time.time()
    reply = post(f"{slow_server}/v1/completions", {"prompt": "你好", "max_tokens": 5, "temperature": 0})
    assert reply.status_code == 200 and time.time() - began < 10, f"answered after {time.time() - began:.1f} s"


def test_clients_that_hang_up_before_a_whole_answer_free_their_rows(slow_server):
    """Without streaming, a client that goes away is noticed by polling; its rows are freed long before
    its answers would have ended."""
    import http.client
    body = json.dumps({"prompt": "床前明月光", "max_tokens": 400, "temperature": 0})
    began = time.time()
    assert post(f"{slow_server}/v1/completions", json.loads(body)).json()["usage"]["completion_tokens"] == 400
    whole = time.time() - began
    host, port = slow_server.removeprefix("http://").split(":")
    for _ in range(2):  # both rows
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        time.sleep(0.2)
        connection.close()
    began = time.time()
    reply = post(f"{slow_server}/v1/completions", {"prompt": "你好", "max_tokens": 5, "temperature": 0})
    waited = time.time() - began
    assert reply.status_code == 200 and waited < 1.5 + whole / 3, f"after {waited:.1f} s; a whole answer: {whole:.1f} s"


def test_decoding_threads_are_set(small_tokenizer, tmp_path):
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=32, multiple_of=16)
    # torch's default in a fresh process (this one's is set by conftest)
    default = int(subprocess.check_output([sys.executable, "-c", "import torch; print(torch.get_num_threads())"]))
    for flags, threads in (((), max(1, default - 1)), (("--threads=3",), 3)):
        _, proc = start_server(tmp_path, small_tokenizer, args, *flags)
        try:
            assert f"decoding threads: {threads})" in proc.stdout.readline()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_half_sent_bodies_leave_no_traceback_in_the_log(small_tokenizer, tmp_path):
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=32, multiple_of=16)
    url, proc = start_server(tmp_path, small_tokenizer, args, "--max_tokens=4")
    port = int(url.rsplit(":", 1)[1])
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"messages\": [")
                time.sleep(0.2)
        hello = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}
        assert post(f"{url}/v1/chat/completions", hello).status_code == 200
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "Traceback" not in stderr and "ClientDisconnect" not in stderr, stderr[-3000:]


def test_the_api_parts_clients_use_every_day(server):
    """GET /v1/models/{id}, an unknown model's 404, max_completion_tokens, the usage chunk of a stream, and a
    user message whose content is a list of text parts, with the official client."""
    c = client(server)
    assert c.models.retrieve("baby-llama2").id == "baby-llama2"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")
    hello = [{"role": "user", "content": "你好"}]
    with pytest.raises(openai.NotFoundError) as missing:
        c.chat.completions.create(model="gpt-4o", messages=hello)
    assert missing.value.body["code"] == "model_not_found"
    short = c.chat.completions.create(model="baby-llama2", messages=hello, temperature=0, max_completion_tokens=3)
    assert short.usage.completion_tokens <= 3
    if short.choices[0].finish_reason == "length":
        assert short.usage.completion_tokens == 3
    chunks = list(c.chat.completions.create(model="baby-llama2", messages=hello, temperature=0, max_tokens=6,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(chunk.usage is None for chunk in chunks[:-1])
    plain = list(c.chat.completions.create(model="baby-llama2", messages=hello, temperature=0, max_tokens=6,
                                           stream=True))
    assert all(chunk.usage is None for chunk in plain) and plain[-1].choices
    parts = [{"role": "user", "content": [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}]}]
    assert ask(server, "你好")[0] == c.chat.completions.create(model="baby-llama2", messages=parts, temperature=0,
                                                             max_tokens=16).choices[0].message.content
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="baby-llama2", messages=image)
