"""``Steps``: the demos' step runner (demo, demo-mri): a header per step, its duration kept for the summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Steps:
    """Prints a header per step and keeps their durations for the closing summary."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[tuple[str, float]] = []

    def run(self, title: str, fn: Callable[..., Any], *args: Any) -> None:
        print(f"\n== {title} ==", flush=True)
        t = time.perf_counter()
        fn(*args)
        self.times.append((title, time.perf_counter() - t))

    def total(self) -> float:
        return time.perf_counter() - self.start
