"""One recipe per command that trains: ``experts``, ``distill``, ``evaluate``, ``export`` and
``experts import``. Each sets up from settings, runs its loop and writes through ``artifacts``."""
