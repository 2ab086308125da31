"""The process-hygiene building blocks on plain processes (no Prefect): a worker exits when its parent is
SIGKILLed, a launched helper dies with the thread that started it, the signal guard stops what the command
started and does not wait past its deadline. The whole commands are tested in test_hygiene.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

PY = [sys.executable, "-c"]


def _gone(pid: int, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _parent_with_child(child_code: str, how: str = "Popen") -> tuple[subprocess.Popen, int]:
    """A parent process that starts a child running ``child_code``; returns (parent, child pid)."""
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        from distilflow.tasks.core import procs
        child = subprocess.Popen([sys.executable, "-c", {child_code!r}]{", preexec_fn=procs.die_with_parent" if how == "pdeathsig" else ""})
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([*PY, parent], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    child = int(p.stdout.readline())
    time.sleep(1.0)  # the child is up (and its watchdog started)
    return p, child


def test_a_worker_exits_when_its_parent_is_killed():
    parent, child = _parent_with_child(
        "from distilflow.tasks.core import procs; import time; procs.worker_init(); time.sleep(120)")
    parent.kill()
    parent.wait()
    assert _gone(child, 3), "the worker outlived its SIGKILLed parent"


def test_a_helper_started_with_die_with_parent_goes_too():
    parent, child = _parent_with_child("import time; time.sleep(120)", how="pdeathsig")
    parent.kill()
    parent.wait()
    assert _gone(child, 3)


def test_without_a_watchdog_a_child_outlives_its_parent():
    """The control: what the mechanisms above fix (an orphan keeps running)."""
    parent, child = _parent_with_child("import time; time.sleep(120)")
    parent.kill()
    parent.wait()
    try:
        assert not _gone(child, 1.5)
    finally:
        os.kill(child, signal.SIGKILL)


GUARDED = textwrap.dedent("""
    import subprocess, sys, time
    from distilflow.tasks.core.procs import Interrupted, SignalGuard
    with SignalGuard(deadline={deadline}) as guard:
        try:
            helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            print(helper.pid, flush=True)
            time.sleep(120)
        except Interrupted as e:
            print("interrupted", e.signum, flush=True)
            {after}
""")


def test_signal_guard_stops_the_helpers_and_the_command_returns():
    p = subprocess.Popen([*PY, GUARDED.format(deadline=8, after="guard.stop_all(); sys.exit(143)")],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    helper = int(p.stdout.readline())
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 143
    assert "interrupted 15" in p.stdout.read()
    assert _gone(helper, 3)


def test_signal_guard_does_not_wait_past_its_deadline():
    """The command hangs while unwinding (a library waiting on a thread): the guard kills what is left and
    exits with 128 + the signal when the deadline passes."""
    p = subprocess.Popen([*PY, GUARDED.format(deadline=2, after="time.sleep(120)")], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None
    helper = int(p.stdout.readline())
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 143  # the body sleeps 120 s: only the 2 s deadline ends it this soon
    assert _gone(helper, 3)
