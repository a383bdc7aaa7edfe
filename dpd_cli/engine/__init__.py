"""The engine: experts, distillation, evaluation. No Typer or Rich in here."""
