"""The Prefect UI, for real: a server with its UI, a small `distilflow prepare` run reported to it, and headless
Chromium (Debian `chromium`) rendering the flow-runs page, the artifacts page and the run's summary artifact.

Screenshots land in the test's tmp dir; set DISTILFLOW_UI_SCREENSHOT=docs/ui-screenshot.png to refresh the
README's picture.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from distilflow.tasks.io import read_json
from tests.prefect_server import prefect_server, run_artifacts

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
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


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: run scripts/ci-system-deps.sh")
def test_ui_shows_prepare_run_and_its_table_artifact(tmp_path, bert_tokenizer_path):
    from tests.conftest import GUTENBERG

    landing = tmp_path / "landing"
    landing.mkdir()
    text = (GUTENBERG / "pg1342.txt").read_bytes()[:30_000]
    (landing / "book.txt").write_bytes(text[: text.rfind(b"\n") + 1])
    out_dir = tmp_path / "prepared"
    with prefect_server(tmp_path, ui=True) as server:
        demo = subprocess.run(
            [str(Path(sys.executable).with_name("distilflow")), "prepare", "--input", str(landing), "--output",
             str(out_dir), "--tokenizer", str(bert_tokenizer_path), "--max-seq-len", "64"],
            env=server.env, capture_output=True, text=True, timeout=300)
        assert demo.returncode == 0, demo.stderr[-3000:]
        with server.client() as client:
            runs = client.read_flow_runs()
        (top,) = [r for r in runs if r.parent_task_run_id is None]
        assert top.state.is_completed()
        arts = {a.key: a for a in run_artifacts(server, top.id)}
        summary = arts["distilflow-prepare"]

        # 1. the flow-runs page lists the run, completed
        _, runs_page = render_until(f"{server.url}/runs", tmp_path, [top.name, "Completed"])
        assert top.name in runs_page and "Completed" in runs_page, runs_page[-2000:]

        # 2. the artifacts page lists the run's reports (per-stage counts and throughput)
        keys = ["distilflow-prepare", "distilflow-shard", "distilflow-pairs", "distilflow-mask"]
        _, listing = render_until(f"{server.url}/artifacts", tmp_path, keys)
        for key in keys:
            assert key in listing, f"{key} not on the artifacts page:\n{listing[-2000:]}"

        # 3. the summary artifact renders as a table whose numbers are the manifests' numbers, linked to its run
        with server.client() as client:
            owner = client.read_flow_run(summary.flow_run_id)
        dom, page = render_until(f"{server.url}/artifacts/artifact/{summary.id}", tmp_path,
                                 [f"Flow Run {owner.name}", "masked"])
        assert "<table" in dom, "the markdown table was not rendered as a table"
        assert f"Flow Run {owner.name}" in page, page[-2000:]
        for stage in ("corpus", "pairs", "masked"):
            rows = read_json(str(out_dir / stage / "manifest.json"))["rows"]
            assert re.search(rf"{stage} \d+ {rows:,} ", page), f"{stage} row with {rows:,} rows not shown:\n{page}"
        assert "MB/s" in page  # throughput is part of the summary

        shot = tmp_path / "ui-artifact.png"
        chromium(f"{server.url}/artifacts/artifact/{summary.id}", tmp_path, screenshot=shot)
        assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        target = os.environ.get("DISTILFLOW_UI_SCREENSHOT")
        if target:
            dest = Path(target) if Path(target).is_absolute() else REPO / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            chromium(f"{server.url}/artifacts/artifact/{summary.id}", tmp_path, screenshot=dest)
