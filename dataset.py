"""Pretraining windows over uint16 token memmaps.

Any number of `.bin` files (or folders of them) form one token stream. Window i holds tokens
[i*L, i*L + L + 1) for L = max_seq_len: inputs are its first L tokens, targets its last L, so
consecutive windows share one token and every token of the stream is a target once (the seed cut
512-token windows and trained on 511 of them). Windows may span two files: none is lost at a boundary.
The last window may be short; its missing targets are IGNORE_INDEX, so the tail is not lost either.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import numpy as np
import torch

from babyllama.errors import UsageError

TOKEN_DTYPE = np.uint16
IGNORE_INDEX = -100


class CorpusMismatch(UsageError):
    """A .bin made with another tokenizer than the one training uses."""


def bin_files(paths: list[str] | str, split: str = "train") -> list[str]:
    """The .bin files of paths; a folder gives its `<split>.bin` (or every .bin in it if that is absent)."""
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            own = os.path.join(path, f"{split}.bin")
            files += [own] if os.path.isfile(own) else sorted(glob.glob(os.path.join(path, "**", "*.bin"),
                                                                        recursive=True))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"no corpus at {path}: run data_process.py first")
    if not files:
        raise FileNotFoundError(f"no .bin files in {paths}")
    return files


def corpus_tokenizer_sha(files: list[str]) -> str | None:
    """The tokenizer sha256 recorded in the meta.json beside the files; they must all agree."""
    shas = set()
    for f in files:
        meta = os.path.join(os.path.dirname(f), "meta.json")
        if os.path.isfile(meta):
            with open(meta, encoding="utf-8") as fh:
                shas.add(json.load(fh).get("tokenizer_sha256"))
    if len(shas) > 1:
        raise CorpusMismatch(f"the corpora {files} were made with different tokenizers")
    return shas.pop() if shas else None


def check_tokenizer(files: list[str], tokenizer_sha: str) -> None:
    corpus_sha = corpus_tokenizer_sha(files)
    if corpus_sha is not None and corpus_sha != tokenizer_sha:
        raise CorpusMismatch(f"{files[0]} was made with tokenizer sha256 {corpus_sha[:12]}..., "
                             f"but this run's tokenizer is {tokenizer_sha[:12]}...; rerun data_process.py with "
                             "this tokenizer or pass the corpus's --tokenizer")


def chars_per_token(files: list[str], split: str) -> float | None:
    """Characters per token of one corpus's split, from its meta.json, to turn a loss into bits per
    character (None for several corpora or none)."""
    meta = os.path.join(os.path.dirname(files[0]), "meta.json") if len(files) == 1 else ""
    if not os.path.isfile(meta):
        return None
    with open(meta, encoding="utf-8") as f:
        m = json.load(f)
    chars, tokens = m.get("characters", {}).get(split), m.get("tokens", {}).get(split)
    return chars / tokens if chars and tokens else None


class PretrainDataset(torch.utils.data.Dataset):
    """Map-style: item i is window i as (inputs, targets), int64 tensors of max_seq_len tokens.

    The windows tile the token stream back to back; with aligned_to=eos_id each starts at a document's
    start instead (aligned_window_starts)."""

    def __init__(self, paths: list[str] | str, max_seq_len: int, split: str = "train", aligned_to: int | None = None):
        # An empty file holds no tokens (a corpus made with --val_fraction=0 has an empty val.bin), and numpy
        # cannot map one: it is left out.
        given = bin_files(paths, split)
        self.files = [f for f in given if os.path.getsize(f)]
        self.max_seq_len = max_seq_len
        sizes = [os.path.getsize(f) // np.dtype(TOKEN_DTYPE).itemsize for f in self.files]
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.n_tokens = int(self.starts[-1])
        self._maps: list[np.memmap] | None = None  # opened lazily, so the dataset pickles to workers
        self.window_starts = None if aligned_to is None else aligned_window_starts(
            self._eos_positions(aligned_to), self.n_tokens, max_seq_len)
        self.n_windows = (max(0, -(-(self.n_tokens - 1) // max_seq_len)) if self.window_starts is None
                          else len(self.window_starts))
        if self.n_windows == 0:
            raise ValueError(f"{given} hold {self.n_tokens} tokens: fewer than one window of "
                             f"{max_seq_len + 1}")

    def _eos_positions(self, eos_id: int) -> np.ndarray:
        maps = [np.memmap(f, dtype=TOKEN_DTYPE, mode="r") for f in self.files]
        return np.concatenate([np.flatnonzero(m == eos_id) + start for m, start in zip(maps, self.starts)])

    def __len__(self) -> int:
        return self.n_windows

    def _tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the whole stream, read across file boundaries."""
        if self._maps is None:
            self._maps = [np.memmap(f, dtype=TOKEN_DTYPE, mode="r") for f in self.files]
        out = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            local = start - self.starts[i]
            take = min(end, self.starts[i + 1]) - start
            out.append(self._maps[i][local:local + take])
            start += take
            i += 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def window(self, i: int) -> np.ndarray:
        """max_seq_len + 1 tokens as int64; the last window is padded with -1 (never a real id)."""
        start = i * self.max_seq_len if self.window_starts is None else int(self.window_starts[i])
        tokens = self._tokens(start, min(start + self.max_seq_len + 1, self.n_tokens)).astype(np.int64)
        if len(tokens) < self.max_seq_len + 1:
            tokens = np.pad(tokens, (0, self.max_seq_len + 1 - len(tokens)), constant_values=-1)
        return tokens

    @staticmethod
    def _split(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = w[..., :-1].clone(), w[..., 1:].clone()
        inputs[inputs < 0] = 0
        targets[targets < 0] = IGNORE_INDEX
        return inputs, targets

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(torch.from_numpy(self.window(i)))

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, max_seq_len) for these windows, read in-process (no DataLoader workers:
        on a few CPU cores they cost a core and are slower than the memmap read)."""
        return self._split(torch.from_numpy(np.stack([self.window(i) for i in indices])))


def aligned_window_starts(eos_positions: np.ndarray, n_tokens: int, max_seq_len: int) -> np.ndarray:
    """Window starts that are document starts: the stream's first token or an eos (a document's first
    input, as the held-out score and a chat read one). A window ends inside the last document it
    reaches, which starts the next window whole (its head read twice); a document longer than the
    window goes on in the next one where the window ended."""
    starts, start = [], 0
    while start < n_tokens - 1:
        starts.append(start)
        end = start + max_seq_len
        last = int(np.searchsorted(eos_positions, end, side="left")) - 1  # the last eos before end
        start = int(eos_positions[last]) if last >= 0 and eos_positions[last] > start else end
    return np.array(starts, dtype=np.int64)


def pretraining_splits(paths: list[str] | str, tokenizer_sha256: str, max_seq_len: int, aligned_to: int | None = None,
                       ) -> tuple[PretrainDataset, PretrainDataset | None, float | None]:
    """The training windows of paths (made with this tokenizer: checked), their val.bin windows when
    there are any, and the validation split's characters per token (for bits per character).
    aligned_to: the eos id, for training windows that start at documents' starts."""
    files = bin_files(paths, "train")
    check_tokenizer(files, tokenizer_sha256)
    val_files = [f for f in bin_files(paths, "val") if f not in files and os.path.getsize(f)]
    val = PretrainDataset(val_files, max_seq_len) if val_files else None
    return (PretrainDataset(files, max_seq_len, aligned_to=aligned_to), val,
            chars_per_token(val_files, "val") if val_files else None)


GROUPS_PER_SORT = 64  # steps whose items are sorted together: a run of 64 steps still spans the whole mix of lengths


def group_by_length(order: np.ndarray, lengths: np.ndarray, group: int, rng: np.random.Generator) -> np.ndarray:
    """order regrouped: each run of GROUPS_PER_SORT * group items sorted by length and cut into groups of
    group items, those groups then shuffled among themselves. Every item stays, once."""
    chunk = GROUPS_PER_SORT * group
    out = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        groups = [part[i:i + group] for i in range(0, len(part), group)]
        whole = len(part) // group  # a short last group stays last, so later steps keep their alignment
        out += [groups[i] for i in rng.permutation(whole)] + groups[whole:]
    return np.concatenate(out) if out else order


class WindowOrder:
    """The order in which one rank visits windows: a permutation per epoch from (seed, epoch), sharded
    so that ranks see disjoint windows, with a resumable position.

    The ranks together take the epoch's permutation from its start, a window each in turn: after any
    number of steps the windows seen in the epoch are a prefix of it, whatever the number of ranks. So a
    run resumes on another number of ranks by sharing the rest of the epoch among the new ranks. Every
    rank gets the same number of windows per epoch (the few left after an even split are left out for
    that epoch, and fall elsewhere in the next permutation), so DDP ranks stay in step.

    Given the items' lengths and the items a step takes from it (all ranks together), each epoch's
    permutation is regrouped so that a step's items have similar lengths (`group_by_length`): a padded
    batch then wastes little on padding."""

    def __init__(self, n_windows: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 lengths: Sequence[int] | None = None, group: int = 1):
        if n_windows < world_size:
            raise ValueError(f"{n_windows} windows cannot be shared by {world_size} ranks")
        if lengths is not None and len(lengths) != n_windows:
            raise ValueError(f"{len(lengths)} lengths for {n_windows} items")
        self.n_windows, self.seed, self.rank, self.world_size, self.shuffle = \
            n_windows, seed, rank, world_size, shuffle
        self.lengths, self.group = (None if lengths is None else np.asarray(lengths)), group
        self.epoch, self.position = 0, 0
        self.start = 0  # windows of this epoch taken before this run (by any number of ranks)
        self._order = self._epoch_order()

    @property
    def per_rank(self) -> int:
        """Windows this rank takes in the current epoch."""
        return len(self._order)

    def _epoch_order(self) -> np.ndarray:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(self.n_windows)
            if self.lengths is not None:
                order = group_by_length(order, self.lengths, self.group, rng)
        else:
            order = np.arange(self.n_windows)
        rest = order[self.start:]
        return rest[self.rank::self.world_size][:len(rest) // self.world_size]

    def next(self, count: int) -> list[int]:
        """The next count window indices (wrapping into the next epoch)."""
        out: list[int] = []
        while len(out) < count:
            if self.position == self.per_rank:
                self.epoch, self.position, self.start = self.epoch + 1, 0, 0
                self._order = self._epoch_order()
            take = min(count - len(out), self.per_rank - self.position)
            out += self._order[self.position:self.position + take].tolist()
            self.position += take
        return out

    def state_dict(self) -> dict:
        """Where the ranks together are: the epoch and how many of its windows they have taken (the same
        for every rank, as all ranks take the same number)."""
        return {"epoch": self.epoch, "taken": self.start + self.position * self.world_size, "seed": self.seed,
                "n_windows": self.n_windows, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where a run of any number of ranks left off."""
        if state["n_windows"] != self.n_windows:
            raise ValueError(f"cannot resume the data order: it was for {state['n_windows']} windows, now "
                             f"{self.n_windows}")
        taken = state["taken"] if "taken" in state else state["position"] * state["world_size"]
        self.seed, self.epoch, self.start, self.position = state["seed"], state["epoch"], taken, 0
        self._order = self._epoch_order()
