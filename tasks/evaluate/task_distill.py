"""Task distillation: fine-tune a student on a task with a fine-tuned teacher's soft targets.

The second distillation step of DistilBERT's SQuAD model (``distilbert-base-cased-distilled-squad``;
``run_squad_w_distillation.py`` in transformers' examples): the loss of a training batch is

    alpha * KL(softmax(teacher / T) || softmax(student / T)) * T^2  +  (1 - alpha) * task loss

(T^2 keeps the soft-target gradients on the scale of the hard-target ones, Hinton et al. 2015). For
SQuAD the KL term is the mean of the start and end distributions' terms, as the task loss is; for a
regression task (STS-B) the soft target is the teacher's prediction, matched with a squared error.
The teacher's logits are computed once, in eval mode, before training (its outputs do not depend on
the student), so a distilled run costs one teacher inference pass over the training set on top of
plain fine-tuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature T, times T^2, averaged over rows.

    ``student_logits``, ``teacher_logits``: [batch, classes] (or [batch, positions] for QA start/end).
    Computed in float32 whatever the autocast dtype (a KL of bf16 log-probabilities is too coarse).
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    p_teacher = F.softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * (t * t)


def task_distill_loss(task_loss: torch.Tensor, student_logits: torch.Tensor | tuple[torch.Tensor, ...],
                      teacher_logits: torch.Tensor | tuple[torch.Tensor, ...], temperature: float, alpha: float,
                      regression: bool = False) -> torch.Tensor:
    """``alpha * soft + (1 - alpha) * task_loss``; tuples of logits (QA start, end) average their soft terms."""
    s = student_logits if isinstance(student_logits, tuple) else (student_logits,)
    t = teacher_logits if isinstance(teacher_logits, tuple) else (teacher_logits,)
    if regression:
        soft = sum(F.mse_loss(a.float().view(-1), b.float().view(-1)) for a, b in zip(s, t, strict=True))
    else:
        soft = sum(soft_target_loss(a, b, temperature) for a, b in zip(s, t, strict=True))
    return alpha * (soft / len(s)) + (1.0 - alpha) * task_loss
