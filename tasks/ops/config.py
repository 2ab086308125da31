"""Options of the operations commands (``distilflow server``, ``distilflow doctor``): one declaration each."""

from __future__ import annotations

from dataclasses import dataclass

from distilflow.tasks.core.config import CommandSpec, Config, option


@dataclass(frozen=True, kw_only=True)
class DoctorConfig(Config):
    storage: tuple[str, ...] = option((), "URLs to probe (write, read back, delete a 64-byte object); "
                                      "credentials come from the environment", nargs="*", metavar="URL")
    require_gpu: bool = option(False, "fail when no CUDA device is visible")


DOCTOR = CommandSpec(
    DoctorConfig, run="distilflow.flows.ops:run_doctor",
    description="Run the doctor flow: writes, reads back and deletes a small probe object under each --storage "
    "URL (local folder, s3://...), and reports versions and GPUs as a Prefect artifact.")
