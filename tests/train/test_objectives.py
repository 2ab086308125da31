"""The distillation objective (fused, chunked KL) against the reference implementation it replaced.

The reference is the objective as it was before the KL was chunked: teacher and student logits on all
KL rows as full ``[N, V]`` tensors, the three losses by :func:`combine`. Tiny real models (dropout off, so
both see the same forward), a padded batch with masked positions; loss terms and every student gradient
must agree to 1e-5, with the KL over all tokens and over the masked ones only.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from distilflow.tasks.prepare.masking import IGNORE_INDEX
from distilflow.tasks.train.config import TrainConfig
from distilflow.tasks.train.heldout import student_head
from distilflow.tasks.train.losses import ce_rows, combine
from distilflow.tasks.train.models import init_student_from_teacher
from distilflow.tasks.train.objectives import DistillObjective


def reference_forward(obj: DistillObjective, b: dict[str, torch.Tensor]):
    """The pre-chunking DistillObjective.forward (+ its teacher_outputs), verbatim in substance."""
    sel = ce_rows(b["labels"], b["attention_mask"], obj.restrict)
    with torch.no_grad():
        h_t = obj.teacher.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                               token_type_ids=b["token_type_ids"]).last_hidden_state
        t_logits, t_hidden = obj.teacher.cls.predictions(h_t[sel]), h_t[b["attention_mask"].bool()]
    h = obj.model.distilbert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    s_logits = student_head(obj.model, h[sel])
    lo = combine(s_logits, t_logits, b["labels"][sel], h[b["attention_mask"].bool()], t_hidden, obj.t, *obj.a)
    masked = b["labels"][sel] != IGNORE_INDEX
    acc = (s_logits[masked].argmax(-1) == b["labels"][sel][masked]).float().mean()
    return lo.total, {"loss_ce": lo.ce, "loss_mlm": lo.mlm, "loss_cos": lo.cos, "mlm_acc": acc}


def _setup(restrict: bool):
    torch.manual_seed(0)
    tcfg = BertConfig(vocab_size=211, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    teacher = BertForMaskedLM(tcfg).eval().requires_grad_(False)
    student = init_student_from_teacher(teacher, (1,)).train()
    with torch.no_grad():  # the student should not equal the teacher's head, or the KL would be ~0
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = TrainConfig(mode="distill", data="d", output="o", teacher="t", restrict_ce_to_mask=restrict,
                      temperature=2.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 211, (3, 12), generator=g)
    attn = torch.ones(3, 12, dtype=torch.long)
    attn[1, 9:] = 0
    attn[2, 5:] = 0
    labels = torch.full((3, 12), IGNORE_INDEX)
    for r, cols in enumerate(([1, 4, 7], [2, 8], [3])):
        labels[r, cols] = ids[r, cols]
        ids[r, cols] = 4  # [MASK]
    b = {"input_ids": ids * attn, "attention_mask": attn, "token_type_ids": torch.zeros_like(ids),
         "labels": labels}
    return DistillObjective(student, teacher, cfg), b


@pytest.mark.parametrize("restrict", [False, True])
def test_fused_objective_matches_the_reference(restrict):
    obj, b = _setup(restrict)
    loss, terms = obj(b)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in obj.model.named_parameters() if p.grad is not None}
    obj.model.zero_grad(set_to_none=True)
    ref_loss, ref_terms = reference_forward(obj, b)
    ref_loss.backward()
    assert ref_terms["loss_ce"].item() > 1e-3  # a real KL, not a vacuous comparison
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for k, v in ref_terms.items():
        torch.testing.assert_close(terms[k], v.detach(), rtol=1e-5, atol=1e-5)
    for n, p in obj.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-5, msg=n)
    assert set(grads) == {n for n, p in obj.model.named_parameters() if p.grad is not None}
    assert not any(p.requires_grad for p in obj.teacher.parameters())
    assert all(p is not q for p in obj.parameters() for q in obj.teacher.parameters())  # teacher not a submodule
