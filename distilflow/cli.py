"""``distilflow`` command line: one sub-command per job, each runs a Prefect flow.

Each flow module in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
sub-command(s) and sets ``func`` (called with the parsed args; returns a process exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = [
    "distilflow.flows.pipeline",
    "distilflow.flows.prepare",
    "distilflow.flows.ops",
    "distilflow.flows.inference",
    "distilflow.flows.evaluate",
    "distilflow.flows.train",
]
# sub-command -> the module that registers it (kept in step with COMMAND_MODULES by tests/test_cli.py)
COMMANDS = {
    "pipeline": "distilflow.flows.pipeline",
    **dict.fromkeys(["prepare", "shard", "pairs", "mask"], "distilflow.flows.prepare"),
    **dict.fromkeys(["server", "doctor"], "distilflow.flows.ops"),
    **dict.fromkeys(["fill-mask", "qa", "embed", "watch"], "distilflow.flows.inference"),
    "evaluate": "distilflow.flows.evaluate",
    **dict.fromkeys(["pretrain", "distill"], "distilflow.flows.train"),
}


def _quiet_prefect_defaults() -> None:
    # Offline machines: Prefect's telemetry would log connection errors at every start.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # One tokenizer thread per worker process: parallelism comes from --workers, not from rayon.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Worker processes inherit this: fewer glibc malloc arenas = less fragmentation in threaded workers.
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")


def _module_for(argv: list[str]) -> str | None:
    """The one module that defines the sub-command in ``argv`` (None: top-level help or unknown).

    Only that module is imported, so ``distilflow prepare`` does not load torch for the training and
    inference commands (~270 MB per process)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return COMMANDS.get(first) if first else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distilflow",
        description="Corpus -> BERT pretraining data -> teacher -> distilled student -> evaluation / batch "
        "inference, as Prefect flows. Run `distilflow COMMAND --help` for each job.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    only = _module_for(argv) if argv is not None else None
    for name in [only] if only else COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _version() -> str:
    from distilflow import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    _quiet_prefect_defaults()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished shards are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
