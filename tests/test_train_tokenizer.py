import subprocess
import sys

import pytest
from conftest import POEMS, write_corpus

from babyllama.chat_format import MARKERS
from babyllama.configurator import SettingError, parse_config
from babyllama.corpora import CorpusError
from chatglm_tokenizer import MIN_VOCAB, load_tokenizer
from train_tokenizer import Config, train


def test_our_tokenizer_layout_and_round_trip(small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.sp.id_to_piece(i) for i in range(3, 3 + len(MARKERS))] == MARKERS  # the chat template's
    assert tok.sp.id_to_piece(3 + len(MARKERS)) == "<0x00>" and tok.sp.id_to_piece(MIN_VOCAB - 1) == "<0xFF>"
    assert tok.special_tokens == {} and tok.vocab_size == 600
    text = POEMS[0] + " 不在语料里的字：龘𠀀 emoji 😀"
    assert tok.decode(tok.encode(text)) == text  # byte fallback covers unseen characters


def test_refuses_to_overwrite_and_bad_vocab(tmp_path, small_tokenizer, capsys):
    with pytest.raises(CorpusError, match="exists"):
        train(Config(sources="", inputs="x.txt", out=small_tokenizer))
    with pytest.raises(SettingError, match=r"^--vocab_size=70000: must be at most 65,535$"):
        parse_config(Config, ["--vocab_size=70000"])


def test_cli_reports_too_small_vocab_in_one_line(tmp_path):
    write_corpus(tmp_path / "c.txt", 100)
    result = subprocess.run([sys.executable, "train_tokenizer.py", "--sources=", f"--inputs=txt:{tmp_path}/c.txt",
                             f"--out={tmp_path}/t.model", f"--vocab_size={MIN_VOCAB}", "--character_coverage=1.0"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: SentencePiece could not train: Vocabulary size is smaller than required_chars")
