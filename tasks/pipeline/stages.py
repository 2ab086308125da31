"""Stage bookkeeping of ``distilflow pipeline``: run a stage unless it already finished with the same config.

Each stage records ``OUT/_pipeline/<stage>.json`` (config, fingerprint, seconds, result) when it ends. A
rerun with the same config skips it; a changed config -- or a changed stage upstream of it -- runs it
again on cleared folders. A stage killed half way has no record: its folders are kept and the stage's
own resume logic continues from them (training from its last checkpoint). No Prefect here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from typing import Any

from distilflow.tasks.core.io import exists, is_local, join, read_json, remove, write_json


def fingerprint(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def run_stage(output: str, name: str, cfg: dict[str, Any], fn: Callable[..., Any], /, *args: Any,
              after: tuple[dict[str, Any], ...] = (), outputs: tuple[str, ...] = (),
              log: Callable[[str], Any] = print, **kwargs: Any) -> dict[str, Any]:
    """Run ``fn(*args, **kwargs)`` unless ``OUT/_pipeline/<name>.json`` records a finished run with the same config.

    ``after``: the results of the stages this one reads; their fingerprints are part of this stage's, so a
    stage that ran again (new data, new teacher) makes everything downstream run again too.
    ``outputs``: this stage's folders, deleted before it runs again with a changed config (they hold the
    old config's results, which the stage's own resume logic would refuse to mix with new ones).
    The first four parameters are positional-only, so ``fn`` may take ``output=``/``name=`` keywords.
    Returns the stage's result plus ``skipped``, ``seconds`` and ``fingerprint``.
    """
    marker = join(output, "_pipeline", f"{name}.json")
    fp = fingerprint({**cfg, "after": [a["fingerprint"] for a in after]})
    if exists(marker):
        rec = read_json(marker)
        if rec.get("fingerprint") == fp:
            log(f"stage {name}: already done with the same config, skipped")
            return {**rec["result"], "skipped": True, "seconds": rec.get("seconds", 0.0), "fingerprint": fp}
        log(f"stage {name}: config or input changed, running again (removing {', '.join(outputs)})")
        for folder in outputs:
            if is_local(folder):
                shutil.rmtree(folder, ignore_errors=True)
            else:  # a bucket prefix
                remove(folder)
        remove(marker)
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - t0
    write_json(marker, {"stage": name, "fingerprint": fp, "config": cfg, "seconds": round(seconds, 2),
                        "result": jsonable(result)})
    return {**jsonable(result), "skipped": False, "seconds": round(seconds, 2), "fingerprint": fp}
