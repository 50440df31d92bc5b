"""Base layer: errors, atomic file output, label PNG I/O, run locks, the worker pool, and devices (CUDA or CPU, mixed precision, torchrun's process group); imports nothing else of this repository."""
