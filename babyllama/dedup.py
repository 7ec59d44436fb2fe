"""Exact and near-duplicate detection: 64-bit text hashes, one-permutation MinHash signatures over
character n-grams, LSH band keys, a compact set of keys, and the decisions of a corpus read in order."""
from __future__ import annotations

import functools
import hashlib

import numpy as np


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def text_hash(text: str) -> int:
    """64-bit hash of a document, the same in every process and run (Python's hash() is not)."""
    return int.from_bytes(_digest(text), "little")


def held_out(hashes, fraction: float):
    """Whether documents (by text_hash) are held out: the same ones whatever the tokenizer or settings.
    data_process.py's val.bin and train_tokenizer.py's held-out documents (at 1%) are the same set."""
    return hashes % 1_000_000 < int(fraction * 1_000_000)


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


def text_hashes(texts: list[str]) -> np.ndarray:
    """text_hash of each text, as a uint64 array."""
    return np.frombuffer(b"".join(map(_digest, texts)), dtype="<u8").astype(np.uint64)


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
    np.union1d would sort it all again."""
    return np.insert(table, np.searchsorted(table, new), new)


KEEP, DUPLICATE, NEAR_DUPLICATE, TOO_SHORT, MALFORMED, EMPTY = range(6)


VERDICTS = ["kept", "dropped_duplicate", "dropped_near_duplicate", "dropped_too_short", "dropped_malformed",
            "dropped_empty"]


class Deduplicator:
    """Exact and near-duplicate decisions, the same as taking the documents one by one in order (so
    runs are reproducible), made a batch at a time with numpy. Near duplicates are documents that share
    a MinHash LSH band key with an earlier kept document."""

    def __init__(self, exact: bool):
        self.check_exact = exact  # band keys are checked when a batch has them
        self.exact, self.bands = KeySet(), KeySet()

    def verdicts(self, hashes: np.ndarray, band_keys: np.ndarray | None, candidates: np.ndarray) -> np.ndarray:
        """KEEP, DUPLICATE or NEAR_DUPLICATE for each candidate of the batch (others get KEEP and leave
        no trace in the index), from the text hashes and the LSH band keys (None: no near-duplicate check)."""
        verdict = np.full(len(candidates), KEEP, dtype=np.int8)
        live = np.flatnonzero(candidates)
        if self.check_exact:
            hashes = hashes[live]
            repeated = np.ones(len(live), dtype=bool)
            repeated[np.unique(hashes, return_index=True)[1]] = False  # not the first in the batch
            duplicate = repeated | self.exact.contains(hashes)
            verdict[live[duplicate]] = DUPLICATE
            self.exact.add(hashes[~duplicate])
            live = live[~duplicate]
        if band_keys is not None:
            keys = band_keys[live]
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
