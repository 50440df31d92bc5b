"""Where the flags are defined (docs/architecture.md): a flag that several entry scripts share is
defined once, in apps/cli.py; a script's own flags are defined in its ``get_args_parser``.

Checked on the parsers themselves: every entry script's ``get_args_parser()`` is built with
``add_argument`` recording where it was called, and the definitions of same-named flags (help,
default, type, choices) are compared.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import ROOT

SCRIPTS = ("train_bao", "infer_bao", "evaluation_bao", "visual_bao", "train_seg", "infer_seg",
           "coco14.prepare_coco", "voc12.make_cls_labels")
SHARED = "apps/cli.py"
# Names of apps/cli.py flags that a script defines itself with a meaning of its own (what differs).
OWN_MEANING = {
    "--batch_size": "infer_seg.py: images of one size per forward of the segmentation model",
    "--num_workers": "infer_seg.py: loaders that also make every scale's input",
    "--scales": "infer_seg.py: rescaling factors of the image, not square input sides",
    "--weights": "infer_seg.py: segmentation weights of train_seg.py, not BAO/TransCAM weights",
    "--method": "train_bao.py: the stage to train (bao, transcam), not the maps to infer (bao, transcam, cnn)",
    "--coco_root": "coco14.prepare_coco: the root with annotations/, required; no --dataset to choose",
    "--dataset": "evaluation_bao.py: the class set of the masks (voc, coco), not a dataset layout to read",
    "--overwrite": "coco14.prepare_coco: rewrite the masks that exist, not recompute inference outputs",
    "--t": "evaluation_bao.py: one background score instead of a sweep, also for --out-dir/--out-crf",
}


@dataclass(frozen=True)
class Definition:
    script: str
    site: str  # "path:function" of the add_argument call
    signature: tuple[str, str, str, str]  # help, default, type, choices


def _definitions(monkeypatch) -> dict[str, list[Definition]]:
    """Flag name -> its definitions in the parsers of :data:`SCRIPTS`."""
    sites: dict[int, str] = {}
    add_argument = argparse._ActionsContainer.add_argument

    def recording(self, *args, **kwargs):
        action = add_argument(self, *args, **kwargs)
        caller = inspect.currentframe().f_back.f_code
        path = Path(caller.co_filename).resolve()  # argparse's own (--help) lies outside the repository
        sites[id(action)] = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{caller.co_name}"
        return action

    monkeypatch.setattr(argparse._ActionsContainer, "add_argument", recording)
    found: dict[str, list[Definition]] = {}
    for script in SCRIPTS:
        for action in importlib.import_module(script).get_args_parser()._actions:
            signature = (str(action.help), repr(action.default), getattr(action.type, "__qualname__",
                                                                          repr(action.type)), repr(action.choices))
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    found.setdefault(flag, []).append(Definition(script, sites[id(action)], signature))
    return found


def test_shared_flags_come_from_apps_cli(monkeypatch):
    """A flag defined the same way in two scripts' own parsers is one shared flag: it belongs in
    apps/cli.py. A script defining a flag of apps/cli.py again must mean something else by it
    (:data:`OWN_MEANING`), and then its definition differs."""
    problems = []
    for flag, definitions in sorted(_definitions(monkeypatch).items()):
        own = [d for d in definitions if not d.site.startswith(SHARED)]
        shared = [d for d in definitions if d.site.startswith(SHARED)]
        by_signature: dict[tuple, set[str]] = {}
        for d in own:
            by_signature.setdefault(d.signature, set()).add(d.site)
        copies = [sorted(s) for s in by_signature.values() if len(s) > 1]
        if copies:
            problems.append(f"{flag} is defined alike in {', '.join(copies[0])}: define it once in {SHARED}")
        if own and shared and flag not in OWN_MEANING:
            problems.append(f"{flag} of {SHARED} is defined again in {sorted({d.site for d in own})}")
        if flag in OWN_MEANING and not (own and shared):
            problems.append(f"{flag} is listed in OWN_MEANING but no script defines it beside {SHARED}")
        same = {d.signature for d in shared} & {d.signature for d in own}
        if same:
            problems.append(f"{flag}: a script repeats the definition of {SHARED}; use its add_* function")
    assert not problems, "\n".join(problems)
