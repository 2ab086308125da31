"""``OUT/report.md`` of ``distilflow pipeline``: what ran, seconds, sizes, the evaluation, where things are."""

from __future__ import annotations

import re
from typing import Any

from distilflow.tasks.core.io import exists, join, read_bytes
from distilflow.tasks.core.markdown import markdown_table

OUTPUTS = ("data", "heldout", "teacher", "student", "eval/results.md", "fill-mask/predictions", "report.md")


def pipeline_report(preset: str, corpus: str, stages: dict[str, dict[str, Any]], output: str, total: float) -> str:
    rows = [{"stage": name, "state": "skipped (done before)" if r.get("skipped") else "ran",
             "seconds": r.get("seconds", 0.0), "summary": stage_summary(name, r)} for name, r in stages.items()]
    md = [f"# distilflow pipeline: `{output}`", "",
          f"Preset **{preset}**; corpus: {corpus}; total {total:.1f} s.", "", "## Stages", "",
          markdown_table(rows, ["stage", "state", "seconds", "summary"])]
    ev_md = join(output, "eval", "results.md")
    if exists(ev_md):
        md += ["", "## Evaluation", "", re.sub(r"^# ", "### ", read_bytes(ev_md).decode("utf-8"), flags=re.M)]
    fm = stages.get("fill-mask", {})
    if fm:
        md += ["", "## Batch fill-mask on held-out sentences", "",
               markdown_table([{"rows": fm.get("rows"), "top-1 accuracy": fm.get("top1"),
                                "top-5 accuracy": fm.get("top5"), "rows/s": fm.get("rows_per_s")}])]
    md += ["", "## Outputs", "", *(f"- `{join(output, p)}`" for p in OUTPUTS)]
    return "\n".join(md) + "\n"


def stage_summary(name: str, r: dict[str, Any]) -> str:
    """One line per stage for the report's table."""
    if name == "vocab":
        return f"{r.get('vocab_size')} WordPiece tokens"
    if name.startswith("prepare"):
        return f"{r.get('corpus')} docs, {r.get('pairs')} sequences, {r.get('tokens', 0):,} tokens"
    if name in ("pretrain", "distill"):
        ev, te = r.get("eval") or {}, r.get("teacher_eval") or {}
        s = f"{r.get('steps')} steps, {r.get('parameters', 0):,} parameters"
        if ev:
            s += f"; held-out masked-token accuracy {ev.get('accuracy', 0):.3f}"
        if te:
            s += f" (teacher {te.get('accuracy', 0):.3f})"
        return s
    if name == "fill-mask":
        return f"{r.get('rows')} rows, top-1 {r.get('top1')}, top-5 {r.get('top5')}"
    if name == "evaluate":
        return "see below"
    if name == "replication":
        met = [r.get(k) for k in ("student_vs_teacher_sst2", "speedup", "param_reduction")]
        return f"replication.md / replication.json (student/teacher SST-2 {met[0]}, speed-up {met[1]}, " \
               f"parameter reduction {met[2]})"
    return ""
