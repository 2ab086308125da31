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


CHUNK = 512  # rows whose [c, V] logits exist at a time (3 buffers: 190 MB in fp32 at V = 30,522)
L2_ROWS = 8  # rows the element-wise steps take at a time on a CPU (8 x 30,522 x 4 B = 1 MB: in L2)


class _FusedHeadLosses(torch.autograd.Function):
    """``logits = z @ W.T + b`` for student and teacher and ``a_ce * KL + a_mlm * CE`` on them, in row chunks.

    The gradient with respect to ``z``, ``W`` and ``b`` is accumulated chunk by chunk during the forward
    pass (four matmuls per chunk, ``W``'s gradient summed in place), so no ``[N, V]`` tensor outlives its
    chunk and the backward pass only scales the stored ``[N, H]`` / ``[V, H]`` / ``[V]`` gradients. Same
    matmul FLOPs as autograd through full logits, a fraction of the memory traffic: the ``[c, V]`` buffers
    are reused by every chunk, the biases are added in fp32 after the matmuls, and on a CPU the element-wise
    work (both log-softmaxes, the KL, ``q - p``) goes ``L2_ROWS`` rows at a time, so that each op reads rows
    already in the core's L2 cache instead of streaming the whole chunk through memory once per op (at
    V = 30,522 that streaming took as long as the matmuls). With s, t the logits:

        d(a_ce T^2 KL / N)/ds = a_ce T / N (softmax(s/T) - softmax(t/T));  d(a_mlm CE / M)/ds = a_mlm / M (softmax(s) - onehot(y))
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, zt: torch.Tensor,
                wt: torch.Tensor, bt: torch.Tensor, labels: torch.Tensor, temperature: float, alpha_ce: float,
                alpha_mlm: float, chunk: int) -> tuple[torch.Tensor, ...]:
        n, v, T, dev, f32 = z.shape[0], w.shape[0], temperature, z.device, torch.float32
        masked = labels != IGNORE_INDEX  # [N]
        m = int(masked.sum())
        mm = _matmul_dtype(z)  # bf16 under autocast, as the nn.Linear it replaces would run
        wc, wtc = w.to(mm), wt.to(mm)  # [V, H]
        b32 = b.float()  # [V]: the biases are added in fp32, after the matmuls
        b_T, bt_T = b32 / T, bt.float() / T
        # the KL gradient's scale goes into the matmuls' alpha; the MLM rows are added to it relative to it
        k_scale = alpha_ce * T / n if n else 0.0
        out_scale = k_scale or 1.0
        kl, ce = torch.zeros((), dtype=f32, device=dev), torch.zeros((), dtype=f32, device=dev)
        correct = torch.zeros((), dtype=torch.long, device=dev)
        gz = torch.zeros(z.shape, dtype=f32, device=dev)  # [N, H]
        gw = torch.zeros(w.shape, dtype=f32, device=dev)  # [V, H]
        c0 = min(chunk, n)
        rb = L2_ROWS if dev.type == "cpu" else c0  # rows per element-wise step (a GPU takes the whole chunk)
        g_rows = torch.zeros(rb, v, dtype=f32, device=dev)  # [r, V] q - p summed over the blocks: b's gradient
        gb_mlm = torch.zeros(v, dtype=f32, device=dev)  # [V] the MLM rows' part of b's gradient
        # [c, V] logits of both models and q - p, in the matmuls' dtype, allocated once and reused by every chunk
        s_buf, t_buf, g_buf = (torch.empty(c0, v, dtype=mm, device=dev) for _ in range(3))
        for i in range(0, n, chunk):
            zc = z[i: i + chunk].to(mm)  # [c, H]
            c = len(zc)
            rows = torch.nonzero(masked[i: i + chunk]).squeeze(1) if m else masked[:0].long()  # [k] masked
            s = torch.mm(zc, wc.t(), out=s_buf[:c])  # [c, V] z W^T, the logits before the bias
            t = torch.mm(zt[i: i + chunk].to(mm), wtc.t(), out=t_buf[:c])
            g = g_buf[:c]  # [c, V] q - p: d KL/d(logits / T) up to k_scale
            for j in range(0, c, rb):  # element-wise, in fp32, rb rows at a time: logits / T = (z W^T + b) / T
                r = min(rb, c - j)
                ls = F.log_softmax(torch.add(b_T, s[j: j + r], alpha=1 / T), dim=-1)  # [r, V] log q
                lt = F.log_softmax(torch.add(bt_T, t[j: j + r], alpha=1 / T), dim=-1)  # log p
                p = lt.exp()  # the teacher's soft targets
                kl += torch.dot(p.view(-1), lt.sub_(ls).view(-1))  # sum p (log p - log q)
                if mm == f32:  # q - p straight into g
                    q_p = torch.sub(ls.exp_(), p, out=g[j: j + r])
                else:  # q - p in fp32 here (b's gradient is summed from it), cast into g
                    q_p = ls.exp_().sub_(p)
                    g[j: j + r].copy_(q_p)
                g_rows[:r].add_(q_p)
            if not k_scale:  # no KL term: only the MLM rows have a gradient
                g.zero_()
            if len(rows):
                y = labels[i: i + chunk][rows]  # [k]
                lsm = F.log_softmax(torch.add(b32, s[rows]), dim=-1)  # [k, V] the masked rows at T = 1
                ce -= lsm.gather(1, y[:, None]).sum()
                correct += (lsm.argmax(-1) == y).sum()
                gm = lsm.exp_()
                gm[torch.arange(len(y), device=dev), y] -= 1.0  # softmax - onehot
                gb_mlm.add_(gm.sum(0))
                g.index_add_(0, rows, gm.to(mm), alpha=alpha_mlm / m / out_scale)
            _add_matmul(gz[i: i + c], g, wc, out_scale)  # [c, H]
            _add_matmul(gw, g.t(), zc, out_scale)  # [V, H], summed in place
        gb = g_rows.sum(0).mul_(k_scale).add_(gb_mlm, alpha=alpha_mlm / m if m else 0.0)  # [V]
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
    [N] (-100 = not masked). ``chunk`` rows at a time (0: ``CHUNK``).
    """
    out = _FusedHeadLosses.apply(z, weight, bias, z_teacher, weight_teacher, bias_teacher, labels, temperature,
                                 alpha_ce, alpha_mlm, chunk or CHUNK)
    loss, kl, mlm, correct = out
    return HeadLosses(loss, kl.detach(), mlm.detach(), correct)
