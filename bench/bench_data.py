"""Preprocessing benchmarks.

    python bench/bench_data.py throughput   # data_process.py vs. the seed's approach, built-in corpus
    python bench/bench_data.py stages   # where data_process.py's CPU time goes, stage by stage
    python bench/bench_data.py memory --sizes_gb 0.5 2   # peak memory on big generated corpora
    python bench/bench_data.py chars_per_token   # our tokenizer vs. ChatGLM2 on held-out news

All times include reading the sources. The seed's approach: one process reads each document, encodes
it with the ChatGLM2 tokenizer class (`encode(text, add_special_tokens=False)`), appends eos, gathers
every token in a Python list, and writes the array at the end. "sentencepiece per doc" is the same
loop calling sentencepiece directly. Both do less than data_process.py, which also cleans and
deduplicates (exact and MinHash).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from babyllama.corpora import CorpusError, iter_corpus  # noqa: E402
from chatglm_tokenizer import load_tokenizer  # noqa: E402
from data_process import Config, process  # noqa: E402

CHATGLM = os.path.join(ROOT, "..", "shared", "chatglm_tokenizer", "tokenizer.model")
SOURCES = "peoples_daily,idioms,dictionary"


def default_tokenizer() -> str:
    for path in (os.path.join(ROOT, "chatglm_tokenizer", "tokenizer.model"), CHATGLM):
        if os.path.isfile(path):
            return path
    raise SystemExit("the ChatGLM2 tokenizer.model is needed (see chatglm_tokenizer/README.md)")


def seed_way(raw_dir: str, encode, eos: int, out: str) -> None:
    tokens: list[int] = []
    for doc in iter_corpus(SOURCES, "", raw_dir):
        if doc.text is None:
            continue
        ids = encode(doc.text)
        ids.append(eos)
        tokens.extend(ids)
    np.array(tokens, dtype=np.uint16).tofile(out)


def hf_encoder(model_file: str):
    """The seed's tokenizer class (ours, equivalent for ids) as the seed called it."""
    folder = tempfile.mkdtemp()
    for name in ("tokenization_chatglm.py", "sp_tokenizer.py", "tokenizer_config.json"):
        shutil.copy(os.path.join(ROOT, "chatglm_tokenizer", name), folder)
    shutil.copy(model_file, os.path.join(folder, "tokenizer.model"))
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    return lambda text: hf.encode(text, add_special_tokens=False)


def time_approach(name: str, args: argparse.Namespace, out: str, answer) -> None:
    """Run one approach and send its seconds through `answer` (a Pipe end)."""
    tok_path = args.tokenizer or default_tokenizer()
    sp = load_tokenizer(tok_path)
    encode = hf_encoder(tok_path) if name == "seed" else sp.encode  # loaded before the clock starts
    start = time.perf_counter()
    if name in ("seed", "sentencepiece"):
        seed_way(args.raw_dir, encode, sp.eos_id, out + ".bin")
    else:
        process(Config(sources=SOURCES, raw_dir=args.raw_dir, out_dir=out, tokenizer=tok_path, workers=args.workers,
                   dedup=name != "plain", near_dedup=name == "ours"))
    answer.send(time.perf_counter() - start)


def in_fresh_process(name: str, args: argparse.Namespace, out: str) -> float:
    """Seconds of one approach, timed in a new interpreter after its imports: no approach runs in a
    process that another one filled (a big parent makes data_process.py's forked workers slower)."""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=time_approach, args=(name, args, out, send))
    process.start()
    process.join()
    if process.exitcode != 0 or not receive.poll():
        raise SystemExit(f"the {name} approach failed (exit code {process.exitcode})")
    return receive.recv()


def throughput(args) -> None:
    tok_path = args.tokenizer or default_tokenizer()
    texts = [d.text for d in iter_corpus(SOURCES, "", args.raw_dir) if d.text]
    chars = sum(len(t) for t in texts)
    vocab_size = load_tokenizer(tok_path).vocab_size
    work = tempfile.mkdtemp()
    rows = {"seed": "seed (HF tokenizer class, per doc, list)", "sentencepiece": "sentencepiece per doc, list",
            "ours": f"data_process.py ({args.workers} workers, clean + dedup)",
            "exact": f"data_process.py ({args.workers} workers, clean + exact dedup)",
            "plain": f"data_process.py ({args.workers} workers, clean, no dedup)"}
    results = {label: in_fresh_process(name, args, os.path.join(work, name)) for name, label in rows.items()}
    shutil.rmtree(work)
    ours = results[rows["ours"]]
    print(f"\n{len(texts):,} documents, {chars / 1e6:.2f}M characters, tokenizer {os.path.basename(tok_path)} "
          f"({vocab_size} ids); each approach in a fresh process")
    print(f"{'approach':<50} {'seconds':>8} {'M chars/s':>10} {'ours is':>8}")
    for name, seconds in results.items():
        print(f"{name:<50} {seconds:>8.2f} {chars / seconds / 1e6:>10.2f} {seconds / ours:>7.2f}x")


def stages(args) -> None:
    """CPU seconds of each stage of data_process.py on the built-in corpus, one stage after the other in
    this process (the real run spreads them over the main process and the workers)."""
    import babyllama.dedup as dedup
    import data_process
    from babyllama.cleaning import clean_texts
    tok = load_tokenizer(args.tokenizer or default_tokenizer())
    cfg = Config()
    timing: dict[str, float] = {}

    def timed(name: str, work, *args):
        start = time.process_time()
        result = work(*args)
        timing[name] = timing.get(name, 0.0) + time.process_time() - start
        return result
    docs = timed("reading the sources", lambda: list(iter_corpus(SOURCES, "", args.raw_dir)))
    batches = list(data_process._batches(iter(docs), cfg.batch_docs, cfg.batch_chars))
    for batch in batches:
        cleaned = timed("cleaning", clean_texts, [d.text or "" for d in batch])
        long_enough = [t for t in cleaned if len(t) >= cfg.min_chars]
        timed("tokenizing (sentencepiece)", tok.encode_joined, long_enough)
        signatures = timed("MinHash signatures", dedup.minhash_batch, long_enough, cfg.bands * cfg.rows,
                           cfg.ngram)
        timed("LSH keys", dedup.lsh_keys, signatures, cfg.bands)
        timed("text hashes", dedup.text_hashes, cleaned)
    print(f"{len(docs):,} documents in {len(batches)} batches; CPU seconds, one stage after the other:")
    for name, seconds in timing.items():
        print(f"  {name:<34} {seconds:6.3f}")
    print(f"  {'total':<34} {sum(timing.values()):6.3f}")


def make_corpus(path: str, gb: float, raw_dir: str) -> None:
    """Unique documents of 5-40 real sentences drawn at random: real text, no duplicates to skip."""
    sentences = []
    for doc in iter_corpus(SOURCES, "", raw_dir):
        if doc.text:
            sentences += [s + "。" for s in doc.text.replace("\n", "").split("。") if len(s) > 4]
    rng = random.Random(0)
    target = int(gb * 1e9)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            doc = "".join(rng.choices(sentences, k=rng.randint(5, 40))) + "\n"
            f.write(doc)
            written += len(doc.encode("utf-8"))
    print(f"generated {path}: {os.path.getsize(path) / 1e9:.2f} GB")


def tree_memory(pid: int) -> tuple[int, int]:
    """(sum of PSS of the process and its children, RSS of the process) in bytes."""
    def pss(p: int) -> int:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            return 0
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        rss = 0
    return pss(pid) + sum(pss(int(c)) for c in children), rss


def memory(args) -> None:
    tok_path = args.tokenizer or default_tokenizer()
    work = args.workdir or tempfile.mkdtemp()
    os.makedirs(work, exist_ok=True)
    rows = []
    for gb in args.sizes_gb:
        corpus = os.path.join(work, f"corpus_{gb}gb.txt")
        if not os.path.isfile(corpus):
            make_corpus(corpus, gb, args.raw_dir)
        out = os.path.join(work, f"out_{gb}")
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, os.path.join(ROOT, "data_process.py"), "--sources=", f"--inputs=txt:{corpus}",
                   f"--out_dir={out}", f"--tokenizer={tok_path}", f"--workers={args.workers}",
                   f"--dedup={not args.no_dedup}", f"--near_dedup={not args.no_dedup}"]
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        peak_pss = peak_rss = 0
        while proc.poll() is None:
            pss, rss = tree_memory(proc.pid)
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            time.sleep(0.5)
        seconds = time.perf_counter() - start
        report = proc.stdout.read()
        if proc.returncode != 0:
            raise SystemExit(f"data_process.py failed on {corpus}")
        tokens = sum(os.path.getsize(os.path.join(out, f"{s}.bin")) for s in ("train", "val")) // 2
        rows.append((gb, os.path.getsize(corpus) / 1e9, tokens, seconds, peak_pss, peak_rss))
        print(report.strip().splitlines()[0])
    print(f"\n{'corpus GB':>9} {'tokens':>14} {'seconds':>8} {'MB/s':>6} {'peak PSS, all processes':>24} "
          f"{'peak RSS, main':>15}")
    for _, size, tokens, seconds, pss, rss in rows:
        print(f"{size:>9.2f} {tokens:>14,} {seconds:>8.0f} {size * 1e3 / seconds:>6.1f} {pss / 2**20:>21.0f} MiB "
              f"{rss / 2**20:>11.0f} MiB")


def chars_per_token(args) -> None:
    """Held-out documents of the news sources: People's Daily 1998 and the 10-topic news set."""
    from babyllama.cleaning import clean_text
    from train_tokenizer import held_out
    texts = [clean_text(d.text) for d in iter_corpus("peoples_daily,news", "", args.raw_dir) if d.text]
    texts = [t for t in texts if t and held_out(t)]
    chars = sum(len(t) for t in texts)
    print(f"{len(texts)} held-out news documents, {chars:,} characters")
    for path in [args.ours, args.tokenizer or default_tokenizer()]:
        tok = load_tokenizer(path)
        n = sum(len(ids) for ids in tok.encode_batch(texts, num_threads=2))
        print(f"{path} ({tok.vocab_size} ids): {chars / n:.3f} characters per token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["throughput", "stages", "memory", "chars_per_token"])
    parser.add_argument("--raw_dir", default=os.path.join(ROOT, "data", "raw"))
    parser.add_argument("--tokenizer", default=None, help="default: the ChatGLM2 tokenizer.model")
    parser.add_argument("--ours", default=os.path.join(ROOT, "data", "tokenizer", "tokenizer.model"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes_gb", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--no_dedup", action="store_true", help="memory: measure without the deduplication index")
    parser.add_argument("--workdir", default=None, help="where generated corpora are kept (default: a temp dir)")
    args = parser.parse_args()
    benchmarks = {"throughput": throughput, "stages": stages, "memory": memory, "chars_per_token": chars_per_token}
    try:
        benchmarks[args.what](args)
    except (CorpusError, FileNotFoundError) as e:  # a missing tokenizer or source: one line, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
