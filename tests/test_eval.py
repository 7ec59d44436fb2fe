import importlib
import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from conftest import ROOT, write_csv

import eval as evaluate
from babyllama.chat_format import Answer, render_answer
from babyllama.choice import Question, read_choice_csv, write_choice_csv
from babyllama.distributed import Dist
from babyllama.tasks import char_f1, rouge_l, task_of
from babyllama.tool_tasks import tasks
from babyllama.trainer import TrainConfig, Trainer
from chatglm_tokenizer import load_tokenizer
from dataset_sft import collate, encode_turns, make_example
from eval import Config, score, tool_scores
from eval_choice import choose
from model import ModelArgs, Transformer

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=600, max_seq_len=64, multiple_of=16)


def test_char_f1_and_rouge_l_by_hand():
    assert char_f1("画蛇添足", "画蛇添足") == 1.0
    assert char_f1("", "abc") == 0.0
    # common {a, b}: precision 2/3, recall 2/4 -> F1 = 4/7
    assert char_f1("abx", "abcd") == pytest.approx(4 / 7)
    # LCS("abcde", "axcye") = "ace" (3): P = R = 3/5
    assert rouge_l("abcde", "axcye") == pytest.approx(0.6)
    assert rouge_l("ba", "ab") == pytest.approx(0.5)


def test_repetition_metrics_by_hand():
    from babyllama.tasks import distinct_n, has_loop
    assert distinct_n(["爱爱爱爱"], 1) == 0.25 and distinct_n(["爱爱爱爱"], 2) == 1 / 3
    assert distinct_n(["春眠", "不觉"], 1) == 1.0 and distinct_n(["春", ""], 2) == 0.0
    assert distinct_n(["ab", "ab"], 2) == 0.5  # over all the answers, not each one
    assert has_loop("答案是爱爱爱爱") and has_loop("好的好的好的") and has_loop("指一种一种一种东西")
    assert not has_loop("哈哈哈") and not has_loop("比喻做了多余的事，反而不恰当。") and not has_loop("谢谢")


def test_task_of_and_score():
    assert task_of("成语“画蛇添足”是什么意思？") == "idiom"
    assert task_of("“好”字是什么意思？") == "character"
    assert task_of("你好") == "other"
    rows = [("成语“甲”是什么意思？", "比喻多此一举", []), ("你好", "你好啊", [])]
    s = score(rows, ["比喻多此一举", "再见再见再见"], exact_chars=10)
    assert s["idiom"]["f1"] == 1.0 and s["idiom"]["exact_match"] == 1.0
    assert s["all"]["samples"] == 2 and s["all"]["exact_match"] == 0.5
    assert s["idiom"]["loop"] == 0.0 and s["other"]["loop"] == 1.0 and s["all"]["loop"] == 0.5
    assert s["other"]["distinct_1"] == 2 / 6 and s["idiom"]["distinct_2"] == 1.0


def questions():
    # Real-looking 4-way questions; the right option is at a different place each time.
    texts = ["春眠不觉晓", "处处闻啼鸟", "夜来风雨声", "花落知多少", "床前明月光", "疑是地上霜", "举头望明月",
             "低头思故乡", "白日依山尽", "黄河入海流", "欲穷千里目", "更上一层楼"]
    out = []
    for i in range(12):
        options = [texts[(i + k) % 12] for k in range(4)]
        out.append(Question(f"第{i}题：下一句是什么？", options, i % 4))
    return out


def test_choice_scorer_reaches_100_after_overfitting_and_chance_before(tmp_path, small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    qs = questions()
    path = tmp_path / "ceval.csv"
    write_choice_csv(str(path), qs)
    qs = read_choice_csv(str(path))  # through the C-Eval CSV layout
    torch.manual_seed(0)
    model = Transformer(TINY)
    before = sum(p == q.answer for p, q in zip(choose(model.eval(), tok, qs, [], "chat", 16), qs)) / len(qs)
    examples = [make_example(*encode_turns(tok, [(q.question, q.options[q.answer])], 64)) for q in qs]
    trainer = Trainer(model.train(), TrainConfig(lr=3e-3, min_lr=1e-4, warmup_steps=5, max_steps=200, weight_decay=0.1,
                                                    dtype="float32"), Dist())
    batch = collate(examples)
    for _ in range(150):
        trainer.train_step([batch], lambda m, b: m(b[0], b[1])[1])
    after = sum(p == q.answer for p, q in zip(choose(model.eval(), tok, qs, [], "chat", 16), qs)) / len(qs)
    assert after == 1.0
    assert before <= 0.5  # chance is 0.25; an untrained model must not know the answers


def test_choice_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match="bad.csv:2: answer 'E'"):
        read_choice_csv(str(bad))
    cmmlu = tmp_path / "cmmlu.csv"
    cmmlu.write_text(",Question,A,B,C,D,Answer\n0,问,甲,乙,丙,丁,C\n")
    assert read_choice_csv(str(cmmlu))[0].answer == 2


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    model = Transformer(TINY)
    torch.save({"model": model.state_dict(), "model_args": asdict(TINY)}, folder / "ckpt.pt")
    return folder / "ckpt.pt"


def test_chat_from_a_pipe(chat_ckpt, small_tokenizer):
    result = subprocess.run([sys.executable, f"{ROOT}/chat.py", f"--ckpt={chat_ckpt}", f"--tokenizer={small_tokenizer}",
                             "--max_new_tokens=8"], input="你好\n/set temperature=0.5\n/settings\n/reset\n再见\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "temperature = 0.5" in lines and "(conversation forgotten)" in lines
    assert any(line.startswith("temperature=0.5") for line in lines)
    assert len(lines) == 5  # two answers and three command replies


def test_eval_scripts_run_and_write(chat_ckpt, small_tokenizer, lookup_tables, tmp_path):
    val = tmp_path / "val.csv"
    write_csv(val, ["prompt", "answer", "history"],
              [[f"成语“{word}”是什么意思？", f"第{i}个意思", "[]"]
               for i, word in enumerate(["画蛇添足", "守株待兔", "亡羊补牢", "对牛弹琴", "井底之蛙"])])
    out = tmp_path / "eval"
    run = [sys.executable, f"{ROOT}/eval.py", f"--ckpt={chat_ckpt}", f"--tokenizer={small_tokenizer}",
           f"--val_data={val}", f"--out={out}", "--max_new_tokens=8", "--questions=你好|再见", "--tool_tasks=6",
           "--tool_lookups=true", f"--raw_dir={lookup_tables}"]
    result = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores"]["idiom"]["samples"] == 5 and len(summary["questions"]) == 2
    assert summary["val_answer_loss"] > 0
    assert set(summary["tool_tasks"]) == {"numbers", "templates"}
    for kinds in summary["tool_tasks"].values():
        assert kinds["all"]["tasks"] == 6 == sum(s["tasks"] for kind, s in kinds.items() if kind != "all")
        for shares in kinds.values():
            assert set(shares) == {"tasks", "valid_call", "right_tool", "right_arguments", "right_answer",
                                   "right_answer_without_tools", "question_in_view"}
            assert all(0 <= v <= 1 for k, v in shares.items() if k != "tasks")
    assert "held-out tool tasks (6 a split)" in result.stdout
    assert "lookup" in summary["tool_tasks"]["numbers"] | summary["tool_tasks"]["templates"]
    choice = subprocess.run([sys.executable, f"{ROOT}/eval_choice.py", f"--ckpt={chat_ckpt}",
                             f"--tokenizer={small_tokenizer}", f"--val_data={val}", f"--json={tmp_path}/c.json"],
                            capture_output=True, text=True, timeout=120)
    assert choice.returncode == 0, choice.stderr
    assert json.loads((tmp_path / "c.json").read_text())["chance"] == 0.25
    text = tmp_path / "held_out.txt"
    text.write_text("床前明月光，疑是地上霜。举头望明月，低头思故乡。\n" * 20, encoding="utf-8")
    pre = subprocess.run([sys.executable, f"{ROOT}/eval_pretrain.py", f"--ckpt={chat_ckpt}",
                          f"--tokenizer={small_tokenizer}", "--bin=", f"--text={text}", "--max_new_tokens=5",
                          f"--json={tmp_path}/p.json"], capture_output=True, text=True, timeout=120)
    assert pre.returncode == 0, pre.stderr
    scores = json.loads((tmp_path / "p.json").read_text())["scores"]["text"]
    assert scores["bits_per_char"] > 0 and scores["perplexity"] > 1


def test_answers_come_back_in_order_and_equal_one_at_a_time(small_tokenizer):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**asdict(TINY), "tie_embeddings": False}))  # tied, it repeats its input
    tok = load_tokenizer(small_tokenizer)
    conversations = [([], "你好" * n) for n in (9, 1, 5, 2, 7)] + [([("春天", "来了")], "然后呢")]
    together = evaluate.answer(model, tok, conversations, Config(max_new_tokens=6, batch_size=2))
    alone = [evaluate.answer(model, tok, [c], Config(max_new_tokens=6, batch_size=1))[0] for c in conversations]
    assert together == alone and len(set(alone)) > 1


def test_tool_scores_say_when_the_final_turn_lost_its_question(small_tokenizer, monkeypatch):
    """A scripted model that calls right and answers right: every score is 1, and the question is in view
    only while the window holds the whole second turn."""
    tok = load_tokenizer(small_tokenizer)
    tool_tasks = [t for t in tasks("numbers", 6) if t.kind == "arithmetic"]

    def scripted(model, tok, conversations, cfg, reserve=None):
        by_question = {t.question: t for t in tool_tasks}
        if conversations[0][0]:  # second turns: the right final answer
            return [next(t.answer for q, t in by_question.items() if h[0][0].endswith(q)) for h, _ in conversations]
        return [render_answer(Answer("", t.reasoning, [t.call])) if q.startswith("<tools>") else "不知道"
                for q, t in zip((q for _, q in conversations), tool_tasks)]

    monkeypatch.setattr(evaluate, "answer", scripted)
    for window, in_view in ((4096, 1.0), (64, 0.0)):
        model = Transformer(ModelArgs(**{**asdict(TINY), "max_seq_len": window}))
        shares = tool_scores(model, tok, tool_tasks, Config())["all"]
        assert shares["tasks"] == len(tool_tasks) and shares["question_in_view"] == in_view
        assert shares["right_arguments"] == shares["right_answer"] == 1.0 and shares["right_answer_without_tools"] == 0


@pytest.mark.parametrize("script", ["chat", "eval", "eval_choice", "eval_pretrain"])
def test_missing_checkpoint_is_one_line(script, small_tokenizer, capsys):
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as e:
        main(["--ckpt=/nope/ckpt.pt", f"--tokenizer={small_tokenizer}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(lines) == 1 and lines[0].startswith("error: --ckpt=/nope/ckpt.pt: no such file")


def test_eval_pretrain_reads_a_document_masked_model_one_document_at_a_time(tmp_path, corpus, small_tokenizer,
                                                                            pretrained):
    """A checkpoint trained with --document_mask is scored as it was trained: attention stays inside each
    document of the windows (the mask's loss, not the whole window's)."""
    from babyllama.checkpoint import load_model
    from eval_pretrain import bin_windows, main, mean_loss
    state = torch.load(pretrained[0], weights_only=False)
    state["config"]["document_mask"] = True
    torch.save(state, tmp_path / "masked.pt")
    val = corpus / "data" / "val.bin"
    scores = {}
    for name, ckpt in (("plain", pretrained[0]), ("masked", tmp_path / "masked.pt")):
        main([f"--ckpt={ckpt}", f"--tokenizer={small_tokenizer}", f"--bin={val}", "--prompts=春", "--max_new_tokens=1",
              f"--json={tmp_path / name}.json"])
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["scores"]["bin"]["loss"]
    model, _ = load_model(str(pretrained[0]))
    tok = load_tokenizer(small_tokenizer)
    windows = bin_windows(str(val), model.args.max_seq_len, 200, tok)
    assert (windows[:, 1:-1] == tok.eos_id).any()  # documents meet inside the windows
    assert scores["plain"] == pytest.approx(mean_loss(model, windows, 8)[0], rel=1e-5)
    model.document_eos = tok.eos_id
    assert scores["masked"] == pytest.approx(mean_loss(model, windows, 8)[0], rel=1e-5)
    assert scores["masked"] != pytest.approx(scores["plain"], rel=1e-4)
