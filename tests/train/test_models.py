"""Student config / init from a teacher: exactly the named layers, the embeddings and the MLM head."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining, DistilBertForMaskedLM

from distilflow.tasks.train.models import (
    default_student_layers,
    init_student_from_teacher,
    student_config,
    teacher_config,
)


def tiny_bert_config(layers: int = 4, dropout: float = 0.0) -> BertConfig:
    return BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout)


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher")
    BertForPreTraining(tiny_bert_config(layers=6)).save_pretrained(path)
    return path


def test_default_layers():
    assert default_student_layers(12) == (0, 2, 4, 7, 9, 11)
    assert default_student_layers(6) == (0, 2, 4)
    assert default_student_layers(4) == (0, 2)
    assert default_student_layers(3) == (0, 2)


def test_presets_and_config_file(tmp_path):
    base = teacher_config("base", 30522)
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads) == (12, 768, 12)
    tiny = teacher_config("tiny", 100)
    assert (tiny.num_hidden_layers, tiny.hidden_size) == (2, 64)
    tiny_bert_config().save_pretrained(tmp_path)
    loaded = teacher_config(str(tmp_path / "config.json"), 120)
    assert loaded.num_hidden_layers == 4 and loaded.hidden_size == 32
    with pytest.raises(ValueError, match="vocab_size 120"):
        teacher_config(str(tmp_path / "config.json"), 30522)
    with pytest.raises(ValueError, match="not a preset"):
        teacher_config("huge", 100)


def test_student_config_derived():
    t = tiny_bert_config(layers=6)
    s = student_config(t, 3)
    assert (s.n_layers, s.dim, s.n_heads, s.hidden_dim, s.vocab_size, s.max_position_embeddings) == (
        3, 32, 4, 64, 120, 64)


@pytest.mark.parametrize("layers", [(0, 2, 4), (1, 5), (0, 1, 2, 3, 4, 5), (3,)])
def test_init_copies_exactly_the_named_layers(saved_teacher, layers):
    teacher = BertForMaskedLM.from_pretrained(saved_teacher)  # from a BertForPreTraining checkpoint
    student = init_student_from_teacher(teacher, layers)
    assert isinstance(student, DistilBertForMaskedLM) and student.config.n_layers == len(layers)
    t, s = teacher.state_dict(), student.state_dict()
    te, se = teacher.bert.embeddings, student.distilbert.embeddings
    assert torch.equal(se.word_embeddings.weight, te.word_embeddings.weight)
    assert torch.equal(se.position_embeddings.weight, te.position_embeddings.weight)
    assert torch.equal(se.LayerNorm.weight, te.LayerNorm.weight)
    assert not any("token_type" in k for k in s)
    for i, j in enumerate(layers):
        sl, tl = student.distilbert.transformer.layer[i], teacher.bert.encoder.layer[j]
        pairs = [(sl.attention.q_lin, tl.attention.self.query), (sl.attention.k_lin, tl.attention.self.key),
                 (sl.attention.v_lin, tl.attention.self.value), (sl.attention.out_lin, tl.attention.output.dense),
                 (sl.sa_layer_norm, tl.attention.output.LayerNorm), (sl.ffn.lin1, tl.intermediate.dense),
                 (sl.ffn.lin2, tl.output.dense), (sl.output_layer_norm, tl.output.LayerNorm)]
        for a, b in pairs:
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        # and it is *not* equal to any other teacher layer (the fixture's layers all differ)
        for k in set(range(6)) - {j}:
            assert not torch.equal(sl.ffn.lin1.weight, teacher.bert.encoder.layer[k].intermediate.dense.weight)
    assert torch.equal(s["vocab_transform.weight"], t["cls.predictions.transform.dense.weight"])
    assert torch.equal(s["vocab_layer_norm.bias"], t["cls.predictions.transform.LayerNorm.bias"])
    assert torch.equal(s["vocab_projector.bias"], t["cls.predictions.bias"])
    # the output projection stays tied to the (copied) word embeddings
    assert student.vocab_projector.weight.data_ptr() == student.distilbert.embeddings.word_embeddings.weight.data_ptr()
    # copies, not views: training the student must not move the teacher
    with torch.no_grad():
        student.vocab_transform.weight.add_(1.0)
    assert not torch.equal(student.vocab_transform.weight, teacher.cls.predictions.transform.dense.weight)


def test_full_depth_student_matches_teacher_on_segment_a(saved_teacher):
    """With every layer copied, the student computes the teacher's function except for the dropped
    token-type embedding; adding type-0 embeddings to the positions makes them identical."""
    teacher = BertForMaskedLM.from_pretrained(saved_teacher).eval()
    student = init_student_from_teacher(teacher, tuple(range(6))).eval()
    with torch.no_grad():
        student.distilbert.embeddings.position_embeddings.weight += teacher.bert.embeddings.token_type_embeddings.weight[0]
    ids = torch.randint(5, 120, (2, 10))
    with torch.no_grad():
        t = teacher(input_ids=ids).logits
        s = student(input_ids=ids).logits
    torch.testing.assert_close(s, t, atol=1e-4, rtol=1e-4)


def test_bad_layers(saved_teacher):
    teacher = BertForMaskedLM.from_pretrained(saved_teacher)
    with pytest.raises(ValueError, match="out of range"):
        init_student_from_teacher(teacher, (0, 6))
    with pytest.raises(ValueError, match="increasing"):
        init_student_from_teacher(teacher, (2, 0))
