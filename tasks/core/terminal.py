"""What a person sees in the terminal: our progress and result lines, not the libraries' chatter.

Without ``--verbose``:

* transformers' ``LOAD REPORT`` tables, advisory warnings and its "Loading weights" / "Writing model
  shards" bars are off (also in worker and torchrun processes: set through the environment);
* a failed run caused by a :class:`~distilflow.tasks.core.errors.UserError` is reported once, by the
  command line's error boundary: Prefect's console copies of that exception (its traceback, the
  "Finished in state Failed" line) are dropped from the terminal. They still reach the Prefect API, so
  the UI shows the failure with its message.

``--verbose`` leaves every library at its own defaults.
"""

from __future__ import annotations

import logging
import os
import re

_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
VERBOSE_ENV = "DISTILFLOW_VERBOSE"
USER_ERRORS = re.compile(r"\b(UserError|ConfigError|InputError|ResumeError|DataError)\b")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def configure(verbose: bool = False) -> None:
    """Call once at the start of a command (before transformers is imported where possible)."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if verbose:
        return
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    quiet_transformers()


def quiet_transformers() -> None:
    """Lower transformers' logging if it is already imported (the environment covers later imports)."""
    import sys

    if verbose() or "transformers" not in sys.modules:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class _DropUserErrors(logging.Filter):
    """Console filter: a UserError's traceback and its 'Finished in state Failed' line are shown once, as
    the CLI's one-line error, not by Prefect's console handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        from distilflow.tasks.core.errors import UserError

        if record.exc_info and isinstance(record.exc_info[1], UserError):
            return False
        # the run's final state line names the exception class: 'Finished in state Failed(... ConfigError: ...)'
        return not USER_ERRORS.search(str(record.msg))


def install_prefect_console_filter() -> None:
    """Attach the filter to Prefect's console handlers (call after ``import prefect``)."""
    if verbose():
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    seen: set[int] = set()
    for logger in [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]:
        for h in getattr(logger, "handlers", []):
            if isinstance(h, PrefectConsoleHandler) and id(h) not in seen:
                seen.add(id(h))
                if not any(isinstance(f, _DropUserErrors) for f in h.filters):
                    h.addFilter(_DropUserErrors())
