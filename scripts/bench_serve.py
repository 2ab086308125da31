"""Benchmark ``distilflow serve``: N requests, C at a time, from a real HTTP client; p50/p99 latency, requests/s,
and every answer checked against the batch job's answer for the same text.

    python scripts/bench_serve.py                    # DistilBERT size (random weights), 200 requests, 16 at a time
    python scripts/bench_serve.py --model runs/demo/student --requests 500 --concurrency 32

Each request is one Gutenberg sentence with a masked word in the catalogue's shape
``{"input_data": ["..."]}``. The server is started as a subprocess (``distilflow serve``) on a free port and
stopped at the end. The reference answers come from ``FillMasker`` (the code behind ``distilflow fill-mask
--format json``) over all texts at once; answers must match in tokens and order, scores within 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([str(Path(sys.executable).with_name("distilflow")), "serve", "--model", model,
                             "--port", str(port), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"distilflow serve exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise TimeoutError("distilflow serve did not answer /health within 300 s")


def load(url: str, bodies: list[Any], concurrency: int) -> tuple[list[Any], list[float], float]:
    """POST every body to ``url``, ``concurrency`` at a time: (answers in order, latencies in s, wall s)."""
    import httpx

    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        def one(body: Any) -> tuple[Any, float]:
            t0 = time.perf_counter()
            r = client.post(url, json=body)
            r.raise_for_status()
            return r.json(), time.perf_counter() - t0

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, bodies))
        wall = time.perf_counter() - t0
    return [a for a, _ in results], [t for _, t in results], wall


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: a DistilBERT-size model, random weights)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from bench_fill_mask import gutenberg_rows, save_model
    from bench_fill_mask import same_as_pipeline as same

    from distilflow.tasks.infer.config import FillMaskConfig
    from distilflow.tasks.infer.fill_mask import FillMasker

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or save_model("distilbert", Path(tmp) / "model", args.seed)
        texts = gutenberg_rows(args.requests, args.seed)
        port = free_port()
        server = start_server(model, port)
        try:
            import httpx

            load(f"http://127.0.0.1:{port}/score", [{"input_data": [t]} for t in texts[:8]], 4)  # warm-up
            before = httpx.get(f"http://127.0.0.1:{port}/health").json()["batches"]
            answers, lat, wall = load(f"http://127.0.0.1:{port}/score", [{"input_data": [t]} for t in texts],
                                      args.concurrency)
            batches = httpx.get(f"http://127.0.0.1:{port}/health").json()["batches"] - before
        finally:
            server.terminate()
            server.wait(timeout=30)
        ref = FillMasker(FillMaskConfig(model=model, device="cpu", format="json"))(texts)
        ok = sum(same(a[0] if isinstance(a[0][0], list) else [a[0]], r, tie=1e-6)
                 for a, r in zip(answers, ref, strict=True))
    print(f"{args.requests} requests, {args.concurrency} at a time, load average {os.getloadavg()[0]:.1f}: "
          f"p50 {1000 * statistics.median(lat):.0f} ms, p99 {1000 * percentile(lat, 99):.0f} ms, "
          f"{args.requests / wall:.1f} requests/s; {batches} forward windows for {args.requests} requests "
          f"(micro-batching); answers equal to the batch job's: {ok}/{args.requests}")
    print(json.dumps({"p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * percentile(lat, 99),
                      "requests_per_s": args.requests / wall, "identical": ok, "requests": args.requests}))
    return 0 if ok == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
