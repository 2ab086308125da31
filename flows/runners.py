"""How a flow's tasks run: local processes, the data stages' worker pool, Dask; progress while they do."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from prefect import flow
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from tqdm import tqdm

from distilflow.flows.common import ProgressArtifact
from distilflow.tasks.core import procs

T = TypeVar("T")


def make_task_runner(workers: int = 1, dask_address: str | None = None, dask_workers: int = 0) -> TaskRunner:
    """Pick how shard tasks run: one process per worker locally, or on a Dask cluster.

    * ``dask_address="tcp://host:8786"``: an existing Dask scheduler (prefect-dask).
    * ``dask_workers=N``: start a local Dask cluster of N single-threaded worker processes.
    * otherwise ``workers`` > 1: a local process pool (Python work is GIL-bound, threads would not scale);
      ``workers`` == 1: tasks run one at a time in this process.
    """
    if dask_address or dask_workers:
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if workers > 1:  # its processes exit when this one dies, even by SIGKILL (tasks/core/procs.py)
        return ProcessPoolTaskRunner(max_workers=workers, initializer=procs.worker_init, initargs=(os.getpid(),))
    return ThreadPoolTaskRunner(max_workers=1)


# The data stages' local worker pool (see worker_processes); None = run work in the calling thread.
_WORKERS: ProcessPoolExecutor | None = None


@contextmanager
def worker_processes(workers: int) -> Iterator[None]:
    """Plain worker processes for the data stages' CPU work while the block runs.

    The Prefect tasks themselves stay on the default thread runner -- one task per unit, states and logs
    in the UI -- and hand their pure-Python work to :func:`offload`. The workers import only
    ``distilflow.tasks`` (no Prefect), so they start in about a second where ``ProcessPoolTaskRunner``'s
    took ~11 s on 2 cores, and they send nothing to the API server. Also for ``workers=1``: in the flow
    process the work would share the GIL with Prefect's own threads (engine, logging, API client) --
    measured 0.98 vs 1.25-1.47 MB/s on the 128 MB benchmark. ``spawn``: the flow process has threads.
    """
    global _WORKERS
    if workers < 1:  # work in the calling thread
        yield
        return
    # each worker exits when this process dies, even by SIGKILL (tasks/core/procs.py)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=procs.worker_init,
                             initargs=(os.getpid(),)) as pool:
        _WORKERS = pool
        try:
            yield
        except BaseException:  # interrupted or failed: stop the workers now, not after their current units
            for p in list(getattr(pool, "_processes", {}).values()):
                p.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            _WORKERS = None


def offload(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker process of :func:`worker_processes` when one is running, else here.
    ``fn`` must be importable (a function of ``distilflow.tasks``) and its arguments picklable."""
    pool = _WORKERS
    if pool is None:
        return fn(*args)
    return pool.submit(fn, *args).result()


def run_in_subflow(fn: Any, name: str, runner: Any, **kwargs: Any) -> Any:
    """Run ``fn`` as a sub-flow whose tasks use ``runner``. A flow's task runner is fixed when the flow
    object is created, so a flow whose *parameters* choose workers / a Dask cluster (deployments) runs
    its body through this."""
    return flow(name=name, log_prints=True)(fn).with_options(task_runner=runner)(**kwargs)


def wait_with_progress(futures: list[PrefectFuture], title: str, key: str | None = None,
                       sizes: list[float] | None = None, unit: str = "shard") -> list[Any]:
    """Wait for all futures with a terminal progress bar and a Prefect progress artifact.

    Results come back in submission order; the first failure is raised after all have settled, so
    finished shards are kept (and their markers written) even when one shard fails. ``sizes`` (one per
    future, in ``unit``: MB, tokens ...) make the bar count work instead of futures, so it shows MB/s or
    tokens/s.
    """
    total = len(futures)
    done = 0
    show = os.environ.get("DISTILFLOW_PROGRESS", "1") != "0"
    size_of = {id(f): s for f, s in zip(futures, sizes, strict=True)} if sizes is not None else {}
    bar_total = sum(size_of.values()) if sizes is not None else total
    with (ProgressArtifact(title, key) if total else contextlib.nullcontext()) as progress, \
            tqdm(total=bar_total, desc=title, unit=unit, unit_scale=sizes is not None,
                 disable=not show or total == 0) as bar:
        for fut in as_completed(futures):
            done += 1
            bar.update(size_of.get(id(fut), 1))
            if progress is not None:
                progress.update(100.0 * done / total)
    for f in futures:
        f.wait()  # done: this takes its final state from the future itself, not from the API
    errors = [f for f in futures if f.state.is_failed() or f.state.is_crashed()]
    if errors:
        # .result() re-raises the task's own exception with its message
        errors[0].result()
    return [f.result() for f in futures]
