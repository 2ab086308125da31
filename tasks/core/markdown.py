"""Markdown tables for reports (results.md, report.md, Prefect artifacts). No Prefect here."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def markdown_table(rows: Iterable[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts); ``columns``: which keys, in order (default: the first row's)."""
    rows = list(rows)
    if not rows:
        return "_(no rows)_\n"
    columns = columns or list(rows[0])
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(fmt_cell(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    return head + body


def fmt_cell(v: Any) -> str:
    """Floats with 4 significant digits (thousands separated), ints with separators, the rest as str."""
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
