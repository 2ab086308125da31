"""``distilflow`` command line: one sub-command per job, and the one error boundary of all of them.

Every command's options come from its job config (``CommandSpec`` in a light ``config`` module: no
torch, no Prefect), so ``distilflow --help`` imports nothing and ``distilflow COMMAND --help`` imports one
config module. The job itself (Prefect flows, torch) is imported only when the command runs.

Errors: a :class:`~distilflow.tasks.core.errors.UserError` (bad option, missing file, refused resume ...)
prints one line ``distilflow COMMAND: error: ...`` and exits 2; anything else is a bug and shows its
traceback (exit 1). Ctrl-C exits 130 (SIGTERM: 143) within seconds, stops every process the command
started, and keeps finished work.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import os
import sys
import threading
from typing import Any, NamedTuple, NoReturn


class Command(NamedTuple):
    help: str
    spec: str  # "module:ATTR" of its CommandSpec


# In the order --help lists them. The help line is repeated here so that top-level --help imports nothing.
COMMANDS: dict[str, Command] = {
    "pipeline": Command("the main job end to end: corpus -> tokenizer -> teacher -> student -> evaluation -> "
                        "fill-mask -> report", "distilflow.tasks.pipeline.config:PIPELINE"),
    "prepare": Command("corpus files -> sentence shards -> NSP pairs -> MLM masks (shard + pairs + mask)",
                       "distilflow.tasks.prepare.config:PREPARE"),
    "shard": Command("stage 1 of prepare: input files -> sentence-split documents (DIR/corpus)",
                     "distilflow.tasks.prepare.config:SHARD"),
    "pairs": Command("stage 2 of prepare: DIR/corpus -> NSP pairs or single segments (DIR/pairs)",
                     "distilflow.tasks.prepare.config:PAIRS"),
    "mask": Command("stage 3 of prepare: DIR/pairs -> static MLM masks (DIR/masked)",
                    "distilflow.tasks.prepare.config:MASK"),
    "pretrain": Command("pretrain a BERT teacher (MLM + NSP) on a prepared folder",
                        "distilflow.tasks.train.config:PRETRAIN"),
    "distill": Command("distil a DistilBERT student from a BERT teacher", "distilflow.tasks.train.config:DISTILL"),
    "evaluate": Command("held-out MLM, GLUE, SQuAD and the bias probe, beside the reference numbers",
                        "distilflow.tasks.evaluate.config:EVALUATE"),
    "fill-mask": Command("batch fill-mask predictions over stored datasets", "distilflow.tasks.infer.config:FILL_MASK"),
    "qa": Command("batch extractive question answering", "distilflow.tasks.infer.config:QA"),
    "embed": Command("batch text embeddings (mean-pooled or [CLS])", "distilflow.tasks.infer.config:EMBED"),
    "watch": Command("emit a Prefect event for each completely written file in DIR",
                     "distilflow.tasks.infer.config:WATCH"),
    "serve": Command("fill-mask / QA / embeddings over HTTP (POST /score, the hosted catalogue's request shapes)",
                     "distilflow.tasks.infer.config:SERVE"),
    "server": Command("start a local Prefect server + process workers for the cpu/gpu pools in one command",
                      "distilflow.tasks.ops.config:SERVER"),
    "doctor": Command("check this machine as a worker: storage read/write, torch, CUDA",
                      "distilflow.tasks.ops.config:DOCTOR"),
}


# Commands that run no Prefect flow in this process: no temporary API server for them.
NO_FLOW_RUN = {"watch", "serve", "server"}


def _quiet_defaults() -> None:
    # Offline machines: Prefect's telemetry would log connection errors at every start.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # One tokenizer thread per worker process: parallelism comes from --workers, not from rayon.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Worker processes inherit this: fewer glibc malloc arenas = less fragmentation in threaded workers.
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _command_of(argv: list[str]) -> str | None:
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv`` only the command named there gets its options (one config import)."""
    parser = argparse.ArgumentParser(
        prog="distilflow",
        description="Corpus -> BERT pretraining data -> teacher -> distilled student -> evaluation / batch "
        "inference, as Prefect flows. Run `distilflow COMMAND --help` for each job's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    only = _command_of(argv) if argv is not None else None
    for name, cmd in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=cmd.help)
            continue
        if argv is not None and only is None:  # top-level help / no command: list them, import nothing
            sub.add_parser(name, help=cmd.help)
            continue
        spec = _load(cmd.spec)
        p = sub.add_parser(name, help=cmd.help, description=spec.description or cmd.help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        spec.add_to(p)
        p.add_argument("--verbose", action="store_true",
                       help="show library logs and progress bars (transformers load reports, Prefect debug lines)")
        p.set_defaults(spec=spec)
    return parser


def _version() -> str:
    from distilflow import __version__

    return __version__


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    _quiet_defaults()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    from distilflow.tasks.core.errors import UserError
    from distilflow.tasks.core.terminal import configure

    configure(verbose=args.verbose)
    from distilflow.tasks.core.procs import SignalGuard
    from distilflow.tasks.ops.prefect_api import run_settings, start_temporary_server, wait_ready

    _SAID.clear()
    # SIGTERM/SIGINT stop every process this command started within seconds (tasks/core/procs.py)
    with SignalGuard(on_deadline=lambda signum: _interrupted(args.command)) as guard:
        try:
            if "spec" not in vars(args):  # TRANSITION: legacy command
                if args.command not in NO_FLOW_RUN:
                    start_temporary_server()
                    wait_ready()
                with run_settings():
                    return int(args.func(args) or 0)
            cfg = args.spec.config_from(args)
            if args.command not in NO_FLOW_RUN:  # without PREFECT_API_URL: the temporary server boots while the
                start_temporary_server()         # job imports Prefect and torch (tasks/ops/prefect_api.py)
            if isinstance(getattr(cfg, "output", None), str):  # a file in the way, a read-only folder: now
                from distilflow.tasks.core.lock import check_output

                check_output(cfg.output)
            run = args.spec.runner()
            getattr(run, "preload", lambda cfg: None)(cfg)  # e.g. the model, also while the server boots
            wait_ready()
            with run_settings():
                return int(run(cfg) or 0)
        except UserError as e:
            print(f"distilflow {args.command}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except BaseException as e:  # Ctrl-C, SIGTERM (ours, or Prefect's TerminationSignal)
            signum = _stop_signal(e)
            if signum is None:
                raise
            guard.stop_all()
            _interrupted(args.command)
            return 128 + signum


def _stop_signal(e: BaseException) -> int | None:
    """The signal that stopped the command (2 = SIGINT, 15 = SIGTERM), None for any other exception."""
    if isinstance(e, KeyboardInterrupt):
        return 2
    signum = getattr(e, "signum", None) or getattr(e, "signal", None)
    if type(e).__name__ in ("Interrupted", "TerminationSignal") and isinstance(signum, int):
        return signum
    return None


_SAID: set[str] = set()


def _interrupted(command: str) -> None:
    if command in _SAID:  # once: by the command, or by the signal guard's deadline if the exit hangs
        return
    _SAID.add(command)
    print(f"distilflow {command}: interrupted; finished work is kept, rerun the same command to resume",
          file=sys.stderr, flush=True)


def console() -> NoReturn:
    """The ``distilflow`` console script: :func:`main`, then the interpreter's exit less its final teardown.

    Measured on a fill-mask run of a DistilBERT-size model: after the last ``atexit`` handler, CPython spent
    ~1.3-1.5 s tearing down modules and objects (torch, Prefect's threads) before the process ended -- time
    every command paid after its result line. What exit must do still happens, in CPython's own order:
    non-daemon threads joined and Prefect's log and event workers drained (``threading._shutdown``), then
    the ``atexit`` handlers (the temporary server stopped, logging flushed), then the standard streams.
    Tests and other callers use :func:`main`, which returns the exit code."""
    rc = main()
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None:  # not CPython's threading module: the ordinary exit
        sys.exit(rc)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(rc)


if __name__ == "__main__":
    console()
