"""What a batch-inference run tells people: the one result line, the files table, the manifest extras.

No Prefect here: ``flows/inference.py`` publishes :func:`files_markdown` as an artifact and the command line
prints :func:`summary_lines`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from distilflow.tasks.core.markdown import markdown_table


def add_agreement(manifest: dict[str, Any]) -> dict[str, Any]:
    """The approximate mode's measured top-1 agreement with the exact model, from the summed counters."""
    counts = manifest.get("counts", {})
    agree, checked = counts.get("fast_top1_agree"), counts.get("fast_check_masks")
    if checked:
        manifest["fast_top1_agreement"] = agree / checked
    return manifest


def files_markdown(job: str, output: str, markers: Sequence[dict[str, Any]]) -> str:
    """The run's artifact: one row per input file (rows in, ok, in the errors file, resumed or not)."""
    rows = [{"file": m.get("output"), "input_rows": m.get("input_rows"), "ok_rows": m.get("ok_rows"),
             "error_rows": m.get("error_rows"), "resumed": bool(m.get("skipped_done"))} for m in markers]
    return f"# {job}: {output}\n\n" + markdown_table(rows)


def summary_lines(manifest: dict[str, Any]) -> tuple[str, str | None]:
    """(the result line for stdout, the errors-by-reason line for stderr or None)."""
    c = manifest["counts"]
    extra = (f", --fast top-1 agreement with the exact mode {manifest['fast_top1_agreement']:.4f}"
             if "fast_top1_agreement" in manifest else "")
    line = (f"{c.get('input_rows', 0):,} input rows: {c.get('ok_rows', 0):,} ok, {c.get('error_rows', 0):,} "
            f"in the errors files{extra}; {manifest['rows']:,} output rows in {len(manifest['files'])} file(s)")
    skipped = manifest.get("skipped")
    errors = "errors by reason: " + ", ".join(f"{k}={v}" for k, v in skipped.items()) if skipped else None
    return line, errors
