"""Process hygiene and one run per output folder, with the real command line (issue 14 items 3-5).

Every test starts ``distilflow`` as a subprocess (its own session, like a shell job) with a temporary
Prefect server, workers or training processes, then stops it the way users and schedulers do:

* SIGTERM (``kill PID``, a container stop) and Ctrl-C (SIGINT to the whole process group): the command
  exits within 10 s (130 / 143, one "interrupted" line) and nothing it started is left running;
* SIGKILL of the command alone: 10 s later nothing it started is running, and no worker finished another
  unit after the kill.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import BERT_TOKENIZER, GUTENBERG

pytestmark = pytest.mark.integration

ENV = {"DISTILFLOW_PROGRESS": "0", "PREFECT_API_URL": ""}


def _as_in_a_terminal() -> None:
    """Ctrl-C's default disposition, as a terminal's foreground job has it: a suite started in the background
    (``cmd &`` without job control, nohup) passes SIGINT down *ignored*, and the command rightly keeps it so."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in {**os.environ, **ENV}.items() if v != ""}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "distilflow.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, preexec_fn=_as_in_a_terminal)


def _wait_for(cond: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"exited {proc.returncode} before the test could stop it:\n{log.read_text()}"
        assert time.time() < deadline, f"timed out waiting for the run to get going:\n{log.read_text()}"
        time.sleep(0.05)


def _family(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def _running(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    return out


def _stop_and_check(proc: subprocess.Popen, log: Path, how: str) -> float:
    """Stop the command as ``how`` (TERM, INT = Ctrl-C to the process group, KILL = the command alone) and
    check that it and everything it started are gone within 10 s. Returns the wall time of the signal."""
    family = _family(proc)
    assert family, "the command had started no helper process"
    t0, sent_at = time.monotonic(), time.time()
    if how == "INT":
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    else:
        proc.send_signal(getattr(signal, f"SIG{how}"))
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"SIG{how}: the command was still running after 10 s:\n{log.read_text()[-3000:]}")
    while _running(family) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    left = _running(family)
    for p in family:  # never leave anything behind for the next test
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, f"SIG{how}: still running 10 s after the signal: {left}"
    if how != "KILL":
        assert code == 128 + getattr(signal, f"SIG{how}"), (code, log.read_text()[-3000:])
        assert "interrupted; finished work is kept" in log.read_text()
    return sent_at


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """40 parts of a novel: enough units that a stop lands in the middle of the shard stage."""
    d = tmp_path_factory.mktemp("in")
    text = (GUTENBERG / "pg1342.txt").read_text(encoding="utf-8")
    step = len(text) // 40
    for i in range(40):
        (d / f"part{i:02d}.txt").write_text(text[i * step:(i + 1) * step], encoding="utf-8")
    return d


def _prepare_args(inputs: Path, out: Path) -> list[str]:
    return ["prepare", "--input", str(inputs), "--output", str(out), "--tokenizer", str(BERT_TOKENIZER),
            "--max-seq-len", "128", "--workers", "2"]


def _workers_busy(out: Path, proc: subprocess.Popen) -> Callable[[], bool]:
    done = out / "corpus" / ".distilflow" / "done"

    def cond() -> bool:
        workers = [p for p in _family(proc) if "multiprocessing" in " ".join(_cmd(p))]
        return len(workers) >= 2 and len(list(done.glob("*.json"))) >= 2

    return cond


def _cmd(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


@pytest.mark.parametrize("how", ["TERM", "INT"])
def test_prepare_stops_with_everything_it_started(inputs, tmp_path, how):
    out, log = tmp_path / "out", tmp_path / "log"
    proc = _start(_prepare_args(inputs, out), log)
    _wait_for(_workers_busy(out, proc), proc, log)
    _stop_and_check(proc, log, how)
    if how == "TERM":  # the folder is not left locked or half-written: the same command finishes it
        rerun = subprocess.run([sys.executable, "-m", "distilflow.cli", *_prepare_args(inputs, out)],
                               env={**os.environ, "DISTILFLOW_PROGRESS": "0"}, capture_output=True, text=True,
                               timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]


def test_prepare_killed_leaves_nothing_running_and_no_unit_finishes_after(inputs, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    proc = _start(_prepare_args(inputs, out), log)
    _wait_for(_workers_busy(out, proc), proc, log)
    done = out / "corpus" / ".distilflow" / "done"
    killed_at = _stop_and_check(proc, log, "KILL")
    # a worker notices its parent is gone within 0.2 s (procs.POLL): no unit finishes later than that
    # (1 s of slack for a loaded machine; without the watchdog the workers would run the queue on for seconds)
    late = {p.name: round(p.stat().st_mtime - killed_at, 2) for p in done.glob("*.json")
            if p.stat().st_mtime > killed_at + 1.0}
    assert not late, f"units finished after the kill (seconds after): {late}"


@pytest.fixture(scope="module")
def fill_input(tmp_path_factory) -> tuple[str, Path]:
    from tests.infer.test_fill_mask import save_tiny_mlm

    root = tmp_path_factory.mktemp("fill")
    model = save_tiny_mlm(root / "model", "bert", BERT_TOKENIZER)
    text = (GUTENBERG / "pg1342.txt").read_text(encoding="utf-8").split()
    with open(root / "q.txt", "w") as f:
        for i in range(0, 400_000):
            j = (i * 7) % (len(text) - 20)
            f.write(" ".join(text[j:j + 6]) + " [MASK] " + " ".join(text[j + 6:j + 12]) + "\n")
    return model, root / "q.txt"


@pytest.mark.parametrize("how", ["TERM", "KILL"])
def test_fill_mask_stops_with_everything_it_started(fill_input, tmp_path, how):
    model, query = fill_input
    out, log = tmp_path / "out", tmp_path / "log"
    proc = _start(["fill-mask", "--input", str(query), "--output", str(out), "--model", model], log)
    _wait_for(lambda: any(p.name.startswith(".q.parquet.tmp-") for p in out.glob(".*")), proc, log)
    time.sleep(1)
    _stop_and_check(proc, log, how)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from distilflow.tasks.prepare.config import PrepareConfig
    from distilflow.tasks.prepare.job import run_local

    root = tmp_path_factory.mktemp("train")
    (root / "in.txt").write_text((GUTENBERG / "pg11.txt").read_text(encoding="utf-8")[:60000], encoding="utf-8")
    run_local(PrepareConfig(inputs=(str(root / "in.txt"),), output=str(root / "prep"), tokenizer=str(BERT_TOKENIZER),
                            max_seq_len=64))
    return root / "prep"


@pytest.mark.parametrize("launcher,how", [("subprocess", "TERM"), ("torchrun", "KILL")])
def test_pretrain_stops_with_its_training_processes(prepared, tmp_path, launcher, how):
    out, log = tmp_path / "out", tmp_path / "log"
    proc = _start(["pretrain", "--data", str(prepared), "--output", str(out), "--config", "tiny", "--batch-size", "4",
                   "--max-steps", "100000", "--log-every", "1", "--launcher", launcher], log)
    _wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0, proc, log)
    assert any("distilflow.tasks.train" in " ".join(_cmd(p)) for p in _family(proc))
    _stop_and_check(proc, log, how)


def test_two_runs_on_one_output_one_refuses(inputs, tmp_path):
    """Two identical commands on one --output (a double-clicked deployment, a retry while the first still
    runs): the second refuses with a line naming the first; the first's output is complete."""
    few = tmp_path / "in"  # 4 of the 40 parts: a refusal needs no long run
    few.mkdir()
    for part in sorted(inputs.iterdir())[:4]:
        (few / part.name).write_bytes(part.read_bytes())
    out = tmp_path / "out"
    # The first run is paused (SIGSTOP) once it holds the lock and has finished a unit, so the second one
    # surely meets it however fast either starts (both starting at once raced: a first run done within the
    # second's start-up leaves nothing to refuse); the lease (60 s) outlives the pause.
    runs = [_start(_prepare_args(few, out), tmp_path / "log0")]
    try:
        _wait_for(lambda: any((out / "corpus" / ".distilflow" / "done").glob("*.json")), runs[0], tmp_path / "log0")
        os.killpg(runs[0].pid, signal.SIGSTOP)
        try:
            runs.append(_start(_prepare_args(few, out), tmp_path / "log1"))
            runs[1].wait(timeout=300)
        finally:
            os.killpg(runs[0].pid, signal.SIGCONT)
        codes = [p.wait(timeout=900) for p in runs]
    finally:
        for p in runs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    logs = [(tmp_path / f"log{i}").read_text() for i in range(2)]
    assert codes == [0, 2], logs
    winner, loser = 0, 1
    lines = [line for line in logs[loser].splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in logs[loser], logs[loser]
    assert f"is in use by another distilflow run (prepare, pid {runs[winner].pid} on " in lines[0]
    assert "prepared " in logs[winner] and not (out / ".distilflow" / "lock").exists()


def test_corrected_rerun_after_a_mistyped_model_and_a_bracket_in_a_file_name(fill_input, tmp_path, capsys,
                                                                             prefect_test_harness_session):
    from distilflow.cli import main

    model, _ = fill_input
    notes = tmp_path / "notes[v2].txt"
    notes.write_text("Paris is the [MASK] of France.\nThe [MASK] sat on the mat.\n")
    out = tmp_path / "preds"

    def run(m: str) -> tuple[int, str, str]:  # in this process: the error boundary is the same code
        code = main(["fill-mask", "--input", str(notes), "--output", str(out), "--model", m])
        got = capsys.readouterr()
        return code, got.out, got.err

    code, _, err = run(model + "x")
    assert code == 2 and "no such model folder" in err and "Traceback" not in err, err
    code, stdout, err = run(model)
    assert code == 0, err[-3000:]
    assert "2 input rows: 2 ok" in stdout
