"""Process hygiene: every process a command starts dies with it. No Prefect here.

A command starts helpers: the temporary Prefect server (``tasks/ops/prefect_api.py``), data worker processes
(``flows/runners.worker_processes``), training processes (``torchrun`` and its ranks, or one ``python -m
distilflow.tasks.train``), and multiprocessing's resource tracker. Three mechanisms, because no single one
covers every way a command ends:

* **SIGTERM / SIGINT** (``kill PID``, Ctrl-C, a container stop): :class:`SignalGuard`, entered by the
  command line around the job. The signal itself is seen at once by a watcher thread (through
  ``signal.set_wakeup_fd``, whatever Python handler Prefect has installed meanwhile), which stops the
  command's helpers right away -- workers are stopped mid-unit, their finished units stay finished --
  except the Prefect server, which the job still reports its final state to. The main thread unwinds as
  usual (exit 130 / 143, "finished work is kept"); if it has not finished :data:`DEADLINE` seconds after
  the signal, everything left is killed and the process exits. A second signal does that at once.
* **SIGKILL of the command** (nothing runs in it any more): each helper notices on its own.
  :func:`die_with_parent` (``prctl(PR_SET_PDEATHSIG)``, in ``preexec_fn``) for helpers started with
  ``subprocess`` from a thread that outlives them (the server: the main thread; a training launcher: the
  task thread that reads its output until it exits) -- the signal fires when the creating *thread*
  exits, so it is not used for pool workers, which a short-lived task thread may create. Those run
  :func:`worker_init`: a watchdog thread that exits the process within :data:`POLL` seconds of its parent's
  death (before it can finish another unit). Training ranks watch the flow process named in
  :data:`WATCH_ENV` (torchrun sits between them). The resource tracker exits by itself once the last
  process holding its pipe is gone.
* **Normal exit**: each owner stops its helpers (the server on ``atexit``, the pool on leaving its block).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any

import psutil

POLL = 0.2  # seconds between a watchdog's looks at its parent
GRACE = 2.0  # seconds a helper gets between SIGTERM and SIGKILL
DEADLINE = 6.0  # seconds after SIGTERM/SIGINT until whatever is left is killed and the command exits
WATCH_ENV = "DISTILFLOW_WATCH_PID"  # "pid:create_time" of the process a launched helper must die with

_STOP_LAST: set[int] = set()  # helpers the job still needs while it unwinds (the Prefect API server)


# -- in helpers ---------------------------------------------------------------------------------------------
def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """``preexec_fn`` of a subprocess: the kernel sends ``sig`` to it when the creating thread exits (Linux;
    a no-op elsewhere). (No "parent already gone" check on ``getppid() == 1``: in a container the command
    itself may be PID 1.)"""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG


def exit_when_gone(pid: int, start: str | None = None, poll: float = POLL) -> threading.Thread:
    """A daemon thread that ends this process (``os._exit``) once process ``pid`` is gone, or is another
    process with a recycled pid (its start time, :func:`_start_token`, differs from ``start``). For the
    direct parent the test is ``os.getppid()`` (a child is re-parented when its parent dies): no clock in it."""
    direct = pid == os.getppid()

    def alive() -> bool:
        if direct:
            return os.getppid() == pid
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            return False
        return start is None or _start_token(pid) == start

    def watch() -> None:
        while alive():
            time.sleep(poll)
        os._exit(1)

    t = threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True)
    t.start()
    return t


def worker_init(parent: int | None = None) -> None:
    """Initializer of a worker process: exit when the parent dies; leave Ctrl-C to the parent (the
    terminal sends SIGINT to the whole process group; the parent stops the workers itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ppid = parent or os.getppid()
    exit_when_gone(ppid, _start_token(ppid))


def watch_env() -> dict[str, str]:
    """Environment entry that makes a launched helper (:func:`exit_with_watched`) die with this process."""
    return {WATCH_ENV: f"{os.getpid()}:{_start_token(os.getpid()) or ''}"}


def exit_with_watched() -> None:
    """In a launched helper (a training rank): exit once the process named in :data:`WATCH_ENV` is gone.
    No-op when the variable is unset (a helper started by hand stays independent of its shell)."""
    value = os.environ.get(WATCH_ENV, "")
    pid, _, start = value.partition(":")
    if pid.isdigit():
        exit_when_gone(int(pid), start or None)


def _start_token(pid: int) -> str | None:
    """When ``pid`` started, exactly: clock ticks since boot from ``/proc/PID/stat`` on Linux (psutil's
    ``create_time`` adds the boot time, which can move by a second on a VM -- a watchdog comparing it would
    kill a live worker), else psutil's create time to the second."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after "(comm)"
    except (OSError, IndexError):
        pass
    try:
        return str(round(psutil.Process(pid).create_time()))
    except psutil.Error:
        return None


# -- in the command -----------------------------------------------------------------------------------------
def stop_last(pid: int) -> None:
    """Register a helper the job needs until it has unwound (stopped after the others, or at exit)."""
    _STOP_LAST.add(pid)


def descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def stop(procs: list[psutil.Process], grace: float = GRACE) -> None:
    """SIGTERM, then SIGKILL whatever is still running after ``grace`` seconds."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)


def _is_resource_tracker(p: psutil.Process) -> bool:
    try:
        return any("resource_tracker" in a for a in p.cmdline())
    except psutil.Error:
        return False


class Interrupted(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalGuard:
    """The command's side (see the module docstring). Use as a context manager in the main thread; elsewhere
    (a command run from a thread) it does nothing."""

    def __init__(self, deadline: float = DEADLINE, on_deadline: Any = None):
        self.deadline = deadline
        self.on_deadline = on_deadline  # called (from the watcher) just before the forced exit
        self.signalled: int | None = None
        self._active = False
        self._before: set[int] | None = None

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._before = {p.pid for p in descendants()}  # not ours to stop (a test's own server ...)
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        try:
            self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        except ValueError:
            os.close(self._r)
            os.close(self._w)
            return self
        self._old_term = signal.getsignal(signal.SIGTERM)
        if self._old_term in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, self._raise)
        self._active = True
        self._thread = threading.Thread(target=self._watch, name="signal-guard", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._active:
            return
        # after a signal the deadline stays armed through the interpreter's exit (Prefect flushing its logs,
        # the server's stop on atexit): the command is gone by then, whatever hangs
        self._active = self.signalled is not None
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(self._old_fd)
        if signal.getsignal(signal.SIGTERM) == self._raise:
            signal.signal(signal.SIGTERM, self._old_term if self._old_term is not None else signal.SIG_DFL)
        with contextlib.suppress(OSError):
            os.write(self._w, b"\xff")  # wakes the watcher: done
        self._thread.join(timeout=1)
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _raise(self, signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    def ours(self, last: bool = True) -> list[psutil.Process]:
        """The helpers this command started (``last``: including those stopped last, and multiprocessing's
        resource tracker, which exits by itself once the processes it serves are gone)."""
        if self._before is None:
            return []
        return [p for p in descendants() if p.pid not in self._before
                and (last or (p.pid not in _STOP_LAST and not _is_resource_tracker(p)))]

    def stop_all(self, grace: float = GRACE) -> None:
        """Stop the helpers this command started, after an interrupt, before the command returns; the
        Prefect server stays for the run's last reports and stops at exit (``atexit``)."""
        stop(self.ours(last=False), grace)

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)
            except OSError:
                return
            if not data or b"\xff" in data:
                return
            sigs = [b for b in data if b in (signal.SIGINT, signal.SIGTERM)]
            if not sigs:
                continue
            if self.signalled is not None:  # a second signal: no more waiting
                self._force()
            self.signalled = sigs[0]
            threading.Thread(target=self._wind_down, name="signal-guard-stop", daemon=True).start()

    def _wind_down(self) -> None:
        t0 = time.monotonic()
        stop(self.ours(last=False))  # workers, training processes: now, mid-unit
        time.sleep(max(0.0, self.deadline - (time.monotonic() - t0)))
        if self._active:  # the main thread is still unwinding: do not let it hang the stop
            self._force()

    def _force(self) -> None:
        if self.on_deadline is not None:
            with contextlib.suppress(Exception):
                self.on_deadline(self.signalled)
        for p in self.ours():
            with contextlib.suppress(psutil.Error):
                p.kill()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + int(self.signalled or signal.SIGTERM))
