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

import functools
import gc
import hashlib
import json
import multiprocessing as mp
import os
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from chatglm_tokenizer import SPTokenizer, load_tokenizer
from configurator import parse_config
from corpora import CorpusError, Doc, builtin_input, clean_texts, iter_corpus, parse_input

TOKEN_DTYPE = np.uint16
MAX_VOCAB = int(np.iinfo(TOKEN_DTYPE).max)  # 65,535 ids fit in uint16
FORMAT_VERSION = 2  # raise when a change of this file changes what it writes: old outputs are then redone


@dataclass
class Config:
    sources: str = "peoples_daily,idioms,dictionary"  # built-in sources in data/raw (download_data.py)
    inputs: str = ""  # your files, comma-separated: PATH, FORMAT:PATH or FORMAT:PATH:FIELD
    raw_dir: str = "data/raw"  # where download_data.py put the built-in sources
    out_dir: str = "data/demo"  # train.bin, val.bin and meta.json go here
    tokenizer: str = "data/tokenizer/tokenizer.model"  # ours (train_tokenizer.py) or ChatGLM2's file
    min_chars: int = 10  # shorter cleaned documents are dropped
    dedup: bool = True  # drop exact duplicates (after cleaning)
    near_dedup: bool = True  # drop near duplicates (MinHash LSH over character n-grams)
    ngram: int = 5  # characters per shingle for MinHash
    bands: int = 8  # LSH bands x rows = MinHash bins; 8x8 flags pairs with Jaccard >~ 0.8
    rows: int = 8  # MinHash values per LSH band
    val_fraction: float = 0.01  # share of documents (by hash of their text) that go to val.bin
    workers: int = 2  # tokenizing processes; 0 does everything in this process
    batch_docs: int = 4096  # at most this many documents per work batch
    batch_chars: int = 1 << 18  # and about this many characters
    overwrite: bool = False  # replace an existing corpus made with other settings


# ------------------------------------------------------------------ hashing (deterministic everywhere)

def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def text_hash(text: str) -> int:
    """64-bit hash of a document, the same in every process and run (Python's hash() is not)."""
    return int.from_bytes(_digest(text), "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the bits of each uint64."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_EMPTY = np.uint64(2**64 - 1)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def minhash_batch(texts: list[str], n_perm: int, ngram: int) -> np.ndarray:
    """MinHash signatures (len(texts), n_perm) of the sets of character n-grams of each text, by one
    permutation hashing: each shingle is hashed once and falls into one of n_perm bins by its hash; a
    bin keeps its smallest hash. Two texts agree on a bin with probability their Jaccard similarity,
    as with n_perm separate hash functions, for 1/n_perm of the work. The whole batch is one numpy pass."""
    padded = [t.ljust(ngram, "\0") for t in texts]  # a text shorter than ngram is one shingle
    lengths = np.array([len(t) for t in padded])
    codes = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    starts = np.cumsum(lengths) - lengths
    n_shingles = lengths - ngram + 1
    # The start of every shingle that lies inside one text.
    first = np.repeat(starts - np.concatenate([[0], np.cumsum(n_shingles)[:-1]]), n_shingles)
    positions = np.arange(n_shingles.sum()) + first
    with np.errstate(over="ignore"):
        # The hash of the n-gram at every position of the joined text (slices, no gathers), then of
        # those that lie inside one text.
        rolling = codes[:len(codes) - ngram + 1].copy()
        for j in range(1, ngram):
            rolling *= np.uint64(1_000_003)
            rolling += codes[j:len(codes) - ngram + 1 + j]
        hashes = _mix64(rolling[positions])
    owner = np.repeat(np.arange(len(texts), dtype=np.int64), n_shingles)
    signatures = np.full(len(texts) * n_perm, _EMPTY, dtype=np.uint64)
    np.minimum.at(signatures, owner * n_perm + (hashes % np.uint64(n_perm)).astype(np.int64), hashes)
    return densify(signatures.reshape(len(texts), n_perm))


def densify(signatures: np.ndarray) -> np.ndarray:
    """Fill the empty bins of texts with fewer shingles than bins: empty bin j takes the value of the
    first filled bin along a probe sequence that depends on j only (Shrivastava 2017, "optimal
    densification"), so two texts still agree on it with probability their Jaccard similarity, and
    bins of one LSH band borrow from unrelated bins rather than from the same neighbour."""
    n_perm = signatures.shape[1]
    flat = signatures.ravel()  # flat indices: a 1-D take is several times cheaper than 2-D indexing
    out = flat.copy()
    empty = np.flatnonzero(flat == _EMPTY)
    if len(flat) < 2**31:
        empty = empty.astype(np.int32)  # half the memory traffic of int64 indices
    bins = empty % n_perm
    row_start = empty - bins
    probes = _probe_table(n_perm).astype(empty.dtype)
    first_try, tries = 0, 1
    while len(empty) and first_try < len(probes):
        if tries == 1:  # most empty bins find a filled one in one or two tries: no 2-D arrays then
            borrowed = flat[row_start + probes[first_try][bins]]
            done = borrowed != _EMPTY
            out[empty[done]] = borrowed[done]
        else:
            borrowed = flat[row_start + probes[first_try:first_try + tries, bins]]  # (tries, empty bins)
            found = borrowed != _EMPTY
            done = found.any(axis=0)
            out[empty[done]] = borrowed[found.argmax(axis=0)[done], np.flatnonzero(done)]
        empty, row_start, bins = empty[~done], row_start[~done], bins[~done]
        first_try += tries
        tries = 1 if first_try < 3 else 2 * tries  # then 2, 4, 8... tries at a time for the few left
    return out.reshape(signatures.shape)


@functools.cache
def _probe_table(n_perm: int) -> np.ndarray:
    """(probes, n_perm) bin indices: row t is where each bin looks on its t-th try. The last n_perm
    rows visit every bin, so every empty bin finds a filled one."""
    tries = np.arange(1, 8 * n_perm + 1, dtype=np.uint64)[:, None]
    bins = np.arange(n_perm, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        random = (_mix64(tries * _GOLDEN + bins * np.uint64(0xD6E8FEB86659FD93)) % np.uint64(n_perm))
    sweep = (np.arange(n_perm, dtype=np.uint64)[:, None] + bins) % np.uint64(n_perm)
    return np.concatenate([random, sweep]).astype(np.int64)


def minhash(text: str, n_perm: int, ngram: int) -> np.ndarray:
    """MinHash signature (n_perm uint64) of the set of character n-grams of one text."""
    return minhash_batch([text], n_perm, ngram)[0]


def lsh_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """(n, bands) uint64 keys, one per band of each signature; two documents sharing any key of the
    same band are near-duplicate candidates."""
    n, n_perm = signatures.shape
    rows = signatures.reshape(n, bands, n_perm // bands)
    with np.errstate(over="ignore"):
        keys = np.arange(1, bands + 1, dtype=np.uint64) * _GOLDEN  # band identity
        keys = np.broadcast_to(keys, (n, bands)).copy()
        for r in range(rows.shape[2]):
            keys = _mix64(keys ^ rows[:, :, r])
    return keys


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


def text_hashes(texts: list[str]) -> np.ndarray:
    """text_hash of each text, as a uint64 array."""
    return np.frombuffer(b"".join(map(_digest, texts)), dtype="<u8").astype(np.uint64)


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

class KeySet:
    """A set of uint64 keys in 8 bytes each: a big sorted array and a small one that new keys are
    inserted into; the small one is merged into the big one when it grows, so most inserts copy only
    the small array (inserting into the big one at every batch would copy the whole index each time)."""

    def __init__(self, merge_every: int = 1 << 18):
        self.big = np.empty(0, dtype=np.uint64)
        self.small = np.empty(0, dtype=np.uint64)
        self.merge_every = merge_every

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Which keys (any shape) are in the set."""
        flat = keys.ravel()
        order = np.argsort(flat)
        ordered = flat[order]  # binary searches for sorted keys are several times faster
        found = np.empty(len(flat), dtype=bool)
        found[order] = _in_sorted(self.big, ordered) | _in_sorted(self.small, ordered)
        return found.reshape(keys.shape)

    def add(self, keys: np.ndarray) -> None:
        """Add keys that are not in the set yet (repeats among them are fine)."""
        new = np.sort(keys, axis=None)
        new = new[np.append(True, new[1:] != new[:-1])] if len(new) else new
        self.small = _insert_sorted(self.small, new)
        if len(self.small) >= self.merge_every:
            self.big = _insert_sorted(self.big, self.small)
            self.small = np.empty(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.big) + len(self.small)


def _in_sorted(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if len(table) == 0:
        return np.zeros(keys.shape, dtype=bool)
    return table[np.searchsorted(table, keys).clip(max=len(table) - 1)] == keys


def _insert_sorted(table: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Sorted `new` (none of them in `table`) put in their places: one copy of the table, where
    np.union1d would sort it all again (8.6 s at 10M keys against 0.25 s)."""
    return np.insert(table, np.searchsorted(table, new), new)


KEEP, DUPLICATE, NEAR_DUPLICATE, TOO_SHORT, MALFORMED = range(5)
VERDICTS = ["kept", "dropped_duplicate", "dropped_near_duplicate", "dropped_too_short", "dropped_malformed"]


class Deduplicator:
    """Exact and near-duplicate decisions, the same as taking the documents one by one in order (so
    runs are reproducible), made a batch at a time with numpy. Near duplicates are documents that share
    a MinHash LSH band key with an earlier kept document."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.exact, self.bands = KeySet(), KeySet()

    def verdicts(self, out: Processed, candidates: np.ndarray) -> np.ndarray:
        """KEEP, DUPLICATE or NEAR_DUPLICATE for each candidate of the batch (others get KEEP and leave
        no trace in the index)."""
        verdict = np.full(len(candidates), KEEP, dtype=np.int8)
        live = np.flatnonzero(candidates)
        if self.cfg.dedup:
            hashes = out.hashes[live]
            repeated = np.ones(len(live), dtype=bool)
            repeated[np.unique(hashes, return_index=True)[1]] = False  # not the first in the batch
            duplicate = repeated | self.exact.contains(hashes)
            verdict[live[duplicate]] = DUPLICATE
            self.exact.add(hashes[~duplicate])
            live = live[~duplicate]
        if out.band_keys is not None:
            keys = out.band_keys[live]
            near = self.bands.contains(keys).any(axis=1)
            near |= self._near_within_batch(keys, near)
            verdict[live[near]] = NEAR_DUPLICATE
            self.bands.add(keys[~near].ravel())
        return verdict

    @staticmethod
    def _near_within_batch(keys: np.ndarray, near: np.ndarray) -> np.ndarray:
        """Which documents share a band key with an earlier kept document of the same batch. Only the
        few that share a key with any other document of the batch are walked through in order."""
        flat = keys.ravel()
        _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
        shared = (counts[inverse] > 1).reshape(keys.shape).any(axis=1)
        result = np.zeros(len(keys), dtype=bool)
        kept_keys: set[int] = set()
        for i in np.flatnonzero(shared & ~near).tolist():
            row = keys[i].tolist()
            if kept_keys.isdisjoint(row):
                kept_keys.update(row)
            else:
                result[i] = True
        return result


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


def fingerprint(cfg: Config, tokenizer: SPTokenizer) -> dict:
    """What the output depends on: settings that shape it, the inputs' sizes and times, the tokenizer."""
    not_shaping = {"workers", "batch_docs", "batch_chars", "overwrite", "out_dir"}
    settings = {k: v for k, v in asdict(cfg).items() if k not in not_shaping}
    files = []
    for name in [s for s in cfg.sources.split(",") if s.strip()]:
        files.append(builtin_input(name.strip(), cfg.raw_dir).path)  # names the unknown or missing source
    files += [parse_input(s.strip()).path for s in cfg.inputs.split(",") if s.strip()]
    stats = {}
    for path in files:
        for root, _, names in os.walk(path) if os.path.isdir(path) else [("", None, [path])]:
            for n in names:
                p = os.path.join(root, n)
                st = os.stat(p)
                stats[p] = [st.st_size, int(st.st_mtime)]
    return {"format": FORMAT_VERSION, "settings": settings, "inputs": stats, "tokenizer_sha256": tokenizer.sha256}


class CorpusWriter:
    """Appends each kept document's tokens and an eos to train.bin or val.bin (temp files, renamed
    when the run completes, so an interrupted run never leaves a half corpus that looks whole)."""

    def __init__(self, out_dir: str, eos_id: int, val_fraction: float):
        self.out_dir, self.eos = out_dir, TOKEN_DTYPE(eos_id)
        self.val_cut = int(val_fraction * 1_000_000)
        self.files = {split: open(os.path.join(out_dir, f"{split}.bin.tmp"), "wb") for split in ("train", "val")}
        self.tokens, self.docs, self.chars = Counter(), Counter(), Counter()

    def add(self, out: Processed, kept: np.ndarray) -> None:
        """Append the tokens of the batch's documents `kept` (indices), an eos after each."""
        val = out.hashes[kept] % np.uint64(1_000_000) < self.val_cut
        owner = np.repeat(np.arange(len(out.hashes)), np.diff(out.offsets))  # the document of each token
        for split, docs in (("train", kept[~val]), ("val", kept[val])):
            if len(docs) == 0:
                continue
            chosen = np.zeros(len(out.hashes), dtype=bool)
            chosen[docs] = True
            lengths = out.offsets[docs + 1] - out.offsets[docs]
            tokens = np.insert(out.tokens[chosen[owner]], np.cumsum(lengths), self.eos)
            self.files[split].write(tokens.tobytes())
            self.tokens[split] += len(tokens)
            self.docs[split] += len(docs)
            self.chars[split] += int(out.n_chars[docs].sum())

    def commit(self) -> None:
        for split, f in self.files.items():
            f.close()
            os.replace(f.name, os.path.join(self.out_dir, f"{split}.bin"))


def write_json_atomic(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
    os.replace(tmp, path)


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


def run(cfg: Config) -> dict:
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
    counts: dict[str, Counter] = defaultdict(Counter)
    malformed: list[str] = []
    dedup = Deduplicator(cfg)
    writer = CorpusWriter(cfg.out_dir, tokenizer.eos_id, cfg.val_fraction)
    batches = _batches(iter_corpus(cfg.sources, cfg.inputs, cfg.raw_dir), cfg.batch_docs, cfg.batch_chars)

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

    bar = tqdm(unit=" docs", desc=f"processing into {cfg.out_dir}", mininterval=1.0, smoothing=0.1)
    for docs, out in work():
        malformed_here = np.array([doc.error is not None for doc in docs])
        status = np.where(malformed_here, MALFORMED, np.where(out.long_enough, KEEP, TOO_SHORT))
        candidates = status == KEEP
        status = np.where(candidates, dedup.verdicts(out, candidates), status)
        writer.add(out, np.flatnonzero(status == KEEP))
        count_verdicts(counts, [doc.source for doc in docs], status)
        for i in np.flatnonzero(status == MALFORMED)[:max(0, 100 - len(malformed))].tolist():
            malformed.append(f"{docs[i].where}: {docs[i].error}")
        bar.update(len(docs))
        bar.set_postfix(tokens=f"{sum(writer.tokens.values()) / 1e6:.1f}M", refresh=False)
    bar.close()
    writer.commit()
    meta = {
        "tokenizer": os.path.abspath(cfg.tokenizer), "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "dtype": "uint16",
        "tokens": dict(writer.tokens), "documents": dict(writer.docs), "characters": dict(writer.chars),
        "sources": {name: dict(c) for name, c in counts.items()},
        "malformed_examples": malformed, "fingerprint": fp,
    }
    write_json_atomic(os.path.join(cfg.out_dir, "meta.json"), meta)
    report(meta, cfg.out_dir)
    return meta


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
    cfg = parse_config(Config, argv, __doc__)
    try:
        run(cfg)
    except (CorpusError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
