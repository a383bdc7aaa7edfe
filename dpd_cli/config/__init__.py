"""The settings schema of every command and its sources (flags, environment, config file, defaults)."""
