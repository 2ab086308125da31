"""The errors a user can fix, and the one rule for showing them.

Every job raises a :class:`UserError` subclass for a problem in its input, options or output folder; the
command line's one error boundary (``distilflow/cli.py``) prints ``distilflow COMMAND: error: MESSAGE`` --
one line naming the field or file and the fix -- and exits 2, with no traceback. Anything else is a bug:
traceback, exit 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the field/file and what to do."""


class ConfigError(UserError, ValueError):
    """A config field has a bad value. The message names ``Class.field`` and what is allowed."""


class InputError(UserError, ValueError):
    """An input (file, folder, URL, model, tokenizer) is missing or unusable."""


class ResumeError(UserError, RuntimeError):
    """The output folder holds results made with a different config (or is in use)."""


class DataError(UserError, ValueError):
    """A prepared folder cannot be used for training / evaluation."""
