"""Dataset readers, list/label I/O and image transforms (knows no model)."""
