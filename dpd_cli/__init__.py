"""dpd: dataset distillation by trajectory matching with Difference-Driven Pruning."""

__version__ = "0.2.0"
__all__ = ["__version__"]
