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
