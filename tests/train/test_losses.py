"""Each DistilBERT loss term against a hand computation on a tiny batch."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distilflow.tasks.train.losses import distillation_losses, fused_head_losses, kl_soft_targets, mlm_ce


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, L, V, H = 2, 4, 7, 5
    s_logits, t_logits = torch.randn(B, L, V, generator=g), torch.randn(B, L, V, generator=g)
    s_h, t_h = torch.randn(B, L, H, generator=g), torch.randn(B, L, H, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, 3, -100, 6], [2, -100, -100, -100]])
    return s_logits, t_logits, s_h, t_h, labels, mask


def _hand(s_logits, t_logits, s_h, t_h, labels, mask, T, restrict):
    """Plain Python loops over positions: the definitions written out."""
    kl, n_kl, ce, n_ce, cos, n_cos = 0.0, 0, 0.0, 0, 0.0, 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            if not mask[b, i]:
                continue
            p = [math.exp(x / T) for x in t_logits[b, i].tolist()]
            q = [math.exp(x / T) for x in s_logits[b, i].tolist()]
            p = [x / sum(p) for x in p]
            q = [x / sum(q) for x in q]
            if not restrict or labels[b, i] != -100:
                kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
                n_kl += 1
            if labels[b, i] != -100:
                z = s_logits[b, i].tolist()
                ce += -(z[labels[b, i]] - math.log(sum(math.exp(x) for x in z)))
                n_ce += 1
            u, v = s_h[b, i].tolist(), t_h[b, i].tolist()
            dot = sum(a * c for a, c in zip(u, v, strict=True))
            cos += 1 - dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(c * c for c in v)))
            n_cos += 1
    return kl / n_kl * T * T, ce / n_ce, cos / n_cos


def test_terms_match_hand_computation():
    for restrict in (False, True):
        for T in (1.0, 2.0, 3.5):
            args = _batch()
            lo = distillation_losses(*args[:4], args[4], args[5], temperature=T, restrict_ce_to_mask=restrict)
            kl, ce, cos = _hand(*args, T, restrict)
            assert math.isclose(lo.ce.item(), kl, rel_tol=1e-5)
            assert math.isclose(lo.mlm.item(), ce, rel_tol=1e-5)
            assert math.isclose(lo.cos.item(), cos, rel_tol=1e-5)
            assert math.isclose(lo.total.item(), 5 * kl + 2 * ce + 1 * cos, rel_tol=1e-5)


def test_padding_is_ignored():
    s_logits, t_logits, s_h, t_h, labels, mask = _batch()
    a = distillation_losses(s_logits, t_logits, s_h, t_h, labels, mask)
    s_logits[1, 2:] = 1e3  # garbage at padded positions
    s_h[1, 3] = -7.0
    b = distillation_losses(s_logits, t_logits, s_h, t_h, labels, mask)
    assert torch.equal(a.total, b.total)


def test_kl_and_cos_zero_when_student_is_teacher():
    s_logits, _, s_h, _, labels, mask = _batch()
    lo = distillation_losses(s_logits, s_logits.clone(), s_h, s_h.clone(), labels, mask)
    assert abs(lo.ce.item()) < 1e-6 and abs(lo.cos.item()) < 1e-6
    assert lo.mlm.item() > 0  # the hard-label term does not vanish


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 8.0))
def test_kl_nonnegative_and_zero_iff_equal(seed, T):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    assert kl_soft_targets(s, t, T).item() >= -1e-6
    assert abs(kl_soft_targets(t, t + 3.0, T).item()) < 1e-5  # shift-invariant softmax


# -- the fused, chunked KL + MLM terms against the reference (autograd through full logits) ---------------
def _head_case(seed: int, n: int = 13, h: int = 8, v: int = 37, masked_every: int = 3):
    g = torch.Generator().manual_seed(seed)
    z, zt = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(n, h, generator=g, dtype=torch.float64)
    w, wt = torch.randn(v, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64)
    b, bt = torch.randn(v, generator=g, dtype=torch.float64), torch.randn(v, generator=g, dtype=torch.float64)
    labels = torch.full((n,), -100)
    labels[::masked_every] = torch.randint(0, v, (len(labels[::masked_every]),), generator=g)
    return [x.float() for x in (z, w, b, zt, wt, bt)], labels


@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
@pytest.mark.parametrize("T", [1.0, 2.0, 3.5])
def test_fused_head_losses_match_reference_values_and_gradients(chunk, T):
    (z, w, b, zt, wt, bt), labels = _head_case(int(T * 10) + chunk)
    ref = [x.clone().requires_grad_(True) for x in (z, w, b)]
    s_logits = ref[0] @ ref[1].t() + ref[2]
    kl_ref, mlm_ref = kl_soft_targets(s_logits, zt @ wt.t() + bt, T), mlm_ce(s_logits, labels)
    (5.0 * kl_ref + 2.0 * mlm_ref).backward()
    new = [x.clone().requires_grad_(True) for x in (z, w, b)]
    lo = fused_head_losses(*new, zt, wt, bt, labels, T, 5.0, 2.0, chunk=chunk)
    lo.loss.backward()
    torch.testing.assert_close(lo.loss, (5.0 * kl_ref + 2.0 * mlm_ref).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lo.kl, kl_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lo.mlm, mlm_ref.detach(), rtol=1e-5, atol=1e-5)
    masked = labels != -100
    assert int(lo.correct) == int((s_logits[masked].argmax(-1) == labels[masked]).sum())
    for a, r in zip(new, ref, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-5)


def test_fused_head_losses_edge_cases():
    (z, w, b, zt, wt, bt), labels = _head_case(0)
    none = torch.full_like(labels, -100)  # no masked row: the MLM term is 0 and adds no gradient
    zz = z.clone().requires_grad_(True)
    lo = fused_head_losses(zz, w, b, zt, wt, bt, none, 2.0, alpha_ce=0.0, alpha_mlm=2.0)
    assert lo.mlm.item() == 0.0 and int(lo.correct) == 0 and lo.loss.item() == 0.0
    lo.loss.backward()
    assert zz.grad is not None and not zz.grad.any()
    same = fused_head_losses(z, w, b, z, w, b, labels, 2.0)  # student == teacher: no KL
    assert abs(same.kl.item()) < 1e-6


def test_fused_head_losses_in_bf16_accumulate_in_fp32():
    """The low-precision path (what CUDA autocast gives): bf16 matmuls, fp32 softmax and accumulators."""
    (z, w, b, zt, wt, bt), labels = _head_case(3)
    ref = fused_head_losses(z.clone().requires_grad_(True), w, b, zt, wt, bt, labels, 2.0)
    zb = z.bfloat16().requires_grad_(True)
    lo = fused_head_losses(zb, w.bfloat16(), b.bfloat16(), zt.bfloat16(), wt.bfloat16(), bt.bfloat16(), labels, 2.0)
    lo.loss.backward()
    assert lo.loss.dtype == torch.float32 and zb.grad is not None and zb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lo.loss, ref.loss.detach(), rtol=0.05, atol=0.05)
