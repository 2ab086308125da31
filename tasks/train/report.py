"""What a person looks at after a training run: the model card, the curves PNG, the Prefect artifact."""

from __future__ import annotations

import base64
import io
import json
import os
import warnings
from typing import Any

from distilflow.tasks.core.markdown import markdown_table
from distilflow.tasks.core.model_card import EvalResult, ModelCard
from distilflow.tasks.train.config import TrainConfig


def loss_curve_markdown(cfg: TrainConfig, records: list[dict[str, Any]], summary: dict[str, Any],
                        points: int = 20) -> str:
    """A table of ~``points`` evenly spaced metric records (the loss curves) and the final numbers."""
    if records:
        idx = sorted({round(i * (len(records) - 1) / max(1, points - 1)) for i in range(points)})
        rows = [records[i] for i in idx]
    else:
        rows = []
    terms = ["loss_ce", "loss_mlm", "loss_cos"] if cfg.mode == "distill" else ["loss_mlm", "loss_nsp"]
    cols = ["step", "loss", *terms, "mlm_acc", "lr", "grad_norm", "tokens_per_s"]
    if any("mfu" in r for r in rows):
        cols.append("mfu")
    md = f"# {cfg.mode}: {cfg.output}\n\n## Loss curves\n\n" + markdown_table(rows, cols)
    ev = summary.get("eval")
    if ev:
        md += "\n## Held-out masked-token accuracy\n\n"
        table = [{"model": "student" if cfg.mode == "distill" else "model", **ev}]
        if summary.get("teacher_eval"):
            table.append({"model": "teacher", **summary["teacher_eval"]})
        md += markdown_table(table, ["model", "accuracy", "loss", "masked_tokens", "majority_baseline"])
    return md


def curves_image_markdown(png: bytes | None, alt: str = "training curves") -> str:
    """The curves PNG embedded in markdown as a data URI: the Prefect UI's markdown artifacts render
    image tokens as ``<img src=...>`` (checked in Prefect 3.8's UI), so the picture shows with no file
    server; the image artifact type would also print the whole URI as its link text."""
    if not png:
        return ""
    return f"\n![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})\n"


def plot_curves(records: list[dict[str, Any]], evals: list[dict[str, Any]], title: str) -> bytes | None:
    """Loss terms (left) and masked-token accuracy (right: training batches, held-out points) over the
    steps, as a PNG (matplotlib's Agg canvas: no display, no global pyplot state). None, with a warning,
    where matplotlib is not installed (an environment from an older lock): the model is still written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no curves.png (pip install matplotlib)", stacklevel=2)
        return None

    fig = Figure(figsize=(9, 3.4), dpi=90)
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    steps = [r["step"] for r in records]
    for key, label in (("loss", "total"), ("loss_mlm", "MLM"), ("loss_nsp", "NSP"), ("loss_ce", "KL (soft targets)"),
                       ("loss_cos", "cosine")):
        if records and key in records[0]:
            loss_ax.plot(steps, [r[key] for r in records], label=label, lw=2 if key == "loss" else 1)
    loss_ax.set(xlabel="step", ylabel="loss", title="training loss")
    loss_ax.legend(fontsize=8)
    if records and "mlm_acc" in records[0]:
        acc_ax.plot(steps, [r["mlm_acc"] for r in records], label="training batches")
    if evals:
        acc_ax.plot([e["step"] for e in evals], [e["eval_accuracy"] for e in evals], "o-", label="held-out")
        acc_ax.axhline(evals[-1]["eval_majority_baseline"], ls="--", c="grey", lw=1, label="most frequent token")
    acc_ax.set(xlabel="step", ylabel="masked-token accuracy", title="MLM accuracy")
    acc_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def model_card(cfg: TrainConfig, summary: dict[str, Any], n_params: int, arch: dict[str, Any],
               curves: bool = True) -> ModelCard:
    """The Hugging Face model card of a ``pretrain`` / ``distill`` output (``README.md`` beside the model)."""
    name = os.path.basename(os.path.normpath(cfg.output))
    data = os.path.basename(os.path.normpath(cfg.data))
    shape = f"{arch['layers']} layers, hidden size {arch['hidden']}, {arch['heads']} heads, FFN {arch['ffn']}"
    ev = summary.get("eval")
    results = [EvalResult("fill-mask", "Masked language modeling", f"held-out text ({os.path.basename(os.path.normpath(cfg.eval_data))})",
                          "local/heldout", "accuracy", ev["accuracy"], metric_name="held-out masked-token accuracy")
               ] if ev else []
    if cfg.mode == "distill":
        layers = ",".join(map(str, arch["student_layers"]))
        summary_text = (f"A DistilBERT student ({shape}; {n_params:,} parameters) distilled by distilflow from the "
                        f"BERT teacher `{cfg.teacher}` on the prepared corpus `{data}`, following DistilBERT "
                        "(Sanh et al., 2019): initialised from every other teacher layer, trained on the teacher's "
                        "soft targets, the masked-LM labels and the teacher's hidden states.")
        how = (f"The student's layers were initialised from teacher layers {layers} (in order), with the teacher's "
               f"embeddings (no token-type embeddings) and MLM head. Loss = {cfg.alpha_ce:g} * KL(softmax(t/T) || softmax(s/T)) "
               f"* T^2 + {cfg.alpha_mlm:g} * MLM cross-entropy + {cfg.alpha_cos:g} * (1 - cos(h_s, h_t)), T = "
               f"{cfg.temperature:g}; KL over {'the masked tokens' if cfg.restrict_ce_to_mask else 'every token'}.")
        tags, base = ["distilbert", "distillation", "fill-mask", "distilflow"], cfg.teacher
    else:
        summary_text = (f"A BERT model ({shape}; {n_params:,} parameters) pretrained from scratch by distilflow "
                        f"with masked-language modelling and next-sentence prediction on the prepared corpus "
                        f"`{data}`. Meant as a teacher for `distilflow distill`.")
        how = "BERT's objective: masked-LM cross-entropy on the masked tokens + next-sentence prediction."
        tags, base = ["bert", "fill-mask", "pretraining", "distilflow"], None
    last = summary.get("last") or {}
    trained = (f"{summary['steps']:,} optimizer steps x {cfg.batch_size * cfg.grad_accum * summary['world_size']} "
               f"sequences ({summary.get('tokens', 0):,} non-padding tokens; {summary['sequences']:,} sequences, "
               f"{summary['steps_per_epoch']:,} steps per epoch), AdamW (lr {cfg.lr:g}, weight decay "
               f"{cfg.weight_decay:g}), linear warmup then linear decay, gradient clipping at {cfg.max_grad_norm:g}; "
               f"{summary['mask_source']} masking of {cfg.mlm_prob:.0%} of the tokens (80/10/10)"
               f"{f', frequency-smoothed ({cfg.mlm_smoothing:g})' if cfg.mlm_smoothing else ''}. Seed {cfg.seed}.")
    record = {k: v for k, v in cfg.to_dict().items() if k not in cfg.run_only_fields()}
    sections = {
        "Model description": f"{how}\n\n{trained}",
        "How to use": f"```python\nfrom transformers import pipeline\nfill = pipeline(\"fill-mask\", model=\"{cfg.output}\")\n"
                      "print(fill(\"The capital of France is [MASK].\"))\n```",
        "Training data": f"The prepared folder `{cfg.data}` (`distilflow prepare`: sentence pairs tokenized with this "
                         "model's tokenizer). Its dataset card describes the source texts and counts.",
        "Training procedure": "Config of record (`train_config.json`; fields that change the weights):\n\n```json\n"
                              + json.dumps(record, indent=1) + "\n```",
        "Training curves": ("![training curves](curves.png)\n\n" if curves else "") + "Last logged interval: "
                           + ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                                       if k.startswith(("loss", "mlm_acc")) and isinstance(v, float)),
    }
    if ev:
        rows = [{"model": name, **ev}]
        if summary.get("teacher_eval"):
            rows.append({"model": "teacher", **summary["teacher_eval"]})
        sections["Evaluation results"] = (
            f"Held-out masked-token prediction on `{cfg.eval_data}` ({ev['masked_tokens']:,} masked tokens, "
            "uniform masks, the same for every model):\n\n"
            + markdown_table(rows, ["model", "accuracy", "loss", "masked_tokens"])
            + f"\nBaselines: always the most frequent token {ev['majority_baseline']:.3f}, uniform guessing "
              f"{ev.get('uniform_baseline', 0):.2g}. GLUE / SQuAD / bias-probe results: `distilflow evaluate`.")
    sections["Limitations and bias"] = (
        f"Trained for {summary['steps']:,} steps on a small corpus: a pipeline product, far from BERT-base / "
        "DistilBERT quality; check its held-out accuracy before use. English only, uncased or cased as its "
        "tokenizer. It reproduces the associations of its training text (for public-domain books: the views of "
        "their time); run `distilflow evaluate --tasks bias` for the probe of the DistilBERT model card before "
        "using its predictions about people.")
    return ModelCard(name=name, summary=summary_text, tags=tags, datasets=[f"local/{data}"], base_model=base,
                     results=results, sections=sections)
