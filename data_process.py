"""Documents -> cleaned, deduplicated, tokenized uint16 `.bin` files with a `meta.json`.

    python data_process.py                                   # the built-in demo corpus, our tokenizer
    python data_process.py --tokenizer=chatglm_tokenizer/tokenizer.model --sources= \\
        --inputs=baidubaike:563w_baidubaike.json,wikipedia:wikipedia-cn-20230720-filtered.json \\
        --out_dir=data/seed

The corpus streams: worker processes clean, hash and tokenize batches of documents while this process
reads the sources, decides in document order what is a duplicate, and appends the tokens of the kept
documents to train.bin / val.bin. Memory does not depend on the size of the corpus, apart from the
deduplication index (8 bytes a key: 72 bytes per kept document with the default 8 bands). Every
document read is counted as kept or dropped with its reason; malformed records are reported with
their file and line.
"""
from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from babyllama.cleaning import clean_texts
from babyllama.common import PendingFiles, remove_stale_temps, write_json_atomic
from babyllama.configurator import InputFile, NonNegative, OutputDir, Positive, in_range, parse_config
from babyllama.corpora import CorpusError, Doc, builtin_input, iter_corpus, parse_input
from babyllama.dedup import (
    EMPTY,
    KEEP,
    MALFORMED,
    TOO_SHORT,
    VERDICTS,
    Deduplicator,
    held_out,
    lsh_keys,
    minhash_batch,
    text_hashes,
)
from babyllama.errors import one_line_errors
from chatglm_tokenizer import SPTokenizer, file_sha256, load_tokenizer

TOKEN_DTYPE = np.uint16
MAX_VOCAB = int(np.iinfo(TOKEN_DTYPE).max)  # 65,535 ids fit in uint16
FORMAT_VERSION = 3  # raise when a change of this file changes what it writes: old outputs are then redone


@dataclass
class Config:
    sources: str = "peoples_daily,idioms,dictionary"  # built-in sources in data/raw (download_data.py)
    inputs: str = ""  # your files, comma-separated: PATH, FORMAT:PATH or FORMAT:PATH:FIELD
    encoding: str = "utf-8"  # of your text files (gb18030 for Chinese Windows files); a BOM is fine
    raw_dir: str = "data/raw"  # where download_data.py put the built-in sources
    out_dir: OutputDir = "data/demo"  # train.bin, val.bin and meta.json go here
    tokenizer: InputFile = "data/tokenizer/tokenizer.model"  # ours (train_tokenizer.py) or ChatGLM2's file
    min_chars: NonNegative = 10  # shorter cleaned documents are dropped
    dedup: bool = True  # drop exact duplicates (after cleaning)
    near_dedup: bool = True  # drop near duplicates (MinHash LSH over character n-grams)
    ngram: Positive = 5  # characters per shingle for MinHash
    bands: Positive = 8  # LSH bands x rows = MinHash bins; 8x8 flags pairs with Jaccard >~ 0.8
    rows: Positive = 8  # MinHash values per LSH band
    val_fraction: in_range(0, 0.5) = 0.01  # share of documents (by hash of their text) that go to val.bin
    workers: NonNegative = 2  # tokenizing processes; 0 does everything in this process
    batch_docs: Positive = 4096  # at most this many documents per work batch
    batch_chars: Positive = 1 << 18  # and about this many characters
    overwrite: bool = False  # replace an existing corpus made with other settings


# ------------------------------------------------------------------ the work done in worker processes

_TOKENIZER: SPTokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer_path)


@dataclass
class Processed:
    """A batch of documents after cleaning, hashing and tokenizing, in few arrays (cheap to send)."""
    long_enough: np.ndarray  # (n,) bool: False where the cleaned text is shorter than min_chars
    n_chars: np.ndarray  # (n,) characters of each cleaned text
    hashes: np.ndarray  # (n,) uint64 hash of each cleaned text
    band_keys: np.ndarray | None  # (n, bands) uint64 MinHash LSH keys (0 for the too short), or None
    tokens: np.ndarray  # the tokens of every long-enough document, concatenated
    offsets: np.ndarray  # (n + 1,) document i's tokens are tokens[offsets[i]:offsets[i + 1]]


def process_batch(texts: list[str], cfg: Config) -> Processed:
    cleaned = clean_texts(texts)
    n_chars = np.array([len(t) for t in cleaned], dtype=np.int64)
    long_enough = n_chars >= cfg.min_chars
    to_keep = [t for t, ok in zip(cleaned, long_enough.tolist()) if ok]  # the short ones are dropped anyway
    ids, lengths = _TOKENIZER.encode_joined(to_keep)
    offsets = np.zeros(len(cleaned) + 1, dtype=np.int64)
    offsets[1:][long_enough] = lengths  # the short ones have no tokens
    np.cumsum(offsets, out=offsets)
    tokens = ids.astype(TOKEN_DTYPE)  # run() checked that every id fits
    band_keys = None
    if cfg.near_dedup:  # signatures of the long enough only: the short ones cost the most to densify
        band_keys = np.zeros((len(cleaned), cfg.bands), dtype=np.uint64)
        if to_keep:
            band_keys[long_enough] = lsh_keys(minhash_batch(to_keep, cfg.bands * cfg.rows, cfg.ngram), cfg.bands)
    return Processed(long_enough, n_chars, text_hashes(cleaned), band_keys, tokens, offsets)


# ------------------------------------------------------------------ the main process


def _batches(docs: Iterator[Doc], max_docs: int, max_chars: int) -> Iterator[list[Doc]]:
    """Batches of up to max_docs documents and about max_chars characters: enough work per batch to
    make its fixed costs small, and a bounded amount of text in flight whatever the documents' size."""
    batch: list[Doc] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text or "")
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def input_files(cfg: Config) -> list[str]:
    """Every file the run reads (folders walked), in order."""
    paths = [builtin_input(name.strip(), cfg.raw_dir).path  # names the unknown or missing source
             for name in cfg.sources.split(",") if name.strip()]
    paths += [parse_input(s.strip()).path for s in cfg.inputs.split(",") if s.strip()]
    files = []
    for path in paths:
        for root, _, names in os.walk(path) if os.path.isdir(path) else [("", None, [path])]:
            files += [os.path.join(root, n) for n in sorted(names)]
    return files


def fingerprint(cfg: Config, tokenizer: SPTokenizer) -> dict:
    """What the output depends on: settings that shape it, the inputs' sizes and sha256 (a file edited
    with its time restored is still seen: hashing reads each input once, little beside tokenizing it),
    the tokenizer."""
    not_shaping = {"workers", "batch_docs", "batch_chars", "overwrite", "out_dir"}
    settings = {k: v for k, v in asdict(cfg).items() if k not in not_shaping}
    files = input_files(cfg)
    inputs = {}
    with tqdm(total=sum(os.path.getsize(p) for p in files), unit="B", unit_scale=True, desc="hashing inputs",
              mininterval=1.0, disable=None) as bar:
        for path in files:
            inputs[path] = [os.path.getsize(path), file_sha256(path)]
            bar.update(inputs[path][0])
    return {"format": FORMAT_VERSION, "settings": settings, "inputs": inputs, "tokenizer_sha256": tokenizer.sha256}


class CorpusWriter(PendingFiles):
    """Appends each kept document's tokens and an eos to train.bin or val.bin (temp files, renamed
    when the run completes, so an interrupted run never leaves a half corpus that looks whole)."""

    def __init__(self, out_dir: str, eos_id: int, val_fraction: float):
        paths = {split: os.path.join(out_dir, f"{split}.bin") for split in ("train", "val")}
        super().__init__(list(paths.values()), "wb")
        self.split_files = {split: self.files[path] for split, path in paths.items()}
        self.eos = TOKEN_DTYPE(eos_id)
        self.val_fraction = val_fraction
        self.tokens, self.docs, self.chars = Counter(), Counter(), Counter()

    def add(self, out: Processed, kept: np.ndarray) -> None:
        """Append the tokens of the batch's documents `kept` (indices), an eos after each."""
        val = held_out(out.hashes[kept], self.val_fraction)
        owner = np.repeat(np.arange(len(out.hashes)), np.diff(out.offsets))  # the document of each token
        for split, docs in (("train", kept[~val]), ("val", kept[val])):
            if len(docs) == 0:
                continue
            chosen = np.zeros(len(out.hashes), dtype=bool)
            chosen[docs] = True
            lengths = out.offsets[docs + 1] - out.offsets[docs]
            tokens = np.insert(out.tokens[chosen[owner]], np.cumsum(lengths), self.eos)
            self.split_files[split].write(tokens.tobytes())
            self.tokens[split] += len(tokens)
            self.docs[split] += len(docs)
            self.chars[split] += int(out.n_chars[docs].sum())


def check_output(cfg: Config, fp: dict) -> bool:
    """True when out_dir already holds this very corpus; raises if it holds another one."""
    meta_path = os.path.join(cfg.out_dir, "meta.json")
    if not os.path.isfile(meta_path):
        return False
    with open(meta_path, encoding="utf-8") as f:
        old = json.load(f).get("fingerprint")
    if old == fp:
        return True
    if not cfg.overwrite:
        raise CorpusError(f"{cfg.out_dir} already holds a corpus made from other inputs or settings; "
                          "pass --overwrite=true to replace it, or choose another --out_dir")
    return False


def count_verdicts(counts: dict[str, Counter], sources: list[str], status: np.ndarray) -> None:
    """Add each document (its source, its verdict) to counts[source]: "read" and the verdict's name.
    Sources enter counts in the order they came."""
    names, first, source_of = np.unique(np.array(sources), return_index=True, return_inverse=True)
    for k in np.argsort(first).tolist():
        c = counts[str(names[k])]
        verdicts, n = np.unique(status[source_of == k], return_counts=True)
        c["read"] += int(n.sum())
        for verdict, number in zip(verdicts.tolist(), n.tolist()):
            c[VERDICTS[verdict]] += number


def process(cfg: Config) -> dict:
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > MAX_VOCAB + 1:
        raise CorpusError(f"tokenizer {cfg.tokenizer} has {tokenizer.vocab_size} ids; uint16 holds at most "
                          f"{MAX_VOCAB + 1}")
    fp = fingerprint(cfg, tokenizer)
    if check_output(cfg, fp):
        print(f"{cfg.out_dir} is up to date (same inputs, settings and tokenizer); nothing to do")
        with open(os.path.join(cfg.out_dir, "meta.json"), encoding="utf-8") as f:
            return json.load(f)
    os.makedirs(cfg.out_dir, exist_ok=True)
    for path in remove_stale_temps(cfg.out_dir, ["train.bin", "val.bin", "meta.json"]):
        print(f"removed {path}, left by an interrupted run")
    counts: dict[str, Counter] = defaultdict(Counter)
    malformed: list[str] = []
    dedup = Deduplicator(exact=cfg.dedup)
    writer = CorpusWriter(cfg.out_dir, tokenizer.eos_id, cfg.val_fraction)
    batches = _batches(iter_corpus(cfg.sources, cfg.inputs, cfg.raw_dir, cfg.encoding), cfg.batch_docs,
                       cfg.batch_chars)

    def work() -> Iterator[tuple[list[Doc], Processed]]:
        pending = ((b, [d.text or "" for d in b]) for b in batches)
        if cfg.workers == 0:
            _init_worker(cfg.tokenizer)
            for b, texts in pending:
                yield b, process_batch(texts, cfg)
            return
        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        # Forked workers share this process's pages until either side writes to them; the garbage
        # collector writes to every object it scans, so existing objects are kept out of its sight.
        gc.freeze()
        try:
            with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg.tokenizer,)) as pool:
                # A bounded window of batches in flight: Pool.imap would read the whole corpus ahead.
                in_flight: deque = deque()
                for b, texts in pending:
                    in_flight.append((b, pool.apply_async(process_batch, (texts, cfg))))
                    if len(in_flight) >= 2 * cfg.workers + 2:
                        b0, result = in_flight.popleft()
                        yield b0, result.get()
                while in_flight:
                    b0, result = in_flight.popleft()
                    yield b0, result.get()
        finally:
            gc.unfreeze()

    with writer:
        written = _process(cfg, work(), writer, dedup, counts, malformed)
    meta = {"tokenizer": os.path.abspath(cfg.tokenizer), "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, **written, "fingerprint": fp}
    write_json_atomic(os.path.join(cfg.out_dir, "meta.json"), meta)
    report(meta, cfg.out_dir)
    return meta


def _process(cfg: Config, work: Iterator[tuple[list[Doc], Processed]], writer: CorpusWriter, dedup: Deduplicator,
             counts: dict[str, Counter], malformed: list[str]) -> dict:
    """Give each document its verdict, write the kept ones, count them all; the corpus's meta."""
    bar = tqdm(unit=" docs", desc=f"processing into {cfg.out_dir}", mininterval=1.0, smoothing=0.1)
    for docs, out in work:
        malformed_here = np.array([doc.error is not None for doc in docs])
        status = np.where(malformed_here, MALFORMED,
                          np.where(out.long_enough, KEEP, np.where(out.n_chars == 0, EMPTY, TOO_SHORT)))
        candidates = status == KEEP
        status = np.where(candidates, dedup.verdicts(out.hashes, out.band_keys, candidates), status)
        writer.add(out, np.flatnonzero(status == KEEP))
        count_verdicts(counts, [doc.source for doc in docs], status)
        for i in np.flatnonzero(status == MALFORMED)[:max(0, 100 - len(malformed))].tolist():
            malformed.append(f"{docs[i].where}: {docs[i].error}")
        bar.update(len(docs))
        bar.set_postfix(tokens=f"{sum(writer.tokens.values()) / 1e6:.1f}M", refresh=False)
    bar.close()
    writer.commit()
    return {"dtype": "uint16", "tokens": dict(writer.tokens), "documents": dict(writer.docs),
            "characters": dict(writer.chars), "sources": {name: dict(c) for name, c in counts.items()},
            "malformed_examples": malformed}


def report(meta: dict, out_dir: str) -> None:
    print(f"wrote {out_dir}: train {meta['tokens'].get('train', 0):,} tokens "
          f"({meta['documents'].get('train', 0):,} docs), val {meta['tokens'].get('val', 0):,} tokens "
          f"({meta['documents'].get('val', 0):,} docs)")
    for name, c in meta["sources"].items():
        drops = ", ".join(f"{k[8:]} {v:,}" for k, v in sorted(c.items()) if k.startswith("dropped_"))
        dropped = f", dropped: {drops}" if drops else ""
        print(f"  {name}: read {c.get('read', 0):,}, kept {c.get('kept', 0):,}{dropped}")
    if meta["malformed_examples"]:
        print(f"  malformed records (first {min(5, len(meta['malformed_examples']))}; all listed in meta.json):")
        for line in meta["malformed_examples"][:5]:
            print(f"    {line}")


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        process(parse_config(Config, argv, __doc__))


if __name__ == "__main__":
    main(sys.argv[1:])
