"""The published threshold-free argmax, for maps that hold only the present classes.

The published inference takes the argmax over all C channels, where an absent class's
map is all zero before normalisation and therefore -1 after it (``tool.cam.normalize_maps``:
``(0 - 0 - 1e-5) / (0 - 0 + 1e-5)``). Our maps keep only the present classes; the absent
ones are represented by the lowest absent class id with the score -1, the only one of them
an argmax with ties going to the lower id can pick.

Written once for numpy arrays and torch tensors alike: ``tool.cam`` (torch, inference) and
``scoring.metrics`` (numpy, evaluation of CAM files, which must not need torch) both use it.
"""
from __future__ import annotations

from typing import Any, Iterable

ABSENT_SCORE = -1.0


def lowest_absent(keys: Iterable[int], num_classes: int) -> int | None:
    """The smallest class id in 0..num_classes-1 missing from ``keys``, or None when all are present."""
    present = {int(k) for k in keys}
    if present and max(present) >= num_classes:
        raise ValueError(f"class id {max(present)} outside the {num_classes} classes")
    return next((c for c in range(num_classes) if c not in present), None)


def with_absent_classes(label: Any, score: Any, keys: Any, num_classes: int) -> Any:
    """Labels of the argmax over all C channels, from the argmax over the present ones.

    Args:
        label: (...) class ids of the best present channel (ties already sent to the lower id).
        score: (...) its normalised score.
        keys: the present class ids.
        num_classes: C.
    Returns:
        ``label`` (modified in place) where the lowest absent class took the pixels whose
        best present score is below -1, or equal to -1 with a higher class id.
    """
    absent = lowest_absent(keys, num_classes)
    if absent is not None:
        label[(score < ABSENT_SCORE) | ((score == ABSENT_SCORE) & (label > absent))] = absent
    return label
