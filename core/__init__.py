"""Base layer: errors, atomic file output, label PNG I/O; imports nothing else of this repository."""
