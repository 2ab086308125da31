"""Hugging Face model cards (``README.md`` beside ``config.json``) for every model distilflow writes.

A card is YAML metadata (license, language, tags, datasets, ``base_model``, ``model-index`` with the
evaluation results, the format ``huggingface_hub.ModelCard.load`` and the Hub read) and markdown sections:
what the model is, how to use it, how it was trained, evaluation tables, bias, limitations -- the layout
of the DistilBERT / BERT model cards. Generic: each job builds a :class:`ModelCard` (training writes
teachers and students, evaluation writes fine-tuned models and adds its bias-probe section) and calls
:func:`write_model_card`. No heavy imports (yaml only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass(frozen=True)
class EvalResult:
    """One ``model-index`` result: ``metric_name`` of ``task_type`` on ``dataset_name`` = ``value``."""

    task_type: str  # Hub task id: fill-mask, text-classification, question-answering ...
    task_name: str  # shown: "Masked language modeling"
    dataset_name: str  # shown: "held-out Gutenberg book (pg236.txt)"
    dataset_type: str  # a dataset id or a local name: "local/heldout", "glue"
    metric_type: str  # accuracy, f1, exact_match, perplexity ...
    value: float
    metric_name: str = ""  # shown: "held-out masked-token accuracy"
    dataset_config: str | None = None  # "sst2"
    dataset_split: str | None = None  # "validation"

    def to_yaml(self) -> dict[str, Any]:
        dataset: dict[str, Any] = {"name": self.dataset_name, "type": self.dataset_type}
        if self.dataset_config:
            dataset["config"] = self.dataset_config
        if self.dataset_split:
            dataset["split"] = self.dataset_split
        metric: dict[str, Any] = {"type": self.metric_type, "value": round(float(self.value), 4)}
        if self.metric_name:
            metric["name"] = self.metric_name
        return {"task": {"type": self.task_type, "name": self.task_name}, "dataset": dataset, "metrics": [metric]}


@dataclass
class ModelCard:
    """The content of one card; :meth:`render` gives the ``README.md`` text."""

    name: str  # model-index name and the card's title
    summary: str  # first paragraph: what this model is
    pipeline_tag: str = "fill-mask"
    license: str = "apache-2.0"
    language: list[str] = field(default_factory=lambda: ["en"])
    library_name: str = "transformers"
    tags: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    base_model: str | None = None  # the teacher / the model fine-tuned
    results: list[EvalResult] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)  # title -> markdown body, in order

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"language": self.language, "license": self.license,
                                "library_name": self.library_name, "pipeline_tag": self.pipeline_tag}
        if self.tags:
            meta["tags"] = self.tags
        if self.datasets:
            meta["datasets"] = self.datasets
        if self.base_model:
            meta["base_model"] = self.base_model
        if self.results:
            meta["model-index"] = [{"name": self.name, "results": [r.to_yaml() for r in self.results]}]
        return meta

    def add_section(self, title: str, body: str) -> None:
        """Add (or replace) a section; evaluation adds its bias probe this way."""
        self.sections[title] = body.strip()

    def render(self) -> str:
        head = yaml.safe_dump(self.metadata(), sort_keys=False, allow_unicode=True, width=1000)
        body = "".join(f"\n## {title}\n\n{text.strip()}\n" for title, text in self.sections.items())
        return f"---\n{head}---\n\n# {self.name}\n\n{self.summary.strip()}\n{body}"


def write_model_card(folder: str, card: ModelCard) -> str:
    """Write ``folder/README.md`` (atomically: a reader never sees half a card; a local folder or a URL);
    returns its path."""
    from distilflow.tasks.core.io import join, write_bytes

    path = join(folder, "README.md")
    write_bytes(path, card.render().encode("utf-8"))
    return path


def results_table(results: list[EvalResult]) -> str:
    """The evaluation results as a markdown table (the card's "Evaluation results" section)."""
    rows = ["| task | dataset | metric | value |", "|---|---|---|---|"]
    rows += [f"| {r.task_name} | {r.dataset_name} | {r.metric_name or r.metric_type} | {r.value:.4g} |"
             for r in results]
    return "\n".join(rows)
