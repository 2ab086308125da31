"""The model card writer: huggingface_hub parses what it writes, metadata and results included."""

from __future__ import annotations

from huggingface_hub import ModelCard as HubCard

from distilflow.tasks.core.model_card import EvalResult, ModelCard, results_table, write_model_card


def test_card_parses_with_huggingface_hub(tmp_path):
    res = [EvalResult("fill-mask", "Masked language modeling", "held-out book", "local/heldout", "accuracy",
                      0.21234, metric_name="held-out masked-token accuracy"),
           EvalResult("text-classification", "Sentiment", "SST-2", "glue", "accuracy", 0.8, dataset_config="sst2",
                      dataset_split="validation")]
    card = ModelCard(name="tiny-student", summary="A student.", tags=["distillation"], datasets=["local/corpus"],
                     base_model="runs/teacher", results=res,
                     sections={"Evaluation results": results_table(res), "Limitations": "Small."})
    card.add_section("Bias", "Probe table.")
    path = write_model_card(str(tmp_path), card)
    hub = HubCard.load(path)
    assert hub.data.license == "apache-2.0" and hub.data.language == ["en"]
    assert hub.data.base_model == "runs/teacher" and hub.data.datasets == ["local/corpus"]
    assert hub.data.model_name == "tiny-student"
    got = {(r.task_type, r.dataset_type, r.metric_type): r.metric_value for r in hub.data.eval_results}
    assert got == {("fill-mask", "local/heldout", "accuracy"): 0.2123, ("text-classification", "glue", "accuracy"): 0.8}
    assert "## Bias\n\nProbe table." in hub.text and "| Sentiment | SST-2 | accuracy | 0.8 |" in hub.text
