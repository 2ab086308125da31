"""Benchmark the prepare job: throughput vs raw `tokenizers`, worker scaling, peak memory.

    python scripts/bench_prepare.py --size-mb 64 --workers 1 2          # throughput + scaling
    python scripts/bench_prepare.py --size-mb 1024 --workers 2 --rss    # bounded memory on 1 GB

The corpus is generated from the shared Gutenberg books (paragraphs shuffled with a fixed seed, written as
several files). In the same run we measure the baseline -- ``Tokenizer.encode_batch`` on the same
documents, one thread, and the same in N concurrent processes (the machine's own scaling ceiling) -- and
``distilflow prepare`` (shard + pairs + mask, seq 128) per worker count, and print the ratios: per core by
wall clock in the flow and for the whole process (start-up included), and by CPU seconds -- of the data
workers and of all processes -- as a cross-check
that hypervisor steal (printed) and idle waits do not enter. ``--rss`` reports the peak resident memory of the
whole process tree (CLI, Prefect server, workers), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def make_corpus(out: Path, size_mb: int, n_files: int, seed: int = 0) -> list[str]:
    """Shuffled Gutenberg paragraphs (blank-line separated documents) until ``size_mb`` MB."""
    paras: list[str] = []
    for book in sorted((SHARED / "corpus" / "gutenberg").glob("pg*.txt")):
        text = book.read_text(encoding="utf-8")
        paras += [p.strip() for p in re.split(r"\r?\n\s*\r?\n", text) if p.strip()]
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / f".done-{size_mb}-{n_files}"
    files = [out / f"corpus-{i:03d}.txt" for i in range(n_files)]
    if stamp.exists():
        return [str(f) for f in files]
    rng = np.random.default_rng(seed)
    per_file = size_mb * 1_000_000 // n_files
    for f in files:
        written = 0
        with open(f, "w", encoding="utf-8") as fh:
            while written < per_file:
                chunk = "\n\n".join(paras[i] for i in rng.permutation(len(paras))[:2000]) + "\n\n"
                fh.write(chunk)
                written += len(chunk.encode())
    stamp.write_text("ok")
    return [str(f) for f in files]


def baseline_encode(files: list[str], tokenizer: str) -> tuple[float, int, float]:
    """Raw tokenizers throughput on the same documents, one thread; returns (MB/s, bytes, CPU s per MB)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer, "tokenizer.json"))
    total_bytes, total_s, total_cpu = 0, 0.0, 0.0
    for f in files:
        text = Path(f).read_text(encoding="utf-8")
        docs = [re.sub(r"\s+", " ", d).strip() for d in text.split("\n\n") if d.strip()]
        t, c = time.perf_counter(), time.process_time()
        for i in range(0, len(docs), 1000):
            tok.encode_batch(docs[i: i + 1000], add_special_tokens=False)
        total_s += time.perf_counter() - t
        total_cpu += time.process_time() - c
        total_bytes += len(text.encode())
    return total_bytes / total_s / 1e6, total_bytes, total_cpu / (total_bytes / 1e6)


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests so far (all cores; /proc/stat "steal"), in seconds."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _encode_share(args: tuple[list[str], str]) -> int:
    return baseline_encode(*args)[1]


def baseline_encode_parallel(files: list[str], tokenizer: str, n: int) -> float:
    """The same baseline in ``n`` concurrent processes (files[i::n] each): aggregate MB/s. Divided by the
    1-process number this is what the machine itself allows for n-way scaling (shared cores, caches,
    memory bandwidth, SMT siblings) -- the ceiling for prepare's speed-up."""
    import multiprocessing

    t = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        total = sum(pool.map(_encode_share, [(files[i::n], tokenizer) for i in range(n)]))
    return total / (time.perf_counter() - t) / 1e6


def run_prepare(inputs: list[str], out: Path, workers: int, tokenizer: str, rss: bool) -> dict:
    cmd = [sys.executable, "-m", "distilflow.cli", "prepare", "--input", *inputs, "--output", str(out),
           "--tokenizer", tokenizer, "--max-seq-len", "128", "--workers", str(workers), "--overwrite"]
    env = {**os.environ, "DISTILFLOW_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    t0, steal0 = time.perf_counter(), steal_seconds()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]
    per_process: dict[str, int] = {}
    cpu_by_process: dict[str, float] = {}

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                total = 0
                for p in [root, *root.children(recursive=True)]:
                    with p.oneshot():
                        key = f"{p.pid} {_role(p)}"
                        t, mem = p.cpu_times(), p.memory_info().rss
                    cpu_by_process[key] = t.user + t.system
                    per_process[key] = max(per_process.get(key, 0), mem)
                    total += mem
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    output = proc.communicate()[0]
    wall = time.perf_counter() - t0
    # CPU time of the whole process tree (CLI + flow, worker processes, Prefect's temporary server):
    # terminated descendants that were waited for are summed into RUSAGE_CHILDREN.
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    steal = steal_seconds() - steal0
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{output[-4000:]}")
    m = re.search(r"prepared ([\d.]+) MB .* in ([\d.]+) s", output)
    flow_s = float(m.group(2)) if m else wall
    # the data workers' own CPU (sampled every 0.2 s: the last fraction of a second is missed)
    worker_cpu = sum(v for k, v in cpu_by_process.items() if k.endswith(" worker"))
    by_role: dict[str, float] = {}
    for k, v in cpu_by_process.items():
        role = k.split(" ", 1)[1]
        by_role[role] = round(by_role.get(role, 0.0) + v, 1)
    result: dict[str, Any] = {"workers": workers, "flow_seconds": flow_s, "wall_seconds": wall,
                              "cpu_seconds_all_processes": cpu_s, "cpu_seconds_worker_processes": worker_cpu,
                              "cpu_seconds_by_role": by_role, "steal_seconds": steal}
    if rss:
        result["peak_rss_gib"] = peak[0] / 2**30
        result["peak_rss_mib_by_process"] = {k: round(v / 2**20) for k, v in sorted(per_process.items())}
    return result


def _role(p: psutil.Process) -> str:
    cmd = " ".join(p.cmdline())
    if "uvicorn" in cmd or "prefect.server" in cmd:
        return "prefect-server"
    if "spawn_main" in cmd or "multiprocessing" in cmd:
        return "worker"
    return "cli" if "distilflow" in cmd else p.name()


def startup(runs: int, work: Path, tokenizer: str) -> None:
    """The fixed cost of one command: ``distilflow prepare`` on the embedded demo corpus (0.1 MB), whole
    process (Python start, imports, Prefect's temporary server, flow bookkeeping) minus the flow's own
    seconds, ``runs`` times."""
    from distilflow.tasks.prepare.demo_corpus import write_demo_corpus

    train, _ = write_demo_corpus(str(work / "demo-corpus"))
    env = {**os.environ, "DISTILFLOW_PROGRESS": "0"}
    for i in range(runs):
        cmd = [sys.executable, "-m", "distilflow.cli", "prepare", "--input", *train, "--output",
               str(work / "demo-prep"), "--tokenizer", tokenizer, "--max-seq-len", "64", "--overwrite"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        wall = time.perf_counter() - t0
        m = re.search(r"in ([\d.]+) s;", out)
        flow_s = float(m.group(1)) if m else float("nan")
        print(f"start-up run {i + 1}: whole process {wall:.1f} s, in the flow {flow_s:.1f} s, "
              f"fixed cost {wall - flow_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "distilflow.cli", "prepare", "--help"], capture_output=True, check=True)
    print(f"distilflow prepare --help: {time.perf_counter() - t0:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rss", action="store_true", help="sample peak RSS of the process tree")
    ap.add_argument("--skip-baseline", action="store_true", help="memory runs: skip the encode_batch baseline")
    ap.add_argument("--workdir", default=str(REPO / "bench-out"))
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "bert-base-uncased"))
    ap.add_argument("--startup", type=int, default=0, metavar="N",
                    help="only measure the fixed cost of a command: N runs on the embedded demo corpus")
    a = ap.parse_args()
    work = Path(a.workdir)
    if a.startup:
        startup(a.startup, work, a.tokenizer)
        return
    files = make_corpus(work / f"corpus-{a.size_mb}mb", a.size_mb, a.files)
    results = {"size_mb": a.size_mb, "files": a.files, "cpus": os.cpu_count()}
    os.environ["RAYON_NUM_THREADS"] = "1"
    if a.skip_baseline:
        base_mbs, nbytes, base_cpu = float("nan"), sum(os.path.getsize(f) for f in files), float("nan")
    else:
        steal0 = steal_seconds()
        base_mbs, nbytes, base_cpu = baseline_encode(files, a.tokenizer)
        print(f"baseline: tokenizers encode_batch, 1 thread: {base_mbs:.2f} MB/s on {nbytes / 1e6:.0f} MB "
              f"({base_cpu:.2f} CPU s/MB; steal {steal_seconds() - steal0:.0f} s)", flush=True)
    results["baseline_encode_batch_mb_s_1_thread"] = round(base_mbs, 3)
    n_max = max(a.workers)
    if not a.skip_baseline and n_max > 1:
        steal0 = steal_seconds()
        par = baseline_encode_parallel(files, a.tokenizer, n_max)
        results["machine_ceiling_speedup"] = par / base_mbs
        print(f"baseline in {n_max} concurrent processes: {par:.2f} MB/s = {par / base_mbs:.2f}x one process "
              f"(what this machine allows; steal {steal_seconds() - steal0:.0f} s)", flush=True)
    runs = []
    for w in a.workers:
        r = run_prepare(files, work / f"prep-{a.size_mb}mb-w{w}", w, a.tokenizer, a.rss)
        r["mb_s"] = nbytes / 1e6 / r["flow_seconds"]
        r["mb_s_per_worker"] = r["mb_s"] / w
        r["cpu_s_per_mb"] = r["cpu_seconds_all_processes"] / (nbytes / 1e6)
        r["worker_cpu_s_per_mb"] = r["cpu_seconds_worker_processes"] / (nbytes / 1e6)
        runs.append(r)
        print(f"prepare --workers {w}: {r['mb_s']:.2f} MB/s ({r['flow_seconds']:.1f} s in the flow, "
              f"{r['wall_seconds']:.1f} s wall incl. Prefect start; CPU s/MB: {r['worker_cpu_s_per_mb']:.2f} in the "
              f"data workers, {r['cpu_s_per_mb']:.2f} in all processes; steal {r['steal_seconds']:.0f} s)"
              + (f"; peak RSS {r['peak_rss_gib']:.2f} GiB" if a.rss else ""), flush=True)
    if not a.skip_baseline:
        # the machine's speed drifts (shared host): measure the baseline again after the prepare runs and
        # compare against the mean of both
        after_mbs, _, after_cpu = baseline_encode(files, a.tokenizer)
        base_mean = (base_mbs + after_mbs) / 2
        cpu_mean = (base_cpu + after_cpu) / 2
        results["baseline_encode_batch_mb_s_1_thread_after"] = round(after_mbs, 3)
        results["baseline_cpu_s_per_mb"] = round(cpu_mean, 3)
        print(f"baseline again after the runs: {after_mbs:.2f} MB/s ({after_cpu:.2f} CPU s/MB); "
              f"ratios against the mean {base_mean:.2f} MB/s ({cpu_mean:.2f} CPU s/MB):")
        for r in runs:
            r["ratio_per_core_vs_encode_batch"] = r["mb_s_per_worker"] / base_mean
            # the whole process: Python and Prefect start-up, the temporary server, the flow's bookkeeping
            r["ratio_per_core_whole_process"] = nbytes / 1e6 / r["wall_seconds"] / r["workers"] / base_mean
            # Cross-checks by CPU seconds instead of wall time (steal and idle waits drop out): of the data
            # workers (the pipeline's own efficiency), and of all processes (Prefect's start-up, server
            # and flow process included).
            r["ratio_worker_cpu_vs_encode_batch"] = cpu_mean / r["worker_cpu_s_per_mb"]
            r["ratio_all_cpu_vs_encode_batch"] = cpu_mean / r["cpu_s_per_mb"]
            print(f"  --workers {r['workers']}: per core / encode_batch = {r['ratio_per_core_vs_encode_batch']:.2f} "
                  f"(wall clock in the flow), {r['ratio_per_core_whole_process']:.2f} (whole process); by CPU time: "
                  f"{r['ratio_worker_cpu_vs_encode_batch']:.2f} (data workers), "
                  f"{r['ratio_all_cpu_vs_encode_batch']:.2f} (all processes)")
    if len(runs) > 1:
        results["speedup"] = runs[-1]["mb_s"] / runs[0]["mb_s"]
        ceiling = results.get("machine_ceiling_speedup")
        print(f"speed-up {runs[0]['workers']} -> {runs[-1]['workers']} workers: {results['speedup']:.2f}x"
              + (f" = {results['speedup'] / ceiling:.2f} of the machine's {ceiling:.2f}x" if ceiling else ""))
    results["runs"] = runs
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
