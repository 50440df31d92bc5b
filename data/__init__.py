"""Dataset readers, list/label I/O, class sets, CAM files and image transforms (knows no model)."""
