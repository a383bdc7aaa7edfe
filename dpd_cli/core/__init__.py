"""The algorithm: matching, pruning, DSA, the training loop, CUDA graphs, data parallelism. No file I/O."""
