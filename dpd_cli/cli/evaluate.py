def evaluate() -> None:
    """Evaluate (being written)."""
