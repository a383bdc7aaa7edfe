"""One module per file dpd writes: its names, its schema, a strict loader, a lenient check and its writer.

* ``run`` -- the layout of a run directory (names, checkpoints and which of them are kept);
* ``synthetic`` -- ``synthetic.safetensors`` and ``checkpoints/ckpt-NNNNNN.safetensors``;
* ``metrics`` -- ``metrics.jsonl``;
* ``prune_counts`` -- ``prune_frequency.safetensors``;
* ``replay_buffer`` -- MTT / FTD / DATM ``replay_buffer_<n>.pt`` files, read by ``dpd experts import``;
* ``export`` -- the folders ``dpd export`` writes (MTT / DATM ``.pt`` files, PNGs, ``synthetic.npz``).

docs/formats.md describes every format for readers without dpd. Commands load files through these
modules only; ``dpd inspect`` uses their ``check`` functions, which list problems instead of raising.
"""
