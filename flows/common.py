"""What every flow shares: flows derived from job configs, artifacts. Task runners: ``flows/runners.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prefect import Flow, flow
from prefect.artifacts import create_markdown_artifact

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
            if not isinstance(output, str) or not output:
                return body(cfg)
            with lock.hold(output, name):  # one run per output folder (tasks/core/lock.py)
                return body(cfg)

        fn.__signature__ = sig  # type: ignore[attr-defined]
        fn.__name__, fn.__qualname__, fn.__module__ = body.__name__, body.__qualname__, body.__module__
        fn.__doc__ = f"{(body.__doc__ or '').strip()}\n\n{docstring_args(cls, skip=hidden)}"
        return flow(name=name, **flow_kwargs)(fn)

    return decorate




def publish(markdown: str, key: str | None = None, description: str | None = None) -> None:
    """A markdown artifact in the Prefect UI (keys: lowercase letters, digits and dashes)."""
    create_markdown_artifact(markdown=markdown, key=key, description=description)
