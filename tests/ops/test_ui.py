"""The Prefect UI, for real: a server with its UI, the demo pipeline (the README's first command) reported to it,
and headless Chromium (Debian `chromium`) rendering the flow-runs page, the artifacts page, the pipeline report,
the prepare summary and a loss-curve report.

Screenshots land in the test's tmp dir; set DISTILFLOW_UI_SCREENSHOT=docs/ui-screenshot.png to refresh the
README's picture.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from distilflow.tasks.core.io import read_json
from distilflow.tasks.core.markdown import fmt_cell as _fmt
from tests.conftest import REPO
from tests.prefect_server import prefect_server, run_artifacts

pytestmark = pytest.mark.integration


CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"))
                 if p and Path(p).exists()), None)


def chromium(url: str, out_dir: Path, *, screenshot: Path | None = None, budget_ms: int = 30000) -> str:
    """Render ``url`` headless; returns the DOM after the page's scripts ran (virtual time budget)."""
    profile = tempfile.mkdtemp(dir=out_dir, prefix="chromium-")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
           "--window-size=1400,1000"]
    cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def render_until(url: str, out_dir: Path, expected: list[str], attempts: int = 4) -> tuple[str, str]:
    """(DOM, visible text) of ``url`` once every ``expected`` string is shown.

    Lists fill in after the page's API calls return; on a loaded machine that can take longer than one
    virtual-time budget, so render again with a longer budget before giving up (the last render is
    returned and the caller's assertion shows what was on the page).
    """
    dom = text = ""
    for i in range(attempts):
        dom = chromium(url, out_dir, budget_ms=30000 * (i + 1))
        text = visible_text(dom)
        if all(e in text for e in expected):
            break
    return dom, text


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(style|script|svg)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


@pytest.mark.timeout(1800)  # the demo pipeline: ~45 s on 2 idle cores, up to ~10 min on a loaded machine
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: run scripts/ci-system-deps.sh")
def test_ui_shows_the_demo_pipeline_run_and_its_reports(tmp_path):
    out_dir = tmp_path / "demo"
    with prefect_server(tmp_path, ui=True) as server:
        # the README's first command, reported to this server
        demo = subprocess.run([str(Path(sys.executable).with_name("distilflow")), "pipeline", "--output", str(out_dir)],
                              env={**server.env, "DISTILFLOW_PROGRESS": "0"}, capture_output=True, text=True,
                              timeout=1700)
        assert demo.returncode == 0, demo.stderr[-3000:]
        assert "Traceback" not in demo.stdout + demo.stderr
        with server.client() as client:
            runs = client.read_flow_runs()
            flows = {f.id: f.name for f in client.read_flows()}
        (top,) = [r for r in runs if r.parent_task_run_id is None]
        assert flows[top.flow_id] == "pipeline" and top.state.is_completed()
        # every stage is a sub-flow of the pipeline run, all completed
        sub = {flows[r.flow_id] for r in runs if r.parent_task_run_id is not None and r.state.is_completed()}
        assert {"vocab", "prepare", "pretrain", "distill", "evaluate", "fill-mask"} <= sub, sub
        arts = {a.key: a for a in run_artifacts(server, top.id) if a.key}

        # 1. the flow-runs page lists the pipeline run, completed
        _, runs_page = render_until(f"{server.url}/runs", tmp_path, [top.name, "Completed"])
        assert top.name in runs_page and "Completed" in runs_page, runs_page[-2000:]

        # 2. the artifacts page lists the run's reports: per-stage counts and throughput, loss curves,
        #    evaluation tables, the pipeline report
        keys = ["distilflow-pipeline-report", "distilflow-prepare", "pretrain-loss-curves", "distill-loss-curves",
                "evaluation-results", "bias-probe", "distilflow-fill-mask"]
        assert set(keys) <= set(arts), sorted(arts)
        _, listing = render_until(f"{server.url}/artifacts", tmp_path, keys)
        for key in keys:
            assert key in listing, f"{key} not on the artifacts page:\n{listing[-2000:]}"

        # 3. the pipeline report renders as tables, linked to its run, with the numbers of report.md
        report = arts["distilflow-pipeline-report"]
        with server.client() as client:
            owner = client.read_flow_run(report.flow_run_id)
        assert owner.id == top.id
        dom, page = render_until(f"{server.url}/artifacts/artifact/{report.id}", tmp_path,
                                 [f"Flow Run {owner.name}", "fill-mask"])
        assert "<table" in dom, "the markdown tables were not rendered as tables"
        assert f"Flow Run {owner.name}" in page, page[-2000:]
        report_md = (out_dir / "report.md").read_text()
        for stage in ("vocab", "prepare", "pretrain", "distill", "evaluate", "fill-mask"):
            row = re.search(rf"^\| {stage} \| ran \| [^|]+ \| ([^|]+) \|$", report_md, flags=re.M)
            assert row, f"no '{stage}' row in report.md:\n{report_md}"
            assert re.search(rf"{stage} ran [\d.,]+ {re.escape(row.group(1).strip())}", page), \
                f"stage {stage} ({row.group(1).strip()}) not shown:\n{page[:3000]}"
        assert "Held-out masked LM" in page and "top-5 accuracy" in page  # evaluation and fill-mask tables

        # 4. the prepare summary's numbers are the manifests' numbers (per-stage counts + throughput)
        dom, page = render_until(f"{server.url}/artifacts/artifact/{arts['distilflow-prepare'].id}", tmp_path,
                                 ["masked"])
        prepared = next(d for d in (out_dir / "data", out_dir / "heldout") if str(d) in page)
        for stage in ("corpus", "pairs", "masked"):
            rows = read_json(str(prepared / stage / ".distilflow" / "manifest.json"))["rows"]
            assert re.search(rf"{stage} \d+ {rows:,} ", page), f"{stage} row with {rows:,} rows not shown:\n{page}"
        assert "MB/s" in page

        # 5. a loss-curve report shows the training it describes
        _, page = render_until(f"{server.url}/artifacts/artifact/{arts['distill-loss-curves'].id}", tmp_path,
                               ["Loss curves", "loss_ce"])
        last = [json.loads(line) for line in (out_dir / "student" / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line][-1]
        assert f"{last['step']} {_fmt(last['loss'])} {_fmt(last['loss_ce'])}" in page, page[:3000]

        shot = tmp_path / "ui-artifact.png"
        chromium(f"{server.url}/artifacts/artifact/{report.id}", tmp_path, screenshot=shot)
        assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        target = os.environ.get("DISTILFLOW_UI_SCREENSHOT")
        if target:
            dest = Path(target) if Path(target).is_absolute() else REPO / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            chromium(f"{server.url}/artifacts/artifact/{report.id}", tmp_path, screenshot=dest)
