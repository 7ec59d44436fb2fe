"""babyllama/distill.py's loss against a float64 reference written out in full, its limits (a student
equal to its teacher, mix 0), its gradients through the chunks; distill.py end to end on tiny models."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, metrics, pretrain_command, run_ok

from babyllama.checkpoint import load_model
from babyllama.distill import IGNORE_INDEX, distillation_loss, teacher_examples


def reference(h, w, th, tw, y, temperature, mix, top_k):
    """The loss position by position in float64, with the whole logits."""
    h, w, th, tw = h.double(), w.double(), th.double(), tw.double()
    total, count = 0.0, 0
    for b in range(y.shape[0]):
        for t in range(y.shape[1]):
            if y[b, t] == IGNORE_INDEX:
                continue
            s, z = h[b, t] @ w.t(), th[b, t] @ tw.t()
            ce = -torch.log_softmax(s, -1)[y[b, t]]
            if top_k:
                picked = z.topk(top_k).indices
                s, z = s[picked], z[picked]
            p, log_q = torch.softmax(z / temperature, -1), torch.log_softmax(s / temperature, -1)
            kl = (p * (p.log() - log_q)).sum() * temperature ** 2
            total, count = total + mix * kl + (1 - mix) * ce, count + 1
    return total / count


def tensors(seed=0, vocab=50, dim=8, teacher_dim=12):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 7, dim, generator=g, requires_grad=True)
    w = torch.randn(vocab, dim, generator=g, requires_grad=True)
    th, tw = torch.randn(2, 7, teacher_dim, generator=g), torch.randn(vocab, teacher_dim, generator=g)
    y = torch.randint(0, vocab, (2, 7), generator=g)
    y[0, :3] = IGNORE_INDEX  # a prompt's positions
    return h, w, th, tw, y


@pytest.mark.parametrize("top_k,chunk", [(0, 0), (0, 3), (5, 4)])
@pytest.mark.parametrize("temperature,mix", [(1.0, 0.5), (2.0, 1.0), (0.5, 0.2)])
def test_loss_and_gradients_equal_the_float64_reference(top_k, chunk, temperature, mix):
    h, w, th, tw = (t.double().detach().requires_grad_(t.requires_grad) for t in tensors()[:4])
    y = tensors()[4]
    ours = distillation_loss(h, w, th, lambda x: x @ tw.t(), y, temperature, mix, top_k, chunk)
    theirs = reference(h, w, th, tw, y, temperature, mix, top_k)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-10)
    grads = torch.autograd.grad(ours, (h, w))
    expected = torch.autograd.grad(theirs, (h, w))
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_a_student_equal_to_its_teacher_has_nothing_to_learn():
    h, w, _, _, y = tensors()
    for top_k in (0, 5):
        loss = distillation_loss(h, w, h.detach(), lambda x: x @ w.detach().t(), y, 2.0, 1.0, top_k, 4)
        assert abs(float(loss.detach())) < 1e-6


def test_mix_zero_is_the_plain_cross_entropy():
    h, w, th, tw, y = tensors()
    loss = distillation_loss(h, w, th, lambda x: x @ tw.t(), y, 2.0, 0.0, 0, 5)
    plain = F.cross_entropy((h @ w.t()).view(-1, w.shape[0]), y.view(-1), ignore_index=IGNORE_INDEX)
    assert float(loss.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)


def test_distill_trains_a_student_from_a_teacher(corpus, small_tokenizer, tmp_path):
    teacher = tmp_path / "teacher"
    run_ok(pretrain_command(corpus, small_tokenizer, teacher, "--max_steps=30", "--eval_interval=100000"))
    out = tmp_path / "student"
    distill = [sys.executable, os.path.join(ROOT, "distill.py"),
               f"--teacher={teacher / 'ckpt.pt'}", f"--model={corpus / 'preset.py'}", f"--data={corpus / 'data'}",
               f"--tokenizer={small_tokenizer}", f"--out_dir={out}", "--dtype=float32", "--peak_tflops=1",
               "--batch_size=4", "--max_steps=12", "--eval_interval=6", "--eval_batches=2", "--lr=3e-3",
               "--warmup_steps=2", "--log_interval=1", "--top_k=20", "--loss_chunk=100", "--teacher_int8=true"]
    said = run_ok(distill).stdout
    assert "distilling" in said and "top 20" in said
    rows = metrics(out)
    assert [m["step"] for m in rows] == list(range(1, 13))
    vals = [m["val_loss"] for m in rows if "val_loss" in m]
    assert vals[-1] < vals[0] and "val_bpc" in rows[-1]
    student, state = load_model(str(out / "ckpt.pt"))
    assert state["stage"] == "distill" and state["step"] == 12


def test_distill_on_sft_samples_trains_the_answers(pretrained, small_tokenizer, tmp_path):
    ckpt, data = pretrained
    out = tmp_path / "sft"
    run_ok([sys.executable, os.path.join(ROOT, "distill.py"), f"--teacher={ckpt}", f"--init_from={ckpt}",
            f"--data={data / 'train.csv'}", f"--val_data={data / 'val.csv'}", f"--tokenizer={small_tokenizer}",
            f"--out_dir={out}", "--dtype=float32", "--peak_tflops=1", "--batch_size=4", "--max_steps=4",
            "--eval_interval=2", "--eval_batches=1", "--log_interval=1", "--mix=1", "--loss_chunk=7"])
    rows = metrics(out)
    # A student equal to its teacher starts with nothing to learn from it: the first step's loss is zero.
    assert rows[0]["loss"] == pytest.approx(0.0, abs=1e-5) and "val_loss" in rows[1]


class ScriptedTeacher:
    """A teacher whose answers are given: what teacher_examples asks of a model."""

    def __init__(self, answers):
        self.answers, self.prompts = answers, None

    def generate(self, prompts, max_new_tokens, **kwargs):
        self.prompts = prompts
        return [a[:max_new_tokens] for a in self.answers]


def test_black_box_examples_train_the_teachers_answers_only(small_tokenizer):
    from chatglm_tokenizer import load_tokenizer
    tok = load_tokenizer(small_tokenizer)
    teacher = ScriptedTeacher([[10, 11, 12], [20, 21, 22, 23, 24, 25]])  # the second is cut at 5 tokens
    rows = [("床前明月光", "the data's answer, unused", []), ("举头望明月", "unused", [["你好", "你好！"]])]
    (x1, y1), (x2, y2) = teacher_examples(teacher, tok, rows, max_seq_len=64, answer_tokens=5, temperature=0.0)
    first, second = teacher.prompts
    assert first[-1] == tok.bos_id and tok.encode("你好") == second[:len(tok.encode("你好"))]  # history kept
    assert y1.tolist() == [IGNORE_INDEX] * (len(first) - 1) + [10, 11, 12, tok.eos_id]
    assert y2.tolist() == [IGNORE_INDEX] * (len(second) - 1) + [20, 21, 22, 23, 24]  # cut: no eos to learn
    assert x1.tolist() == first + [10, 11, 12]


def test_black_box_distill_runs_on_sft_prompts(pretrained, small_tokenizer, tmp_path):
    ckpt, data = pretrained
    out = tmp_path / "black_box"
    said = run_ok([sys.executable, os.path.join(ROOT, "distill.py"), f"--teacher={ckpt}", f"--init_from={ckpt}",
                   f"--data={data / 'train.csv'}", f"--val_data={data / 'val.csv'}", f"--tokenizer={small_tokenizer}",
                   f"--out_dir={out}", "--dtype=float32", "--peak_tflops=1", "--batch_size=4", "--max_steps=3",
                   "--eval_interval=3", "--eval_batches=1", "--log_interval=1", "--black_box=true",
                   "--answer_tokens=8"]).stdout
    assert "black box: up to 8 tokens" in said
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


def test_a_document_masked_teacher_reads_windows_as_it_was_trained(pretrained, small_tokenizer, tmp_path):
    """The teacher's distributions over a window of several documents are the ones its training taught it:
    attention inside each document when its run had --document_mask, across them when not."""
    from chatglm_tokenizer import load_tokenizer
    from distill import Config, load_teacher
    tok = load_tokenizer(small_tokenizer)
    state = torch.load(pretrained[0], weights_only=False)
    state["config"]["document_mask"] = True
    torch.save(state, tmp_path / "masked.pt")
    for ckpt, eos in ((pretrained[0], None), (tmp_path / "masked.pt", tok.eos_id)):
        teacher = load_teacher(Config(teacher=str(ckpt), tokenizer=small_tokenizer), tok, "cpu")
        assert teacher.document_eos == eos
