import csv
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CHATGLM_MODEL = os.path.join(ROOT, "..", "shared", "chatglm_tokenizer", "tokenizer.model")

torch.set_num_threads(2)


@pytest.fixture
def chatglm_path() -> str:
    if not os.path.isfile(CHATGLM_MODEL):
        pytest.skip(f"ChatGLM2 tokenizer.model not found at {CHATGLM_MODEL} "
                    "(see chatglm_tokenizer/README.md for where to get it)")
    return CHATGLM_MODEL


POEMS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "红豆生南国，春来发几枝。愿君多采撷，此物最相思。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
    "人民日报记者报道，今年全国粮食产量再创新高，农民收入稳步增长。",
    "中国人民银行宣布下调存款准备金率，以保持流动性合理充裕。",
    "Hello 1998年1月1日。",
]


def write_corpus(path, n_docs: int = 300) -> list[str]:
    """A text file of n_docs distinct documents, one a line: a real line after 40 characters drawn at
    random from the real lines (so that no two documents are near duplicates)."""
    import random
    rng = random.Random(0)
    chars = sorted(set("".join(POEMS)))
    docs = []
    for i in range(n_docs):
        docs.append(f"第{i}篇：" + "".join(rng.choice(chars) for _ in range(40)) + rng.choice(POEMS))
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return docs


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> str:
    """A 600-id SentencePiece BPE model of ours, trained on a small corpus (about a second)."""
    from train_tokenizer import Config, train
    folder = tmp_path_factory.mktemp("tok")
    write_corpus(folder / "corpus.txt", 500)
    out = folder / "tokenizer.model"
    train(Config(sources="", inputs=f"txt:{folder / 'corpus.txt'}", out=str(out), vocab_size=600,
                 compare_with="", character_coverage=1.0))
    return str(out)


def write_csv(path, header: list[str], rows) -> None:
    """A CSV file as the SFT, preference and evaluation scripts read it."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
