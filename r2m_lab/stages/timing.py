"""Wall-clock seconds per step of a stage: the ``timings_seconds`` every stage reports in metrics.json."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def stopwatch(timings: dict[str, float]) -> Callable[..., Any]:
    """``timed(key, fn, *args, **kwargs)``: call ``fn`` and record its wall-clock seconds under ``timings[key]``."""

    def timed(key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[key] = round(time.perf_counter() - start, 2)
        return value

    return timed
