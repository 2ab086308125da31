"""Training objectives: a batch in, the loss and its named terms out.

``objective(batch) -> (loss, {"loss_mlm": ..., ...})`` is all the training loop knows. Each objective owns
the model it trains (``.model``: what is optimised, checkpointed and saved) and says how many FLOPs a
token costs (for MFU). They are ``nn.Module``s so that DDP wraps the forward that produces the gradients.

* :class:`PretrainObjective` -- BERT's MLM + NSP on a ``BertForPreTraining``.
* :class:`DistillObjective` -- DistilBERT's soft-target KL + MLM + cosine: teacher forward (inference
  mode), then the student's; the KL and MLM terms come from :func:`~distilflow.tasks.train.losses.fused_head_losses`
  (vocabulary logits of both models formed in row chunks, never kept whole).

Batch tensors (``B`` sequences of width ``L``): ``input_ids``, ``attention_mask``, ``token_type_ids``,
``labels`` (original id where masked, -100 elsewhere) ``[B, L]``; ``next_sentence_label`` ``[B]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, BertForMaskedLM, BertForPreTraining

from distilflow.tasks.core.errors import ConfigError
from distilflow.tasks.core.hf import build_model, load_pretrained, local_model
from distilflow.tasks.prepare.masking import IGNORE_INDEX
from distilflow.tasks.train.config import TrainConfig
from distilflow.tasks.train.losses import ce_rows, cosine_loss, fused_head_losses
from distilflow.tasks.train.models import (
    default_student_layers,
    forward_flops_per_token,
    init_student_from_teacher,
    teacher_config,
)

Batch = dict[str, torch.Tensor]
Terms = dict[str, torch.Tensor]


class PretrainObjective(nn.Module):
    """BERT MLM + NSP. The vocabulary projection runs on the masked positions only (15% of the tokens),
    not on every position as ``BertForPreTraining.forward`` does."""

    model: Any  # BertForPreTraining (typed Any: nn.Module attribute access is untyped for mypy)

    def __init__(self, model: BertForPreTraining, mlm_prob: float):
        super().__init__()
        self.model, self.mlm_prob = model, mlm_prob

    def forward(self, b: Batch) -> tuple[torch.Tensor, Terms]:
        out = self.model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                              token_type_ids=b["token_type_ids"])
        seq, pooled = out.last_hidden_state, out.pooler_output  # [B, L, H], [B, H]
        labels, nsp_labels = b["labels"], b["next_sentence_label"]
        sel = labels != IGNORE_INDEX  # [B, L]
        logits = self.model.cls.predictions(seq[sel])  # [M, V] masked positions only
        mlm = F.cross_entropy(logits.float(), labels[sel])
        nsp_logits = self.model.cls.seq_relationship(pooled).float()  # [B, 2]
        has_nsp = nsp_labels != IGNORE_INDEX
        # --no-nsp data (all -100): a zero loss that still touches the head, so DDP sees its params used
        nsp = (F.cross_entropy(nsp_logits[has_nsp], nsp_labels[has_nsp]) if has_nsp.any()
               else nsp_logits.sum() * 0.0)
        acc = (logits.argmax(-1) == labels[sel]).float().mean()
        return mlm + nsp, {"loss_mlm": mlm.detach(), "loss_nsp": nsp.detach(), "mlm_acc": acc.detach()}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 3 x forward (forward + backward), MLM head on the masked share."""
        c = self.model.config
        return 3 * forward_flops_per_token(c.num_hidden_layers, c.hidden_size, c.intermediate_size, seq_len,
                                           c.vocab_size, self.mlm_prob)

    def references(self) -> dict[str, Any]:
        """Other models to evaluate beside the trained one (none)."""
        return {}

    def architecture(self) -> dict[str, Any]:
        c = self.model.config
        return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads,
                "ffn": c.intermediate_size}

    def compile_encoders(self) -> None:
        self.model.bert.compile()


class DistillObjective(nn.Module):
    """Student forward + the three DistilBERT losses against the teacher's outputs on the same batch.

    The teacher is not a submodule: it is not trained, so DDP must not broadcast or track it and the
    objective's parameters are the student's only.
    """

    model: Any  # DistilBertForMaskedLM
    teacher: Any  # BertForMaskedLM

    def __init__(self, student: nn.Module, teacher: Any, cfg: TrainConfig):
        super().__init__()
        self.model = student
        object.__setattr__(self, "teacher", teacher)  # a plain attribute, not a registered submodule
        self.t, self.a = cfg.temperature, (cfg.alpha_ce, cfg.alpha_mlm, cfg.alpha_cos)
        self.restrict, self.mlm_prob = cfg.restrict_ce_to_mask, cfg.mlm_prob
        self.layers = cfg.student_layers or default_student_layers(teacher.config.num_hidden_layers)

    def teacher_outputs(self, b: Batch, sel: torch.Tensor, real: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's MLM-head hidden states on the KL rows [N, H] (its logits are formed chunk by chunk
        in the loss) and its last hidden states on the real tokens [M, H]."""
        with torch.inference_mode():  # no autograd bookkeeping at all for the frozen teacher
            h = self.teacher.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                  token_type_ids=b["token_type_ids"]).last_hidden_state  # [B, L, H]
            z_t = self.teacher.cls.predictions.transform(h[sel])  # [N, H]
            h_real = h[real]  # [M, H]
        # clone: leave inference mode, the cosine term saves the teacher's states for its backward
        return z_t, h_real.clone()

    def forward(self, b: Batch) -> tuple[torch.Tensor, Terms]:
        labels, real = b["labels"], b["attention_mask"].bool()  # [B, L]
        sel = ce_rows(labels, b["attention_mask"], self.restrict)  # [B, L] rows of the KL term
        z_t, t_hidden = self.teacher_outputs(b, sel, real)
        h = self.model.distilbert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        s = self.model  # DistilBertForMaskedLM: its head is transform -> act -> LayerNorm -> vocab_projector
        z = s.vocab_layer_norm(s.activation(s.vocab_transform(h[sel])))  # [N, H] on the KL rows
        t_dec = self.teacher.cls.predictions.decoder
        a_ce, a_mlm, a_cos = self.a
        lo = fused_head_losses(z, s.vocab_projector.weight, s.vocab_projector.bias, z_t, t_dec.weight, t_dec.bias,
                               labels[sel], self.t, a_ce, a_mlm)
        cos = cosine_loss(h[real], t_hidden)
        acc = lo.correct.float() / (labels[sel] != IGNORE_INDEX).sum()
        return lo.loss + a_cos * cos, {
            "loss_ce": lo.kl.detach(), "loss_mlm": lo.mlm.detach(), "loss_cos": cos.detach(), "mlm_acc": acc}

    def flops_per_token(self, seq_len: int) -> float:
        """Student 3 x forward + teacher forward; both heads on the KL rows (all tokens, or the masked)."""
        s, t = self.model.config, self.teacher.config
        head = self.mlm_prob if self.restrict else 1.0
        return (3 * forward_flops_per_token(s.n_layers, s.dim, s.hidden_dim, seq_len, s.vocab_size, head)
                + forward_flops_per_token(t.num_hidden_layers, t.hidden_size, t.intermediate_size, seq_len,
                                          s.vocab_size, head))

    def references(self) -> dict[str, Any]:
        return {"teacher": self.teacher}

    def architecture(self) -> dict[str, Any]:
        c = self.model.config
        return {"layers": c.n_layers, "hidden": c.dim, "heads": c.n_heads, "ffn": c.hidden_dim,
                "student_layers": self.layers}

    def compile_encoders(self) -> None:
        self.model.distilbert.compile()
        self.teacher.bert.compile()


def load_teacher(name: str, device: torch.device) -> Any:
    """A BERT model, frozen, in eval mode (a BertForPreTraining checkpoint loads too, without NSP head).
    An ``s3://`` (fsspec) folder is read through the verified local cache."""
    name = local_model(name)
    try:
        cfg = AutoConfig.from_pretrained(name)
    except OSError as e:
        raise ConfigError(f"TrainConfig.teacher: cannot load {name!r} ({e}); give a local model folder "
                          "where no model hub is reachable") from e
    if cfg.model_type != "bert":
        raise ConfigError(f"TrainConfig.teacher: {name} is a {cfg.model_type!r} model; a BERT teacher is needed")
    teacher = load_pretrained(BertForMaskedLM, name)
    teacher.eval().requires_grad_(False)
    teacher.to(device)  # type: ignore[arg-type]  # (transformers' typing of .to)
    return teacher


def build_objective(cfg: TrainConfig, tokenizer: Any, device: torch.device) -> PretrainObjective | DistillObjective:
    """The objective of ``cfg.mode`` with a freshly initialised model (``torch.manual_seed(cfg.seed)``
    first: the same initial weights on every rank)."""
    if cfg.mode == "pretrain":
        model_cfg = teacher_config(cfg.model, len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   dropout=cfg.dropout)
        torch.manual_seed(cfg.seed)
        return PretrainObjective(build_model(BertForPreTraining, model_cfg).to(device).train(), cfg.mlm_prob)
    teacher = load_teacher(cfg.teacher, device)
    if teacher.config.vocab_size < len(tokenizer):
        raise ConfigError(f"TrainConfig.teacher: {cfg.teacher} has vocab_size {teacher.config.vocab_size} but "
                          f"the data's tokenizer has {len(tokenizer)} tokens; prepare the data with the teacher's "
                          "tokenizer")
    layers = cfg.student_layers or default_student_layers(teacher.config.num_hidden_layers)
    torch.manual_seed(cfg.seed)
    student = init_student_from_teacher(teacher, layers).to(device).train()
    return DistillObjective(student, teacher, cfg)
