"""A run's settings inherited by the scripts that read its weights: the model flags left out on the
command line (None) are those of the training run that wrote ``--weights`` (its ``args.json``),
else their defaults. A policy on the flags of :func:`apps.cli.add_model_args`,
:func:`apps.cli.add_segmentation_model_args` and ``--label_file`` (``from_run=True``).
"""
from __future__ import annotations

import argparse

from apps.cli import DEFAULT_ARCH, DEFAULT_BACKBONE, DEFAULT_SEG_MODEL


def settings_from_run(args: argparse.Namespace, defaults: dict[str, object]) -> str | None:
    """Fill the model flags the command line left out (None) from the ``args.json`` of the
    training run that wrote ``--weights``, else with ``defaults`` (flag name -> its default).

    A flag given on the command line wins. Returns the line to print naming what was taken from
    where, or None when nothing was.
    """
    from engine.trainrun import read_run_args

    found = read_run_args(args.weights)
    taken = []
    for key, default in defaults.items():
        if getattr(args, key) is not None:
            continue
        value = found[1].get(key) if found else None
        setattr(args, key, default if value is None else value)
        if value is not None:
            taken.append(f"--{key} {value}")
    return f"model settings from {found[0]} (the run that wrote --weights): {', '.join(taken)}" if taken else None


def prediction_settings_from_run(args: argparse.Namespace) -> str | None:
    """:func:`settings_from_run` for the flags of :func:`apps.cli.add_prediction_args` that define the model
    (``--network``, ``--arch``, ``--refine``, ``--label_file``)."""
    from network.conformer import REFINE_MODES
    from network.factory import DEFAULT_NETWORK

    return settings_from_run(args, {"network": DEFAULT_NETWORK, "arch": DEFAULT_ARCH, "refine": REFINE_MODES[0],
                                    "label_file": None})


def segmentation_settings_from_run(args: argparse.Namespace) -> str | None:
    """:func:`settings_from_run` for ``--model``, ``--backbone`` and ``--label_file`` of infer_seg.py."""
    return settings_from_run(args, {"model": DEFAULT_SEG_MODEL, "backbone": DEFAULT_BACKBONE, "label_file": None})
