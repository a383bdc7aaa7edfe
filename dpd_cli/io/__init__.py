"""Files on disk: atomic writes, the safetensors reader and writer, locks, PNGs, default folders, provenance."""
