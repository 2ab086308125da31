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
"""

from __future__ import annotations

from dataclasses import dataclass

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
