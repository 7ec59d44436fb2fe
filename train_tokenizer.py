"""Train our own SentencePiece BPE tokenizer (byte fallback; unk 0, bos 1, eos 2) on the corpus stream.

    python train_tokenizer.py                          # 8k vocab on the built-in demo corpus
    python train_tokenizer.py --vocab_size=32000 --sources= --inputs=jsonl:my_corpus.jsonl:text

One document in a hundred (by hash of its text) is held out; characters per token on the held-out
documents is reported for the new tokenizer and, when its file is present, for ChatGLM2's.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import sentencepiece as spm
from tqdm import tqdm

from babyllama.chat_format import MARKERS
from babyllama.cleaning import clean_text
from babyllama.common import write_json_atomic
from babyllama.configurator import OutputFile, Positive, PositiveFraction, in_range, parse_config
from babyllama.corpora import CorpusError, iter_corpus
from babyllama.dedup import held_out, text_hash
from babyllama.errors import one_line_errors
from chatglm_tokenizer import DEFAULT_MODEL, MIN_VOCAB, load_tokenizer

MAX_VOCAB = 65535  # ids must fit in uint16


@dataclass
class Config:
    sources: str = "peoples_daily,idioms,dictionary"  # built-in sources in data/raw (download_data.py)
    inputs: str = ""  # your files, comma-separated: PATH, FORMAT:PATH or FORMAT:PATH:FIELD
    encoding: str = "utf-8"  # of your text files (gb18030 for Chinese Windows files); a BOM is fine
    raw_dir: str = "data/raw"  # where download_data.py put the built-in sources
    out: OutputFile = "data/tokenizer/tokenizer.model"  # the model file; tokenizer.json is written beside it
    vocab_size: in_range(MIN_VOCAB, MAX_VOCAB, int) = 8192  # specials, markers, 256 bytes at least; fits uint16
    max_chars: Positive = 20_000_000  # stop sampling training text after this many characters
    character_coverage: PositiveFraction = 0.995  # rarer characters fall back to UTF-8 bytes
    compare_with: str = DEFAULT_MODEL  # another tokenizer to report characters per token for
    threads: Positive = 2  # SentencePiece trainer threads
    overwrite: bool = False  # replace an existing tokenizer at `out`


HELD_OUT = 0.01  # data_process.py's default val_fraction: the tokenizer never sees val.bin's documents


def split_corpus(cfg: Config) -> tuple[Iterator[str], list[str], dict[str, int]]:
    """Training sentences (one line of a cleaned document each), the held-out documents, and the count
    of characters the sentences gave (filled as they are read)."""
    held: list[str] = []
    read = {"characters": 0}

    def sentences() -> Iterator[str]:
        total = 0
        bar = tqdm(unit=" chars", unit_scale=True, desc="sampling text", mininterval=1.0)
        for doc in iter_corpus(cfg.sources, cfg.inputs, cfg.raw_dir, cfg.encoding):
            if doc.text is None:
                continue
            text = clean_text(doc.text)
            if not text:
                continue
            if held_out(text_hash(text), HELD_OUT):
                held.append(text)
                continue
            for line in text.split("\n"):
                if line:
                    yield line
            total += len(text)
            read["characters"] = total
            bar.update(len(text))
            if total >= cfg.max_chars:
                break
        bar.close()
    return sentences(), held, read


def chars_per_token(model_path: str, texts: list[str]) -> float:
    tok = load_tokenizer(model_path)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts, num_threads=2))
    return sum(len(t) for t in texts) / max(n_tokens, 1)


def train(cfg: Config) -> dict:
    if os.path.exists(cfg.out) and not cfg.overwrite:
        raise CorpusError(f"{cfg.out} exists; pass --overwrite=true to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    sentences, held, read = split_corpus(cfg)
    prefix = cfg.out[:-len(".model")] if cfg.out.endswith(".model") else cfg.out
    tmp_prefix = prefix + ".tmp"
    temps = [tmp_prefix + ".model", tmp_prefix + ".vocab"]
    try:
        _train_sentencepiece(cfg, sentences, tmp_prefix)
    except RuntimeError as e:  # SentencePiece's messages are long C++ traces; keep the reason
        for path in filter(os.path.exists, temps):
            os.remove(path)
        if not read["characters"]:
            raise CorpusError("no text to train on: the inputs hold no document with text (after cleaning, "
                              "and leaving out the held-out ones)") from None
        reason = str(e).split("] ")[-1].strip() or str(e).strip()
        raise CorpusError(f"SentencePiece could not train: {reason}") from None
    os.replace(tmp_prefix + ".model", cfg.out)
    os.replace(tmp_prefix + ".vocab", prefix + ".vocab")
    report = {"vocab_size": cfg.vocab_size, "held_out_documents": len(held), "settings": asdict(cfg),
              "chars_per_token": {os.path.basename(cfg.out): chars_per_token(cfg.out, held)}}
    if cfg.compare_with and os.path.isfile(cfg.compare_with):
        report["chars_per_token"][cfg.compare_with] = chars_per_token(cfg.compare_with, held)
    write_json_atomic(os.path.join(os.path.dirname(os.path.abspath(cfg.out)), "tokenizer.json"), report)
    print(f"wrote {cfg.out} ({cfg.vocab_size} ids); characters per token on {len(held)} held-out documents:")
    for name, value in report["chars_per_token"].items():
        print(f"  {name}: {value:.3f}")
    return report


def _train_sentencepiece(cfg: Config, sentences: Iterator[str], model_prefix: str) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_prefix=model_prefix, model_type="bpe", vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        # identity normalisation and no dummy prefix keep decode(encode(x)) == x for cleaned text
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=16384,
        user_defined_symbols=MARKERS,  # the chat template's markers, each one piece (chat_format.py)
        num_threads=cfg.threads, minloglevel=2)


def main(argv: list[str] | None = None) -> None:
    with one_line_errors():
        train(parse_config(Config, argv, __doc__))


if __name__ == "__main__":
    main(sys.argv[1:])
