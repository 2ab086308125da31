"""Processes and devices: how a training run is started and which process does what.

* :func:`setup_distributed`: torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; NCCL on GPUs, gloo on
  CPU; without them, one process.
* :func:`resolve_launcher` / :func:`launch_command`: what the Prefect task runs -- the loop in its own
  process (CPU default), or ``torchrun --standalone --nproc-per-node N -m distilflow.tasks.train run
  CONFIG_JSON`` (CUDA default: one process per visible GPU).
* :func:`main`: that module entry. Run directly (one process on CPU or one GPU)::

      python -m distilflow.tasks.train pretrain --data DIR --output OUT --config mini
      python -m distilflow.tasks.train distill  --data DIR --teacher OUT_TEACHER --output OUT_STUDENT

  or on N GPUs of one host (DDP, NCCL; on CPU the gloo backend is used)::

      torchrun --standalone --nproc-per-node N -m distilflow.tasks.train distill --data DIR ...

  ``--batch-size`` is per process; the global batch is ``batch_size * grad_accum * N`` sequences.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distilflow.tasks.core import procs
from distilflow.tasks.core.errors import ConfigError
from distilflow.tasks.core.hf import require_native_bf16
from distilflow.tasks.train.config import DISTILL, PRETRAIN, TrainConfig

MODULE = "distilflow.tasks.train"  # python -m MODULE: the entry torchrun starts
# Dense bf16 peak FLOP/s by GPU name (for MFU); --peak-tflops overrides.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(threads: int = 0) -> Dist:
    """This process's rank and device (and ``threads`` torch CPU threads if > 0)."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank, world, local_rank, device)


def autocast_for(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA (``precision`` auto/bf16); on the CPU only when asked (``bf16``) and only where
    the CPU computes bf16 natively (AVX512-BF16/AMX: 1.7x faster steps than float32 at the replication sizes; emulated
    bf16 is slower than float32); nothing (fp32) otherwise, so ``auto`` on a CPU stays bit-identical."""
    cuda = device.type == "cuda"
    if cuda and cfg.precision in ("auto", "bf16"):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    if cfg.precision == "bf16":
        require_native_bf16("TrainConfig.precision", "use auto or fp32 on this machine")
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of this device for MFU (None on CPU unless --peak-tflops is given)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def resolve_launcher(launcher: str, nproc_per_node: int) -> tuple[str, int]:
    """``auto``: torchrun on a CUDA host (one process per visible GPU), in-process on CPU."""
    cuda = torch.cuda.is_available()
    nproc = nproc_per_node or (torch.cuda.device_count() if cuda else 1)
    if launcher == "auto":
        launcher = "torchrun" if cuda else "inprocess"
    if launcher == "inprocess" and nproc != 1:
        raise ConfigError(f"TrainConfig.launcher: inprocess runs one process; use --launcher torchrun for {nproc}")
    return launcher, nproc


def write_launch_config(cfg: TrainConfig) -> str:
    """The config file the launched processes read: ``OUT/launch_config.json``, or for a bucket OUT a file
    beside its local working folder (the processes push OUT themselves)."""
    from distilflow.tasks.core import remote
    from distilflow.tasks.core.io import write_json

    if remote.is_remote(cfg.output):
        work = remote.work_dir_for(cfg.output)
        path = str(work.with_name(work.name + "-launch_config.json"))
    else:
        os.makedirs(cfg.output, exist_ok=True)
        path = os.path.join(cfg.output, "launch_config.json")
    write_json(path, cfg.to_dict())
    return path


def launch_command(config_json: str, nproc_per_node: int, torchrun: bool = True) -> list[str]:
    """``torchrun --standalone --nproc-per-node N -m distilflow.tasks.train run CONFIG_JSON`` (or plain
    ``python -m ...`` for one process)."""
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    module = ["-m", MODULE, "run", config_json]
    if not torchrun:
        return [sys.executable, *module]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc_per_node), *module]


def main(argv: list[str] | None = None) -> int:
    """``python -m distilflow.tasks.train pretrain|distill [options] | run CONFIG_JSON``."""
    from distilflow.tasks.core.terminal import configure, verbose
    from distilflow.tasks.train.loop import train

    configure(verbose())  # no library bars / load reports here either (torchrun children inherit the CLI's)
    procs.exit_with_watched()  # launched by a flow: exit when its process is gone (even SIGKILLed)
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode, spec in (("pretrain", PRETRAIN), ("distill", DISTILL)):
        p = sub.add_parser(mode, description=spec.description)
        spec.add_to(p)
        p.set_defaults(spec=spec)
    rerun = sub.add_parser("run", help="run a saved TrainConfig json (what the Prefect task launches)")
    rerun.add_argument("config_json")
    args = parser.parse_args(argv)
    if args.mode == "run":
        with open(args.config_json) as f:
            cfg = TrainConfig.from_dict(json.load(f))
    else:
        cfg = args.spec.config_from(args)
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
