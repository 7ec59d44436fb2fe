"""lm-evaluation-harness on an exported model: the baby_choice tasks score what eval_choice.py scores."""
import importlib.util
import os
import random

import pytest
import torch
from conftest import POEMS, ROOT, scrambled

from babyllama.choice import Question, option_characters, write_choice_csv
from chatglm_tokenizer import load_tokenizer
from eval_choice import option_logprobs
from export import export_hf
from model import ModelArgs, Transformer

lm_eval = pytest.importorskip("lm_eval", reason="pip install lm-eval (requirements-dev.txt)")
TASKS = os.path.join(ROOT, "lm_eval_tasks")


def choice_files(folder) -> tuple[list[Question], list[Question]]:
    rng = random.Random(0)
    texts = "".join(POEMS)
    def question(i):
        start = rng.randrange(len(texts) - 12)
        options = [texts[(start + 9 * k) % len(texts):][:rng.randint(1, 6)] for k in range(1, 5)]
        return Question(f"第{i}题：{texts[start:start + 8]}？", options, i % 4)
    test, dev = [question(i) for i in range(24)], [question(100 + i) for i in range(3)]
    write_choice_csv(str(folder / "test.csv"), test)
    write_choice_csv(str(folder / "dev.csv"), dev)
    return test, dev


def exported(folder, tokenizer: str, vocab_size: int) -> Transformer:
    model = scrambled(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=vocab_size, max_seq_len=128,
                                multiple_of=16), 0.1)
    export_hf(model, tokenizer, str(folder / "hf"))
    return model


def harness(folder, tasks: list[str], shots: int, **model_args) -> dict:
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=TASKS, metadata={"file": str(folder / "test.csv"),
                                                        "dev_file": str(folder / "dev.csv")})
    args = ",".join(f"{k}={v}" for k, v in {"pretrained": folder / "hf", "dtype": "float32", **model_args}.items())
    return lm_eval.simple_evaluate(model="hf", model_args=args, tasks=tasks, num_fewshot=shots, task_manager=manager,
                                   log_samples=True, batch_size=8, device="cpu")


def assert_same_scores(result: dict, fmt: str, ours: torch.Tensor, questions: list[Question]) -> None:
    """Every option's log-likelihood equal; the accuracy equal, questions whose two best per-character
    scores are within float noise of each other (ties) aside."""
    samples = sorted(result["samples"][f"baby_choice_{fmt}"], key=lambda s: s["doc_id"])
    theirs = torch.tensor([[r[0][0] for r in s["resps"]] for s in samples], dtype=torch.float64)
    assert (theirs - ours).abs().max() < 1e-4
    per_char = ours / torch.tensor([[option_characters(o) for o in q.options] for q in questions])
    top2 = per_char.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert clear.sum() >= len(questions) - 1, "the scrambled model should leave no ties"
    right = per_char.argmax(-1) == torch.tensor([q.answer for q in questions])
    harness_right = torch.tensor([s["acc_norm"] for s in samples]) == 1.0
    assert torch.equal(right[clear], harness_right[clear])
    if bool(clear.all()):
        assert result["results"][f"baby_choice_{fmt}"]["acc_norm,none"] == pytest.approx(right.double().mean().item())


def test_harness_scores_as_eval_choice_with_our_tokenizer(tmp_path, small_tokenizer):
    test, dev = choice_files(tmp_path)
    model = exported(tmp_path, small_tokenizer, 600)
    result = harness(tmp_path, ["baby_choice_chat", "baby_choice_plain"], shots=2)
    tok = load_tokenizer(small_tokenizer)
    for fmt in ("chat", "plain"):
        assert_same_scores(result, fmt, option_logprobs(model, tok, test, dev[:2], fmt, 16), test)


def test_harness_scores_as_eval_choice_with_chatglm_tokenizer(tmp_path, chatglm_path):
    test, _ = choice_files(tmp_path)
    model = exported(tmp_path, chatglm_path, 64896)
    result = harness(tmp_path, ["baby_choice_chat"], shots=0, trust_remote_code=True)
    assert_same_scores(result, "chat", option_logprobs(model, load_tokenizer(chatglm_path), test, [], "chat", 16), test)


def test_task_without_questions_says_how_to_give_them():
    spec = importlib.util.spec_from_file_location("baby_choice_utils", os.path.join(TASKS, "utils.py"))
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    with pytest.raises(ValueError, match="--metadata"):
        utils.chat_documents(version=1.0)
