"""Read-only views of what dpd wrote: ``inspect``, ``ls`` and ``compare``."""
