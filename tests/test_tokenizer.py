import os
import shutil

import numpy as np
import pytest

from chatglm_tokenizer import TokenizerNotFound, load_tokenizer

MIXED = "床前明月光，疑是地上霜。Hello world! 😀 naïve café\n\n  两个空格\t制表符 ½ 𠀀"


def test_chatglm_ids_match_sentencepiece(chatglm_path):
    import sentencepiece as spm
    tok = load_tokenizer(chatglm_path)
    sp = spm.SentencePieceProcessor(model_file=chatglm_path)
    text = "床前明月光，疑是地上霜。Hello world!"
    assert tok.encode(text) == sp.encode(text)
    assert len(tok.encode(text)) == 14
    assert tok.special_tokens["[gMASK]"] == 64790
    assert tok.special_tokens["sop"] == 64792
    assert tok.special_tokens["eop"] == 64793
    assert tok.vocab_size == 64794
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_round_trip_and_batch(chatglm_path):
    tok = load_tokenizer(chatglm_path)
    assert tok.decode(tok.encode(MIXED)) == MIXED
    texts = [MIXED, "你好", "a"]
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]


def test_decode_drops_special_ids(chatglm_path):
    tok = load_tokenizer(chatglm_path)
    ids = tok.encode("你好")
    assert tok.decode([64790, 64792] + ids + [tok.eos_id, 64793]) == "你好"


def test_huggingface_autotokenizer_gives_same_ids(chatglm_path, tmp_path):
    transformers = pytest.importorskip("transformers")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "chatglm_tokenizer")
    for name in ("tokenization_chatglm.py", "sp_tokenizer.py", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), tmp_path)
    shutil.copy(chatglm_path, tmp_path / "tokenizer.model")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=True)
    ours = load_tokenizer(chatglm_path)
    assert hf.encode(MIXED) == ours.encode(MIXED)
    assert hf(MIXED)["input_ids"] == ours.encode(MIXED)
    assert hf.decode(ours.encode(MIXED)) == MIXED
    assert hf.convert_tokens_to_ids("[gMASK]") == 64790
    assert len(hf) == 64794
    hf.save_pretrained(str(tmp_path / "saved"))
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"), trust_remote_code=True)
    assert again.encode(MIXED) == ours.encode(MIXED)


def test_missing_tokenizer_says_where_to_get_it(tmp_path):
    with pytest.raises(TokenizerNotFound, match="huggingface.co/THUDM/chatglm2-6b"):
        load_tokenizer(str(tmp_path / "nope.model"))


def test_encode_joined_equals_encode_batch(small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    texts = [MIXED, "", "你好", "a"]
    ids, lengths = tok.encode_joined(texts)
    assert ids.dtype == np.int32 and lengths.tolist() == [len(tok.encode(t)) for t in texts]
    assert ids.tolist() == [i for t in texts for i in tok.encode(t)]
    assert tok.encode_joined([])[0].shape == (0,)
