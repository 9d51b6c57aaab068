"""Waiting for a condition in tests: poll it until it holds or a deadline
passes, so a test waits only as long as the event takes (no fixed sleeps)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(cond: Callable[[], T], what: str, timeout: float = 20.0, every: float = 0.02) -> T:
    """`cond()`'s first true value; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
