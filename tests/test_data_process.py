import hashlib
import json

import numpy as np
import pytest
from conftest import write_corpus

from babyllama.cleaning import clean_text
from babyllama.corpora import CorpusError
from babyllama.dedup import minhash
from chatglm_tokenizer import load_tokenizer
from data_process import Config, process
from dataset import CorpusMismatch, bin_files, check_tokenizer


def make_inputs(tmp_path):
    docs = write_corpus(tmp_path / "news.txt", 200)
    extra = tmp_path / "extra.jsonl"
    lines = [json.dumps({"text": "  重复的文档，  内容完全一样。\u3000"}, ensure_ascii=False)] * 3
    lines += ['{"text": broken', json.dumps({"text": "短"}, ensure_ascii=False),
              json.dumps({"text": docs[5] + "！"}, ensure_ascii=False)]  # near-duplicate of doc 5
    extra.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return docs, f"txt:{tmp_path / 'news.txt'},jsonl:{extra}"


def processed(tmp_path, tokenizer, inputs, out="out", **kw):
    cfg = Config(**{"sources": "", "inputs": inputs, "out_dir": str(tmp_path / out), "tokenizer": tokenizer,
                    "workers": 2, "batch_docs": 16, "val_fraction": 0.1, **kw})
    return process(cfg), cfg


def test_counts_tokens_and_decoding(tmp_path, small_tokenizer):
    docs, inputs = make_inputs(tmp_path)
    meta, cfg = processed(tmp_path, small_tokenizer, inputs)
    news, extra = meta["sources"]["txt:news.txt"], meta["sources"]["jsonl:extra.jsonl"]
    assert news == {"read": 200, "kept": 200}
    assert extra == {"read": 6, "kept": 1, "dropped_duplicate": 2, "dropped_malformed": 1,
                     "dropped_too_short": 1, "dropped_near_duplicate": 1}
    for c in meta["sources"].values():
        assert c["read"] == c["kept"] + sum(v for k, v in c.items() if k.startswith("dropped_"))
    assert meta["malformed_examples"][0].startswith(f"{tmp_path / 'extra.jsonl'}:4: malformed JSON")

    tok = load_tokenizer(small_tokenizer)
    kept = [clean_text(d) for d in docs] + [clean_text("  重复的文档，  内容完全一样。\u3000")]
    streams = [np.fromfile(f, dtype=np.uint16) for f in bin_files(cfg.out_dir, "train") + bin_files(cfg.out_dir, "val")]
    assert sum(len(s) for s in streams) == sum(len(tok.encode(d)) + 1 for d in kept)
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == sum(len(s) for s in streams)
    assert 0 < meta["documents"]["val"] < meta["documents"]["train"]
    decoded = []
    for s in streams:
        ends = np.flatnonzero(s == tok.eos_id)
        assert ends[-1] == len(s) - 1  # every document, the last included, ends with one eos
        decoded += [tok.decode(part.tolist()) for part in np.split(s, ends + 1)[:-1]]
    assert sorted(decoded) == sorted(kept)
    assert meta["tokenizer_sha256"] == tok.sha256


def test_rerun_is_byte_identical_and_safe(tmp_path, small_tokenizer):
    _, inputs = make_inputs(tmp_path)
    _, cfg = processed(tmp_path, small_tokenizer, inputs, out="a")
    # Other batching and no worker processes: the decisions and the output must not depend on either.
    _, cfg_b = processed(tmp_path, small_tokenizer, inputs, out="b", batch_docs=7, batch_chars=500)
    _, cfg_serial = processed(tmp_path, small_tokenizer, inputs, out="c", workers=0)

    def digest(folder):
        return [hashlib.sha256(open(f"{folder}/{s}.bin", "rb").read()).hexdigest() for s in ("train", "val")]
    assert digest(cfg.out_dir) == digest(cfg_b.out_dir) == digest(cfg_serial.out_dir)
    # Same inputs and settings: nothing to do. Other settings: refuse unless asked to overwrite.
    before = open(f"{cfg.out_dir}/meta.json").read()
    processed(tmp_path, small_tokenizer, inputs, out="a")
    assert open(f"{cfg.out_dir}/meta.json").read() == before
    with pytest.raises(CorpusError, match="--overwrite"):
        processed(tmp_path, small_tokenizer, inputs, out="a", min_chars=20)
    meta, _ = processed(tmp_path, small_tokenizer, inputs, out="a", min_chars=20, overwrite=True)
    assert meta["fingerprint"]["settings"]["min_chars"] == 20


def test_serial_equals_parallel(tmp_path, small_tokenizer):
    _, inputs = make_inputs(tmp_path)
    _, par = processed(tmp_path, small_tokenizer, inputs, out="p")
    cfg = Config(sources="", inputs=inputs, out_dir=str(tmp_path / "s"), tokenizer=small_tokenizer, workers=0,
                 batch_docs=7, val_fraction=0.1)
    process(cfg)
    for split in ("train", "val"):
        assert open(f"{par.out_dir}/{split}.bin", "rb").read() == open(f"{cfg.out_dir}/{split}.bin", "rb").read()


def test_training_refuses_other_tokenizer(tmp_path, small_tokenizer, chatglm_path):
    _, inputs = make_inputs(tmp_path)
    _, cfg = processed(tmp_path, small_tokenizer, inputs)
    files = bin_files(cfg.out_dir)
    check_tokenizer(files, load_tokenizer(small_tokenizer).sha256)
    with pytest.raises(CorpusMismatch, match="made with tokenizer"):
        check_tokenizer(files, load_tokenizer(chatglm_path).sha256)


def test_vocab_too_large_for_uint16(tmp_path, small_tokenizer, monkeypatch):
    import chatglm_tokenizer.sp_tokenizer as sp
    _, inputs = make_inputs(tmp_path)
    original = sp.SPTokenizer.__init__

    def huge(self, *a, **k):
        original(self, *a, **k)
        self.vocab_size = 70000
    monkeypatch.setattr(sp.SPTokenizer, "__init__", huge)
    with pytest.raises(CorpusError, match="uint16 holds at most 65536"):
        processed(tmp_path, small_tokenizer, inputs)


def test_minhash_estimates_jaccard():
    a = "".join(chr(0x4E00 + i) for i in range(400))
    b = a[:360] + "".join(chr(0x9000 + i) for i in range(40))
    same = (minhash(a, 256, 5) == minhash(b, 256, 5)).mean()
    true = len({a[i:i + 5] for i in range(396)} & {b[i:i + 5] for i in range(396)}) / \
        len({a[i:i + 5] for i in range(396)} | {b[i:i + 5] for i in range(396)})
    assert abs(same - true) < 0.08
    assert (minhash(a, 64, 5) == minhash(a, 64, 5)).all()


def test_minhash_of_short_texts_fills_every_bin_and_stays_unbiased():
    from babyllama.dedup import minhash_batch
    rng = np.random.default_rng(0)
    estimates, truths = [], []
    for _ in range(200):  # 12-80 characters: most of the 64 bins are empty before densification
        n = int(rng.integers(12, 80))
        a = "".join(chr(0x4E00 + int(x)) for x in rng.integers(0, 3000, n))
        cut = int(rng.integers(1, n // 2))
        b = a[:n - cut] + "".join(chr(0x4E00 + int(x)) for x in rng.integers(0, 3000, cut))
        sig = minhash_batch([a, b], 64, 5)
        assert (sig != np.uint64(2**64 - 1)).all()
        shingles_a, shingles_b = ({t[i:i + 5] for i in range(len(t) - 4)} for t in (a, b))
        estimates.append((sig[0] == sig[1]).mean())
        truths.append(len(shingles_a & shingles_b) / len(shingles_a | shingles_b))
    assert abs(np.mean(estimates) - np.mean(truths)) < 0.02
    assert np.sqrt(np.mean((np.array(estimates) - np.array(truths)) ** 2)) < 0.1


def test_text_hashes_equal_text_hash():
    from babyllama.dedup import text_hash, text_hashes
    texts = ["", "人民日报", "a" * 1000, "😀"]
    assert text_hashes(texts).tolist() == [text_hash(t) for t in texts]


def test_densify_takes_the_first_filled_bin_along_each_probe_sequence():
    """The batched densification equals its definition taken bin by bin, for rows from one filled bin
    (a text of one shingle) to nearly full."""
    from babyllama.dedup import _EMPTY, _probe_table, densify
    rng = np.random.default_rng(0)
    rows, n_perm = 300, 64
    filled = rng.random((rows, n_perm)) < rng.choice([0.0, 0.05, 0.3, 0.9], size=(rows, 1))
    filled[np.arange(rows), rng.integers(0, n_perm, rows)] = True
    signatures = np.where(filled, rng.integers(0, 2**63, (rows, n_perm), dtype=np.uint64), _EMPTY)
    probes = _probe_table(n_perm)
    expected = signatures.copy()
    for r, j in zip(*np.nonzero(~filled)):
        t = next(t for t in range(len(probes)) if filled[r, probes[t, j]])
        expected[r, j] = signatures[r, probes[t, j]]
    assert (densify(signatures) == expected).all()


def test_a_batch_of_short_documents_has_no_tokens_and_no_signatures(small_tokenizer):
    from data_process import _init_worker, process_batch
    _init_worker(small_tokenizer)
    out = process_batch(["短", "", "也很短的"], Config())
    assert not out.long_enough.any() and len(out.tokens) == 0 and out.offsets.tolist() == [0, 0, 0, 0]
    assert out.band_keys.shape == (3, 8) and not out.band_keys.any()
    mixed = process_batch(["短", "这是一个足够长的文档，会被保留下来。"], Config())
    assert mixed.offsets[1] == 0 < mixed.offsets[2] == len(mixed.tokens)
    assert not mixed.band_keys[0].any() and mixed.band_keys[1].all()


def test_count_verdicts_keeps_sources_in_the_order_they_came():
    from collections import Counter, defaultdict

    from babyllama.dedup import DUPLICATE, KEEP, TOO_SHORT
    from data_process import count_verdicts
    counts = defaultdict(Counter)
    count_verdicts(counts, ["zeta", "zeta", "alpha", "zeta"], np.array([KEEP, DUPLICATE, TOO_SHORT, KEEP]))
    count_verdicts(counts, ["alpha"], np.array([KEEP]))
    assert list(counts) == ["zeta", "alpha"]
    assert counts == {"zeta": {"read": 3, "kept": 2, "dropped_duplicate": 1},
                      "alpha": {"read": 2, "kept": 1, "dropped_too_short": 1}}


def test_cli_errors_are_one_line(tmp_path, small_tokenizer):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "data_process.py", "--sources=", f"--inputs=jsonl:{tmp_path}/none.jsonl",
                             f"--tokenizer={small_tokenizer}"], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: input jsonl:{tmp_path}/none.jsonl: "
                                                  f"{tmp_path}/none.jsonl does not exist"]


def test_keyset_big_and_small_parts_agree():
    from babyllama.dedup import KeySet
    keys = KeySet(merge_every=3)
    for batch in ([5, 2**63 + 7], [11], [3, 2**64 - 1]):
        keys.add(np.array(batch, dtype=np.uint64))
    assert len(keys) == 5 and len(keys.big) == 3 and len(keys.small) == 2
    probe = np.array([[5, 6], [2**64 - 1, 2**63 + 7]], dtype=np.uint64)
    assert keys.contains(probe).tolist() == [[True, False], [True, True]]
    assert keys.contains(np.array([3, 4], dtype=np.uint64)).tolist() == [True, False]
    again = KeySet(merge_every=2)
    for batch in ([5, 1, 5], [9], [2**64 - 1, 0], [7, 3]):
        new = np.array(batch, dtype=np.uint64)
        again.add(new[~again.contains(new)])
    assert again.big.tolist() == [0, 1, 3, 5, 7, 9, 2**64 - 1] and len(again.small) == 0  # sorted, each once


def test_dedup_decisions_match_one_by_one_in_order():
    """The batched decisions equal the plain definition: documents in order, each dropped if its hash
    was kept before (duplicate) or it shares a band key with a kept document (near duplicate)."""
    from babyllama.dedup import DUPLICATE, KEEP, NEAR_DUPLICATE, Deduplicator
    rng = np.random.default_rng(0)
    dedup = Deduplicator(exact=True)
    seen_hashes: set[int] = set()
    seen_keys: set[int] = set()
    every: list[int] = []
    for _ in range(5):
        n = 300
        hashes = rng.integers(0, 1000, n).astype(np.uint64)  # many exact repeats, within and across batches
        bands = (rng.integers(0, 300, (n, 8)) * 8 + np.arange(8)).astype(np.uint64)  # and shared band keys
        candidates = rng.random(n) < 0.9
        got = dedup.verdicts(hashes, bands, candidates).tolist()
        expected = []
        for i in range(n):
            verdict = KEEP
            if candidates[i]:
                if int(hashes[i]) in seen_hashes:
                    verdict = DUPLICATE
                else:
                    seen_hashes.add(int(hashes[i]))
                    row = set(bands[i].tolist())
                    if row & seen_keys:
                        verdict = NEAR_DUPLICATE
                    else:
                        seen_keys |= row
            expected.append(verdict)
        assert got == expected
        every += got
    assert min(every.count(v) for v in (DUPLICATE, NEAR_DUPLICATE, KEEP)) > 50


def test_dedup_decisions_do_not_depend_on_merging(tmp_path, small_tokenizer, monkeypatch):
    import babyllama.dedup as dedup
    _, inputs = make_inputs(tmp_path)
    meta, _ = processed(tmp_path, small_tokenizer, inputs, out="a")
    original = dedup.KeySet.__init__
    monkeypatch.setattr(dedup.KeySet, "__init__", lambda self, merge_every=0: original(self, 5))
    merged, _ = processed(tmp_path, small_tokenizer, inputs, out="b")
    assert merged["sources"] == meta["sources"]
    assert open(tmp_path / "a/train.bin", "rb").read() == open(tmp_path / "b/train.bin", "rb").read()
