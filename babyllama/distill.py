"""Distillation. White-box: the student matches the teacher's next-token distribution, softened by a
temperature, mixed with the data's own cross-entropy, over the positions the data trains. Black-box: the
student is fine-tuned on the teacher's own answers to the data's prompts (teacher_examples).

    loss = mix * T^2 * KL(teacher_T || student_T) + (1 - mix) * cross-entropy(student, targets)

averaged over the positions whose target is not ignored. With top_k the teacher's k most likely tokens
of each position stand for its distribution: both distributions are renormalised over those k (so the
term is still zero for a student equal to its teacher). T^2 keeps the gradient's size independent of T
(Hinton et al., 2015). With a chunk size, positions are taken a chunk at a time and each chunk's logits
are recomputed in the backward pass, so neither model's (positions, vocabulary) logits ever exist whole.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import IGNORE_INDEX


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 for the softmaxes; float32 and float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kd_terms(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float,
             top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL terms times T^2, cross-entropies) of each position, from float logits (N, V) of both models."""
    ce = F.cross_entropy(student, targets, reduction="none")
    if top_k:
        teacher, picked = teacher.topk(top_k, dim=-1)
        student_at = student.gather(-1, picked)
    else:
        student_at = student
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    log_q = F.log_softmax(student_at / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl * temperature ** 2, ce


def distillation_loss(h: torch.Tensor, weight: torch.Tensor, teacher_h: torch.Tensor,
                      teacher_logits: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                      temperature: float = 2.0, mix: float = 0.5, top_k: int = 0, chunk: int = 0) -> torch.Tensor:
    """The mean loss over the trained positions of the student's final hidden states h (B, T, dim) and
    output weight (V, dim), against the teacher's hidden states teacher_h (B, T, dim_teacher) and its
    output layer teacher_logits; targets (B, T) with IGNORE_INDEX where nothing is trained. chunk:
    positions whose logits exist at once (recomputed in the backward); 0: all of them."""
    keep = targets.reshape(-1) != IGNORE_INDEX
    h, teacher_h, targets = h.reshape(-1, h.size(-1))[keep], teacher_h.reshape(-1, teacher_h.size(-1))[keep], \
        targets.reshape(-1)[keep]
    if targets.numel() == 0:
        return h.sum() * 0.0

    def chunk_loss(h_part: torch.Tensor, w: torch.Tensor, t_part: torch.Tensor, y_part: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = at_least_float32(teacher_logits(t_part))
        kl, ce = kd_terms(at_least_float32(h_part @ w.t()), teacher, y_part, temperature, top_k)
        return (mix * kl + (1 - mix) * ce).sum()

    if not chunk:
        return chunk_loss(h, weight, teacher_h, targets) / targets.numel()
    total = sum(checkpoint(chunk_loss, h[i:i + chunk], weight, teacher_h[i:i + chunk], targets[i:i + chunk],
                           use_reentrant=False)
                for i in range(0, targets.numel(), chunk))
    return total / targets.numel()


def teacher_examples(teacher: torch.nn.Module, tok, rows: list[tuple[str, str, list]], max_seq_len: int,
                     answer_tokens: int, temperature: float, generator: torch.Generator | None = None,
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """SFT examples (inputs, labels) of the teacher's answers to rows' prompts (prompt, the data's answer,
    history): the prompt and history masked, the teacher's answer and the eos that ended it trained (an
    answer cut at answer_tokens has no eos to learn)."""
    from dataset_sft import chat_prompt_ids, make_example
    prompts = [chat_prompt_ids(tok, [tuple(turn) for turn in history], prompt, max_seq_len, reserve=answer_tokens)
               for prompt, _, history in rows]
    answers = teacher.generate(prompts, answer_tokens, temperature=temperature, eos_id=tok.eos_id,
                               generator=generator)
    examples = []
    for ids, answer in zip(prompts, answers):
        ended = [tok.eos_id] if len(answer) < answer_tokens else []
        examples.append(make_example(ids + answer + ended, [False] * len(ids) + [True] * (len(answer) + len(ended))))
    return examples
