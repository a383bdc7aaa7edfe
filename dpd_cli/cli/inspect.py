def inspect() -> None:
    """Inspect (being written)."""
