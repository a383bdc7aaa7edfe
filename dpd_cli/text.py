"""Words of the messages every layer writes."""

from __future__ import annotations

__all__ = ["plural"]


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``1 expert``, ``2 experts``, ``0 experts``: ``nouns`` when the plural is not ``noun + "s"``."""
    return f"{n:,} {noun if n == 1 else nouns or noun + 's'}"
