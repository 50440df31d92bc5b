"""Conformer backbone with the TransCAM and BAO heads, and checkpoint I/O (knows no dataset)."""
