"""Cooperative stop requests (Ctrl-C), polled by the engine at safe points.

Inside the engine's work loops (``with safe_points():``) the CLI's first Ctrl-C calls ``request()``;
the engine notices at its next safe point, saves what is finished and raises ``Interrupted``.
Outside them there is nothing to save, so the first Ctrl-C quits at once, as a second always does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_flag = threading.Event()
_depth = 0  # nesting of safe_points() (the main thread only: signal handlers run there)


class Interrupted(KeyboardInterrupt):
    """Work stopped at a safe point after a stop request; ``resume_hint`` says how to continue."""

    def __init__(self, resume_hint: str):
        super().__init__(resume_hint)
        self.resume_hint = resume_hint


request, requested, clear = _flag.set, _flag.is_set, _flag.clear


def check(resume_hint: str) -> None:
    """Raise ``Interrupted(resume_hint)`` if a stop was requested; a no-op otherwise (no device sync)."""
    if _flag.is_set():
        raise Interrupted(resume_hint)


@contextlib.contextmanager
def safe_points() -> Iterator[None]:
    """Mark a loop that polls ``requested()``: a first Ctrl-C inside it waits for the next safe point."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def in_safe_points() -> bool:
    return _depth > 0
