"""dpd: dataset distillation by trajectory matching with Difference-Driven Pruning."""

__version__ = "0.1.0"
__all__ = ["__version__"]
