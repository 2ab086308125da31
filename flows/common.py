"""What every flow shares: flows derived from job configs, artifacts. Task runners: ``flows/runners.py``."""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prefect import Flow, flow
from prefect.artifacts import create_markdown_artifact, create_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.context import SettingsContext

from distilflow.tasks.core import lock
from distilflow.tasks.core.config import Config, docstring_args, signature
from distilflow.tasks.core.terminal import install_prefect_console_filter

T = TypeVar("T")
install_prefect_console_filter()


def config_flow(cls: type[Config], *, name: str, defaults: dict[str, Any] | None = None,
                fixed: dict[str, Any] | None = None, skip: tuple[str, ...] = (),
                **flow_kwargs: Any) -> Callable[[Callable[..., T]], Flow]:
    """A Prefect flow whose parameters are the fields of the job config ``cls``.

    The decorated function takes the validated config (``body(cfg)``); the flow's signature -- what the
    UI's run form, ``prefect.yaml`` parameters and ``flow(**params)`` calls see -- is derived from the
    config's fields (typed, with their defaults, help texts as descriptions). ``fixed`` fields are set by
    the flow and are not parameters (``mode="distill"``); ``defaults`` overrides defaults for this flow;
    ``skip`` fields do not apply to this flow (not parameters; the config's default is used).
    A config with an ``output`` folder holds that folder's exclusive lock while the flow runs: a second run
    on it refuses with one line naming the holder.
    """
    fixed = fixed or {}
    hidden = (*fixed, *skip)

    def decorate(body: Callable[..., T]) -> Flow:
        sig = signature(cls, skip=hidden, defaults=defaults)
        # this flow's defaults also when ``fn`` is called directly (Prefect applies them from the signature)
        flow_defaults = {k: p.default for k, p in sig.parameters.items() if p.default is not p.empty}

        def fn(**params: Any) -> T:
            cfg = cls.from_dict({**flow_defaults, **params, **fixed})
            output = getattr(cfg, "output", None)
            try:
                if not isinstance(output, str) or not output:
                    return body(cfg)
                with lock.hold(output, name):  # one run per output folder (tasks/core/lock.py)
                    return body(cfg)
            finally:
                ProgressArtifact.join_all()  # the last progress values go out while the run is still up

        fn.__signature__ = sig  # type: ignore[attr-defined]
        fn.__name__, fn.__qualname__, fn.__module__ = body.__name__, body.__qualname__, body.__module__
        fn.__doc__ = f"{(body.__doc__ or '').strip()}\n\n{docstring_args(cls, skip=hidden)}"
        return flow(name=name, **flow_kwargs)(fn)

    return decorate


def publish(markdown: str, key: str | None = None, description: str | None = None) -> None:
    """A markdown artifact in the Prefect UI (keys: lowercase letters, digits and dashes)."""
    create_markdown_artifact(markdown=markdown, key=key, description=description)


class ProgressArtifact:
    """A Prefect progress artifact whose updates go out from a thread of its own, the latest value only.

    Each update is an API round trip (0.1-0.6 s measured while the workers load the machine); sent from the
    loop that collects finished units it delayed the end of every stage by one. Use as a context manager:
    leaving it sends the last value and lets the thread end. Every job flow (:func:`config_flow`) waits for such
    threads before it returns (:meth:`join_all`), other callers at exit -- where the value still goes out but
    Prefect, its shutdown begun, can no longer start the events worker the update reports to and logs a
    traceback. At most ``EXIT_WAIT`` seconds in all (a dead or hung API server never holds up a command).

    Values closer together than ``MIN_INTERVAL`` seconds are coalesced (the last one goes out on leaving): each
    update is also an event the server persists and evaluates triggers on, a quarter of all events of a
    prepare run on 1 GB when every finished unit (two a second) made one; on 2 cores that bookkeeping takes
    CPU from the data work."""

    EXIT_WAIT = 5.0
    MIN_INTERVAL = 2.0
    _senders: list[ProgressArtifact] = []

    def __init__(self, description: str, key: str | None = None):
        self.id: Any = create_progress_artifact(progress=0.0, description=description, key=key)
        self._value: float | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._settings = SettingsContext.get()  # the caller's API URL, without its flow run's client
        self._thread = threading.Thread(target=self._run, name="progress-artifact", daemon=True)
        if not ProgressArtifact._senders:
            atexit.register(ProgressArtifact.join_all)
        ProgressArtifact._senders = [a for a in ProgressArtifact._senders if a._thread.is_alive()] + [self]
        self._thread.start()

    @staticmethod
    def join_all() -> None:
        """Wait until the last values of the artifacts already left have gone out, at most ``EXIT_WAIT`` seconds
        in all (one still in use, by another flow of this process, is not waited for)."""
        deadline = time.monotonic() + ProgressArtifact.EXIT_WAIT
        for a in ProgressArtifact._senders:
            if a._closed:
                a._thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def update(self, percent: float) -> None:
        with self._cond:
            self._value = percent
            self._cond.notify()

    def __enter__(self) -> ProgressArtifact:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        # A client of its own, made once: the flow run's client is closed when the flow ends, perhaps before the
        # last value goes out; Prefect's ``update_progress_artifact`` makes a new client per call, whose TLS
        # context alone costs ~50 ms of CPU (measured: a quarter of prepare's command-line process on 66 MB).
        # Only the settings are carried over from the caller.
        s = self._settings
        with SettingsContext(profile=s.profile, settings=s.settings) if s else contextlib.nullcontext():
            try:
                client = get_client(sync_client=True)
            except Exception:  # progress is for show: never fails the job (its values just stay unsent)
                return
            with client:
                self._send(client)

    def _send(self, client: Any) -> None:
        last = -float("inf")
        while True:
            with self._cond:
                while self._value is None and not self._closed:
                    self._cond.wait()
                while not self._closed and (wait := last + self.MIN_INTERVAL - time.monotonic()) > 0:
                    self._cond.wait(wait)  # coalesce: later values replace this one meanwhile
                value, self._value = self._value, None
            if value is None:
                return
            with contextlib.suppress(Exception):  # progress is for show: never fails the job
                update_progress(client, self.id, value)
            last = time.monotonic()


def update_progress(client: Any, artifact_id: Any, progress: float) -> None:
    """What ``prefect.artifacts.update_progress_artifact`` sends (a PATCH of the artifact's data, then
    Prefect's ``prefect.artifact.updated`` event), through ``client``."""
    client.update_artifact(artifact_id=artifact_id, artifact=ArtifactUpdate(data=float(progress)))
