"""Protocol files: what a protocol is (:class:`Protocol`) and the one schema that checks a file.

A protocol file is JSON (``protocol/presets/<name>.json``, or a user's file given with the
runner's ``--protocol``). :func:`load_protocol` checks every key and value the way a parser
checks flags, and reports every problem of the file on one line (a :class:`core.errors.UserError`,
exit 2 through the command line) before anything is created:

- the keys: ``about`` (text), ``lists`` (required), ``published``, ``settings``, ``extras``,
  ``fixed_t``; any other key is refused;
- ``lists``: an object of :data:`LIST_KEYS` -> a path (text); ``train`` and ``score`` required,
  ``seg_train`` and ``seg_val`` both or neither;
- ``published``: null or a column of :data:`protocol.rows.PUBLISHED`;
- ``settings``: an object of settings keys (those the stage table names) -> a list of text (a
  command line's words);
- ``extras``: a list of the names of optional stages of the stage table;
- ``fixed_t``: a number (not text) between 0 and 1 on the grid the ``eval_score`` sweep scores
  (:data:`scoring.metrics.DEFAULT_SWEEP`): the fixed-threshold row reads the sweep at that value.

Which settings keys and optional stages exist is the stage table's (protocol/stages.py), which
passes them in.
"""
from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from data.layout import REPO_ROOT
from protocol.rows import PUBLISHED
from scoring.metrics import DEFAULT_SWEEP, threshold_range

# The fixed background score carried over without pixel labels: TransCAM's best on VOC.
FIXED_T = 0.44

PRESETS = Path(__file__).resolve().parent / "presets"

LIST_KEYS = ("train", "score", "seg_train", "seg_val", "seg_test", "seg_val_full")

KEYS = ("about", "lists", "published", "settings", "extras", "fixed_t")


@dataclass(frozen=True)
class Protocol:
    """Which list each stage of a protocol uses, the scripts' extra flags, and the published figures it is
    compared with.

    Attributes:
        lists: "train" (BAO / TransCAM training), "score" (pseudo-label and CAM quality, scored against the
            masks), "seg_train" and "seg_val" (the segmentation model's training images and score; both or
            neither: without them the run ends with the pseudo-labels), "seg_test" (images written for an
            evaluation server), "seg_val_full" (the val list of ``--coco_val full``). Paths may start with
            ``{repo}`` (this repository) or ``{root}`` (the dataset root); other relative paths are relative
            to ``base``.
        published: the column of :data:`protocol.rows.PUBLISHED` the table shows ("voc", "coco"; None: none).
        settings: settings key -> extra flags of the scripts of the stages that take that key (the stage
            table's ``settings``; the published protocols need none).
        extras: the optional stages of the stage table this protocol runs.
        fixed_t: the background threshold of the fixed-threshold row (carried over without pixel labels).
        base: the folder relative list paths start from (a protocol file's folder).
    """

    lists: dict[str, str]
    published: str | None = None
    settings: dict[str, list[str]] = field(default_factory=dict)
    extras: tuple[str, ...] = ()
    fixed_t: float = FIXED_T
    base: str = str(REPO_ROOT)


def _shown(value: object) -> str:
    """A value as the file spells it (text in quotes, so that "0.44" reads as text)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def sweep_grid() -> list[float]:
    """The background thresholds the runner's ``eval_score`` sweep scores (evaluation_bao.py's default range)."""
    return [round(float(t), 6) for t in threshold_range(*DEFAULT_SWEEP)]


def fixed_t_problem(value: object) -> str | None:
    """What is wrong with ``value`` as the fixed background threshold (None: nothing): it must be a number
    between 0 and 1 on :func:`sweep_grid`, the values the fixed-threshold row can be read at."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, not {_shown(value)}"
    if not 0 <= value <= 1:  # NaN included
        return f"{_shown(value)} is outside 0-1 (a background score)"
    grid = sweep_grid()
    if any(abs(t - value) < 1e-6 for t in grid):
        return None
    nearest = [t for t in (max((t for t in grid if t < value), default=None),
                           min((t for t in grid if t > value), default=None)) if t is not None]
    start, stop, step = DEFAULT_SWEEP
    return (f"{_shown(value)} is not on the sweep grid ({start} to {stop} by {step}, the thresholds eval_score "
            f"scores), nearest: {' or '.join(f'{t:g}' for t in nearest)}")


def _is_words(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(word, str) for word in value)


def _list_problems(lists: object) -> list[str]:
    if not isinstance(lists, dict):
        return [f"\"lists\" must be an object (list key -> list file), not {_shown(lists)}"]
    problems = [f"unknown list {k!r} (lists: {', '.join(LIST_KEYS)})" for k in lists if k not in LIST_KEYS]
    problems += [f"list {k!r} must be a path (text), not {_shown(v)}" for k, v in lists.items()
                 if k in LIST_KEYS and not isinstance(v, str)]
    problems += [f"no {k!r} list" for k in ("train", "score") if k not in lists]
    if ("seg_train" in lists) != ("seg_val" in lists):
        problems.append("\"seg_train\" and \"seg_val\" go together (both segmentation lists or neither)")
    return problems


def _settings_problems(settings: object, setting_keys: Collection[str]) -> list[str]:
    if not isinstance(settings, dict):
        return [f"\"settings\" must be an object (settings key -> list of flags), not {_shown(settings)}"]
    problems = [f"unknown settings key {k!r} (settings keys: {', '.join(setting_keys)})"
                for k in settings if k not in setting_keys]
    problems += [f"settings {k!r} must be a list of text (a command line's words), not {_shown(v)}"
                 for k, v in settings.items() if not _is_words(v)]
    return problems


def _extras_problems(extras: object, optional: Collection[str]) -> list[str]:
    if not _is_words(extras):
        return [f"\"extras\" must be a list of optional stage names, not {_shown(extras)}"]
    return [f"unknown optional stage {name!r} in \"extras\" (optional stages: {', '.join(optional)})"
            for name in extras if name not in optional]


def protocol_problems(d: object, optional: Collection[str], setting_keys: Collection[str]) -> list[str]:
    """Every problem of a protocol file's parsed JSON ``d``, one phrase each ([]: none).

    Args:
        optional: the names of the stage table's optional stages (what ``extras`` may name).
        setting_keys: the settings keys the stage table's stages take.
    """
    if not isinstance(d, dict):
        return [f"must be a JSON object with the keys {', '.join(KEYS)}, not {_shown(d)}"]
    problems = [f"unknown key {k!r} (keys: {', '.join(KEYS)})" for k in d if k not in KEYS]
    if "about" in d and not isinstance(d["about"], str):
        problems.append(f"\"about\" must be text, not {_shown(d['about'])}")
    problems += _list_problems(d["lists"]) if "lists" in d else ["no \"lists\" object (list key -> list file)"]
    if d.get("published") is not None and d["published"] not in PUBLISHED:
        problems.append(f"\"published\" must be null or one of {', '.join(PUBLISHED)}, not {_shown(d['published'])}")
    problems += _settings_problems(d.get("settings", {}), setting_keys)
    problems += _extras_problems(d.get("extras", []), optional)
    if "fixed_t" in d and (problem := fixed_t_problem(d["fixed_t"])):
        problems.append(f"\"fixed_t\" {problem}")
    return problems


def load_protocol(path: str | os.PathLike, optional: Collection[str], setting_keys: Collection[str]) -> Protocol:
    """The protocol of file ``path``, checked by :func:`protocol_problems` (one UserError naming every problem).

    Args:
        optional: the names of the stage table's optional stages.
        setting_keys: the settings keys of the stage table.
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"protocol file {path} cannot be read: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"protocol file {path} is not JSON: {err}") from None
    problems = protocol_problems(d, optional, setting_keys)
    if problems:
        raise UserError(f"protocol file {path}: {'; '.join(problems)}")
    return Protocol(lists=dict(d["lists"]), published=d.get("published"), settings=dict(d.get("settings", {})),
                    extras=tuple(d.get("extras", ())), fixed_t=float(d.get("fixed_t", FIXED_T)),
                    base=str(path.resolve().parent))
