"""What a person looks at after a training run: the loss-curve table of the Prefect artifact."""

from __future__ import annotations

from typing import Any

from distilflow.tasks.core.markdown import markdown_table
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
