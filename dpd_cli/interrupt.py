"""Cooperative stop requests (Ctrl-C), polled by the engine at safe points.

The CLI installs a SIGINT handler: the first Ctrl-C calls ``request()``; the engine notices
at its next safe point (end of a distillation iteration, a training batch), saves what is
finished and raises ``Interrupted``. A second Ctrl-C raises KeyboardInterrupt at once.
Library users who install nothing get Python's default behaviour.
"""

from __future__ import annotations

import threading

__all__ = ["Interrupted", "request", "requested", "clear"]

_flag = threading.Event()


class Interrupted(KeyboardInterrupt):
    """Work stopped at a safe point after a stop request; ``resume_hint`` says how to continue."""

    def __init__(self, resume_hint: str):
        super().__init__(resume_hint)
        self.resume_hint = resume_hint


def request() -> None:
    _flag.set()


def requested() -> bool:
    return _flag.is_set()


def clear() -> None:
    _flag.clear()
