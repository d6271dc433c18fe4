"""The knowledge-distillation loss, computed in chunks of positions so that its fp32 logits never exist whole."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a training target (a label that is not -100); the last position never is."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def _chunk_kl_sum(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (mask * (log_t.exp() * (log_t - log_s)).sum(-1)).sum()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
            chunk_size: int | None = 1024) -> torch.Tensor:
    """T^2 * mean over the masked positions of KL(softmax(teacher / T) || softmax(student / T)).

    Logits are [batch, seq, vocab] in any dtype; the KL is computed in fp32 over `chunk_size` positions at a time,
    each chunk recomputed in the backward pass (activation checkpointing), so the fp32 copies held at once are those
    of one chunk: about 3 * chunk_size * vocab * 4 bytes (1.6 GB for 1024 positions of a 128k vocabulary, against
    50 GB for a whole batch of 8 x 4096 positions; a smaller chunk_size lowers it further).
    `chunk_size=None` computes it in one piece (the reference the chunked result is tested against).
    """
    vocab = student_logits.shape[-1]
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f'teacher logits {tuple(teacher_logits.shape)} and student logits '
                         f'{tuple(student_logits.shape)} differ (same vocabulary and batch needed)')
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    flat_mask = mask.reshape(-1).to(torch.float32)
    count = flat_mask.sum().clamp(min=1.0)
    if chunk_size is None:
        return temperature ** 2 * _chunk_kl_sum(student, teacher, flat_mask, temperature) / count
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, student.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(_chunk_kl_sum, student[start:end], teacher[start:end], flat_mask[start:end],
                                   temperature, use_reentrant=False)
    return temperature ** 2 * total / count
