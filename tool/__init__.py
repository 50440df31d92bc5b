"""Shared tools: losses, CAM aggregation, metrics, CRF, palettes, I/O and device helpers."""
