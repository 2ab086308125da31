"""The three DistilBERT losses (Sanh et al. 2019; HF ``examples/research_projects/distillation``).

    loss = a_ce * KL(softmax(t/T) || softmax(s/T)) * T^2 + a_mlm * CE(s, labels) + a_cos * (1 - cos(h_s, h_t))

* KL ("ce" in the paper: the cross-entropy against the teacher's soft targets, minus the teacher's
  entropy, which has no gradient) is averaged over the selected tokens: all non-padding tokens, or
  only the masked ones with ``restrict_ce_to_mask``. The ``T^2`` keeps its gradient scale independent
  of ``T`` (Hinton et al. 2015).
* MLM CE is over the masked positions (labels != -100), mean over them.
* cosine: ``1 - cos`` between student and teacher last hidden states, mean over non-padding tokens
  (same width, as the student is initialised from the teacher).

All three are computed in float32 whatever the autocast dtype (log-softmax over 30k classes in bf16
loses the small probabilities that distillation is about).

:func:`combine` / :func:`distillation_losses` compute the terms from full ``[N, V]`` logits: the reference.
Training uses :func:`fused_head_losses`, the same KL and MLM terms computed from the heads' inputs in row
chunks, whose gradients are formed chunk by chunk, so no full-vocabulary tensor is kept for backward
(equal to the reference within float rounding: 1e-5 in the tests, values and gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distilflow.tasks.prepare.masking import IGNORE_INDEX


@dataclass(frozen=True)
class DistilLosses:
    total: torch.Tensor
    ce: torch.Tensor
    mlm: torch.Tensor
    cos: torch.Tensor


def kl_soft_targets(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, mean over rows. ``[N, V]`` x ``[N, V]`` -> scalar."""
    if s_logits.shape[0] == 0:
        return s_logits.sum() * 0.0
    s = F.log_softmax(s_logits.float() / temperature, dim=-1)
    t = F.log_softmax(t_logits.float() / temperature, dim=-1)
    # kl_div(input=log q, target=log p, log_target) = sum p (log p - log q); batchmean = / N
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def mlm_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over rows whose label is not -100. ``[N, V]``, ``[N]`` -> scalar (0 if none)."""
    if (labels != IGNORE_INDEX).sum() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def cosine_loss(s_hidden: torch.Tensor, t_hidden: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos`` over rows. ``[N, H]`` x ``[N, H]`` -> scalar."""
    if s_hidden.shape[0] == 0:
        return s_hidden.sum() * 0.0
    return (1.0 - F.cosine_similarity(s_hidden.float(), t_hidden.float(), dim=-1)).mean()


def combine(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
            s_hidden: torch.Tensor, t_hidden: torch.Tensor, temperature: float = 2.0,
            alpha_ce: float = 5.0, alpha_mlm: float = 2.0, alpha_cos: float = 1.0) -> DistilLosses:
    """The objective on already-selected rows (what the training loop calls; no padding left).

    s_logits, t_logits: [N, V] logits of the rows the KL is taken over; labels: [N] (-100 = not
    masked); s_hidden, t_hidden: [M, H] last hidden states of all real tokens.
    """
    ce = kl_soft_targets(s_logits, t_logits, temperature)
    mlm = mlm_ce(s_logits, labels)
    cos = cosine_loss(s_hidden, t_hidden)
    return DistilLosses(alpha_ce * ce + alpha_mlm * mlm + alpha_cos * cos, ce, mlm, cos)


def ce_rows(labels: torch.Tensor, token_mask: torch.Tensor, restrict_ce_to_mask: bool) -> torch.Tensor:
    """Which tokens the KL term (and so the logits) covers: masked ones, or all real tokens."""
    return (labels != IGNORE_INDEX) if restrict_ce_to_mask else token_mask.bool()


def distillation_losses(
    s_logits: torch.Tensor, t_logits: torch.Tensor, s_hidden: torch.Tensor, t_hidden: torch.Tensor,
    labels: torch.Tensor, token_mask: torch.Tensor, temperature: float = 2.0,
    alpha_ce: float = 5.0, alpha_mlm: float = 2.0, alpha_cos: float = 1.0,
    restrict_ce_to_mask: bool = False,
) -> DistilLosses:
    """The DistilBERT objective on a padded batch.

    s_logits, t_logits: [B, L, V]; s_hidden, t_hidden: [B, L, H]; labels: [B, L] (-100 = not masked);
    token_mask: [B, L] bool/int, 1 on real (non-padding) tokens.
    """
    real = token_mask.bool()  # [B, L]
    sel = ce_rows(labels, token_mask, restrict_ce_to_mask)
    return combine(s_logits[sel], t_logits[sel], labels[sel], s_hidden[real], t_hidden[real],
                   temperature, alpha_ce, alpha_mlm, alpha_cos)


# -- the same KL + MLM terms without full-vocabulary tensors (what the training loop uses) -----------------
@dataclass(frozen=True)
class HeadLosses:
    loss: torch.Tensor  # alpha_ce * kl + alpha_mlm * mlm: the differentiable part
    kl: torch.Tensor  # KL(softmax(t/T) || softmax(s/T)) * T^2, mean over the rows (no gradient: for logging)
    mlm: torch.Tensor  # CE over the rows with a label, mean over them (no gradient)
    correct: torch.Tensor  # masked rows whose argmax is the label (no gradient)


class _FusedHeadLosses(torch.autograd.Function):
    """``logits = z @ W.T + b`` for student and teacher and ``a_ce * KL + a_mlm * CE`` on them, in row chunks.

    The gradient with respect to ``z``, ``W`` and ``b`` is accumulated chunk by chunk during the forward
    pass (three matmuls per chunk, ``W``'s gradient summed in place), so no ``[N, V]`` tensor outlives its
    chunk and the backward pass only scales the stored ``[N, H]`` / ``[V, H]`` / ``[V]`` gradients. Same
    matmul FLOPs as autograd through full logits, a fraction of the memory traffic. With s, t the logits:

        d(a_ce T^2 KL / N)/ds = a_ce T / N (softmax(s/T) - softmax(t/T));  d(a_mlm CE / M)/ds = a_mlm / M (softmax(s) - onehot(y))
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, zt: torch.Tensor,
                wt: torch.Tensor, bt: torch.Tensor, labels: torch.Tensor, temperature: float, alpha_ce: float,
                alpha_mlm: float, chunk: int) -> tuple[torch.Tensor, ...]:
        n, T, dev, f32 = z.shape[0], temperature, z.device, torch.float32
        masked = labels != IGNORE_INDEX  # [N]
        m = int(masked.sum())
        mm = _matmul_dtype(z)  # bf16 under autocast, as the nn.Linear it replaces would run
        wc, wtc, bc, btc = w.to(mm), wt.to(mm), b.to(mm), bt.to(mm)  # [V, H], [V]
        # the KL gradient's scale goes into the matmuls' alpha; the MLM rows are added to it relative to it
        k_scale = alpha_ce * T / n if n else 0.0
        out_scale = k_scale or 1.0
        kl, ce = torch.zeros((), dtype=f32, device=dev), torch.zeros((), dtype=f32, device=dev)
        correct = torch.zeros((), dtype=torch.long, device=dev)
        gz = torch.zeros(z.shape, dtype=f32, device=dev)  # [N, H]
        gw = torch.zeros(w.shape, dtype=f32, device=dev)  # [V, H]
        gb = torch.zeros(b.shape, dtype=f32, device=dev)  # [V]
        for i in range(0, n, chunk):
            zc = z[i: i + chunk].to(mm)  # [c, H]
            mc = masked[i: i + chunk]
            rows = torch.nonzero(mc).squeeze(1) if m else mc[:0].long()  # [k] masked rows of the chunk
            # logits / T straight from the matmul (alpha, beta): [c, V] each, log-softmax in fp32
            s = torch.addmm(bc, zc, wc.t(), beta=1 / T, alpha=1 / T).float()
            sm = s[rows].mul_(T)  # [k, V] the masked rows' logits at T = 1
            ls = F.log_softmax(s, dim=-1)
            del s
            lt = F.log_softmax(torch.addmm(btc, zt[i: i + chunk].to(mm), wtc.t(), beta=1 / T, alpha=1 / T).float(),
                               dim=-1)
            p = lt.exp()  # the teacher's soft targets
            kl += torch.dot(p.view(-1), lt.sub_(ls).view(-1))  # sum p (log p - log q)
            del lt
            g = ls.exp_().sub_(p)  # [c, V] q - p, in ls's memory (d KL/ds up to k_scale)
            del p
            if not k_scale:
                g.zero_()
            if len(rows):
                y = labels[i: i + chunk][rows]  # [k]
                lsm = F.log_softmax(sm, dim=-1)  # [k, V]
                ce -= lsm.gather(1, y[:, None]).sum()
                correct += (lsm.argmax(-1) == y).sum()
                gm = lsm.exp_()
                gm[torch.arange(len(y), device=dev), y] -= 1.0  # softmax - onehot
                g.index_add_(0, rows, gm, alpha=alpha_mlm / m / out_scale)
            gm_ = g.to(mm)
            _add_matmul(gz[i: i + chunk], gm_, wc, out_scale)  # [c, H]
            _add_matmul(gw, gm_.t(), zc, out_scale)  # [V, H], summed in place
            gb.add_(g.sum(0), alpha=out_scale)  # [V]
        ctx.save_for_backward(gz, gw, gb)
        ctx.dtypes = (z.dtype, w.dtype, b.dtype)
        kl = kl * (T * T / n) if n else kl
        ce = ce / m if m else ce
        return alpha_ce * kl + alpha_mlm * ce, kl, ce, correct

    @staticmethod
    def backward(ctx: Any, d_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        gz, gw, gb = ctx.saved_tensors
        (zd, wd, bd), need = ctx.dtypes, ctx.needs_input_grad
        return ((gz * d_loss).to(zd) if need[0] else None, (gw * d_loss).to(wd) if need[1] else None,
                (gb * d_loss).to(bd) if need[2] else None, *([None] * 8))


def _add_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """``out += alpha * a @ b`` into the fp32 accumulator (in place when ``a``, ``b`` are fp32 too)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b, alpha=alpha)
    else:  # bf16 operands (autocast): the product in bf16, accumulated in fp32
        out.add_((a @ b).float(), alpha=alpha)


def _matmul_dtype(z: torch.Tensor) -> torch.dtype:
    """bf16 where autocast is on for ``z``'s device (as the nn.Linear it replaces would run), else the input's
    dtype."""
    if torch.is_autocast_enabled(z.device.type):
        return torch.get_autocast_dtype(z.device.type)
    return z.dtype


def fused_head_losses(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, z_teacher: torch.Tensor,
                      weight_teacher: torch.Tensor, bias_teacher: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha_ce: float = 5.0, alpha_mlm: float = 2.0,
                      chunk: int = 0) -> HeadLosses:
    """``alpha_ce * KL + alpha_mlm * MLM`` of :func:`combine` from the heads' inputs instead of their logits.

    z, z_teacher: [N, H] the student's / teacher's MLM-head hidden states (after the transform) on the KL
    rows; weight, weight_teacher: [V, H] and bias, bias_teacher: [V] their vocabulary projections; labels:
    [N] (-100 = not masked). ``chunk`` rows at a time (0: 256, about the size of ``W``'s gradient).
    """
    out = _FusedHeadLosses.apply(z, weight, bias, z_teacher, weight_teacher, bias_teacher, labels, temperature,
                                 alpha_ce, alpha_mlm, chunk or 256)
    loss, kl, mlm, correct = out
    return HeadLosses(loss, kl.detach(), mlm.detach(), correct)
