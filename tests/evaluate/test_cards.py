"""Model cards of what evaluate writes: every fine-tuned model gets one that huggingface_hub parses, with its
base model, its result in model-index and the bias probe of its base MLM; a distilflow MLM card gets the probe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard as HubCard

from distilflow.tasks.core.model_card import ModelCard, write_model_card
from distilflow.tasks.evaluate.card import add_bias_section, write_cards
from distilflow.tasks.evaluate.config import EvaluateConfig
from distilflow.tasks.evaluate.suite import assemble, run_benchmark
from tests.conftest import SHARED


def _save(path: Path, tokenizer, kind: str) -> str:
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0)
    if kind == "student":
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2,
                                                       hidden_dim=64, max_position_embeddings=64))
    else:
        model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def evaluated(bert_tokenizer, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cards")
    student = _save(tmp_path / "student", bert_tokenizer, "student")
    teacher = _save(tmp_path / "teacher", bert_tokenizer, "teacher")
    # the student carries a distilflow card (as `distilflow distill` writes); the teacher a foreign one
    write_model_card(student, ModelCard(name="student", summary="A student.", tags=["distilflow"],
                                        sections={"Limitations and bias": "Small."}))
    Path(teacher, "README.md").write_text("---\nlicense: mit\n---\n\n# someone else's card\n")
    cfg = EvaluateConfig(model=student, teacher=teacher, tasks=("sst2", "bias"), output=str(tmp_path / "eval"),
                         glue_dir=str(SHARED / "glue"), max_train_examples=16, max_eval_examples=8, batch_size=8,
                         max_steps=2, max_seq_len=32, device="cpu", task_distill=True, bias_top_k=3)
    results = {n: run_benchmark(n, cfg, cfg.output) for n in cfg.benchmarks()}
    report = assemble(cfg, results, {"device": "cpu"})
    return cfg, report, write_cards(cfg, report)


def test_every_fine_tuned_model_gets_a_card_that_the_hub_parses(evaluated):
    cfg, report, written = evaluated
    res = report["results"]
    for name, base in (("sst2", cfg.model), ("sst2-teacher", cfg.teacher), ("sst2-distilled", cfg.model)):
        run = res[name]["runs"][0]
        card_path = os.path.join(run["model_dir"], "README.md")
        assert card_path in written
        hub = HubCard.load(card_path)
        assert hub.data.base_model == base and hub.data.pipeline_tag == "text-classification"
        got = {(r.dataset_type, r.dataset_config, r.metric_type): r.metric_value for r in hub.data.eval_results}
        assert got == {("glue", "sst2", "accuracy"): round(run["accuracy"], 4)}
        assert "## Training" in hub.text and "learning_rate" in hub.text
        assert "## Bias probe" in hub.text  # the base MLM's probe: the student's, or the teacher's
    distilled = HubCard.load(os.path.join(res["sst2-distilled"]["runs"][0]["model_dir"], "README.md"))
    assert "task-distillation" in distilled.data.tags and "T = 2, alpha = 0.5" in distilled.text
    assert res["sst2-distilled"]["runs"][0]["teacher"] in distilled.text


def test_probed_distilflow_mlm_card_gets_the_bias_section_once(evaluated):
    cfg, report, written = evaluated
    card = os.path.join(cfg.model, "README.md")
    assert card in written
    hub = HubCard.load(card)
    assert hub.text.count("## Bias probe") == 1 and "## Limitations and bias" in hub.text
    assert "The {group} worked as a [MASK]." in hub.text
    # a second evaluation refreshes the section, it does not add another
    assert add_bias_section(cfg.model, report["results"]["bias"]["probes"]["student"])
    assert HubCard.load(card).text.count("## Bias probe") == 1
    # a card distilflow did not write is left alone
    assert os.path.join(cfg.teacher, "README.md") not in written
    assert "Bias probe" not in Path(cfg.teacher, "README.md").read_text()
