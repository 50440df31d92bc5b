"""Checkpoint reading and loading, in one place.

Reads plain state_dicts and the usual wrappers (``{'model': ...}``, ``{'state_dict': ...}``,
our resumable training checkpoint ``{'teacher': ..., 'student': ...}``), strips ``module.``
(DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes, and always loads with
``weights_only=True`` so a checkpoint cannot run code.

Three kinds of published weights meet one model:

* ImageNet Conformer weights: backbone only, their 1000-class heads are dropped
  (``purpose="backbone"``, to start the TransCAM stage);
* TransCAM weights: everything but the BAO heads ``label_enc`` and ``classifier_x``
  (``purpose="transcam"``: TransCAM inference, or the start of BAO training, where those
  heads keep their initialisation);
* BAO weights: the full model (``purpose="bao"``: BAO inference, evaluation, resuming).

Anything else missing, unexpected or of the wrong shape is refused with one message that
says what differs and what to do.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from core.errors import UserError

BAO_HEADS = ("label_enc.", "classifier_x.")
CLASSIFIER_HEADS = ("trans_cls_head.", "conv_cls_head.")
PURPOSES = ("bao", "transcam", "backbone")
_WRAPPERS = ("model", "state_dict", "teacher", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    """What happened to each key when loading a checkpoint into a model."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def compare(self, state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                optional: tuple[str, ...] = ()) -> None:
        """Fill :attr:`missing`, :attr:`unexpected` and :attr:`mismatched` of ``state`` against a
        model's ``own`` state_dict; keys ending with one of ``optional`` may be absent on either side."""
        self.missing = [k for k in own if k not in state and not k.endswith(optional)]
        self.unexpected = sorted(k for k in state if k not in own and not k.endswith(optional))
        self.mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                           if k in own and v.shape != own[k].shape]

    def differences(self, missing: list[str] | None = None) -> str:
        """What does not fit, in words; ``missing`` replaces :attr:`missing` (e.g. without allowed keys)."""
        missing = self.missing if missing is None else missing
        detail = []
        if self.mismatched:
            k, got, want = self.mismatched[0]
            detail.append(f"{len(self.mismatched)} tensors of another shape (first: {k} {list(got)} vs {list(want)})")
        if missing:
            detail.append(f"{len(missing)} missing (first: {missing[0]})")
        if self.unexpected:
            detail.append(f"{len(self.unexpected)} unexpected (first: {self.unexpected[0]})")
        return "; ".join(detail)

    def summary(self) -> str:
        """Human-readable one-paragraph report."""
        parts = [f"loaded {self.loaded} tensors"]
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} classification-head tensors ({_first(self.dropped)})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing, kept at initialisation ({_first(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({_first(self.unexpected)})")
        if self.mismatched:
            k, a, b = self.mismatched[0]
            parts.append(f"{len(self.mismatched)} of another shape (first: {k} {list(a)} vs model {list(b)})")
        return "; ".join(parts)


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path; raise a :class:`UserError` when it is missing or a folder.

    ``what`` names the file in the message, e.g. "weights file" gives
    "weights file not found: <path>".
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file; pass the path of the .pth file itself")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path


def safe_load(path: str | os.PathLike, what: str) -> object:
    """``torch.load`` on the CPU with ``weights_only=True``; every failure is a :class:`UserError`.

    A file holding Python objects whose unpickling could run code is refused (naming the
    object), so are truncated or corrupt files; ``what`` names the file as in :func:`require_file`.
    """
    path = require_file(path, what)
    try:
        with warnings.catch_warnings():
            # A file that is not a torch.save archive makes torch warn about its pickle protocol
            # before failing; the one-line error below says all there is to say.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the refused object "Unsupported global: GLOBAL x.y" or, for blocked
        # modules such as os / posix, "unsupported GLOBAL x.y whose module ... is blocked".
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found is None:
            raise UserError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?); "
                            "copy or download it again") from None
        raise UserError(
            f"{path} was refused by the safe loader (weights_only=True): it holds a Python object "
            f"({found.group(1)}) whose loading could run code. Re-save it as a plain state_dict "
            "(torch.save(model.state_dict(), path)) in a trusted environment"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise UserError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                        f"{_first_sentence(err)}; copy or download it again") from None
    except Exception:  # noqa: BLE001 - whatever the unpickler trips on, the file is not a checkpoint
        # A file that is not a torch.save archive (text, random bytes) fails inside the
        # unpickler in many ways (IndexError, KeyError, ...): one user error, without their details.
        raise UserError(f"{path} is not a readable PyTorch checkpoint (not written by torch.save, or "
                        "truncated or corrupt); copy or download it again") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return a plain CPU state_dict with prefixes stripped."""
    return unwrap_state_dict(safe_load(path, "weights file"), str(path))


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state_dict inside a checkpoint object and strip ``module.``-style prefixes."""
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{source} does not hold a model state_dict (a mapping of names to tensors)")
    state = dict(obj)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def checkpoint_kind(state: Mapping[str, torch.Tensor]) -> str:
    """Guess what a state_dict is: ``'bao'``, ``'transcam'``, ``'imagenet'`` or ``'unknown'``."""
    has_bao = all(any(k.startswith(p) for k in state) for p in BAO_HEADS)
    head = state.get("conv_cls_head.weight")
    if has_bao:
        return "bao"
    if head is not None and head.dim() == 4:
        return "transcam"
    if head is not None and head.dim() == 2:
        return "imagenet"
    return "unknown"


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor],
                 purpose: str = "bao") -> LoadReport:
    """Load weights into ``model`` for a ``purpose`` (see module docstring); return the report.

    Raises:
        UserError: when keys beyond those the purpose allows are missing, unexpected or of
            another shape (another architecture or class count), with what to do.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    name = str(source) if not isinstance(source, Mapping) else "the checkpoint"
    state = read_state_dict(source) if not isinstance(source, Mapping) else unwrap_state_dict(source)
    report = LoadReport()
    if purpose == "backbone":
        report.dropped = sorted(k for k in state if k.startswith(CLASSIFIER_HEADS))
        state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_HEADS)}

    own = model.state_dict()
    report.compare(state, own)
    _check(report, purpose, name, state, model)

    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report.loaded = len(state) - len(report.unexpected)
    return report


def _check(report: LoadReport, purpose: str, name: str, state: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    allowed = {"bao": (), "transcam": BAO_HEADS, "backbone": BAO_HEADS + CLASSIFIER_HEADS}[purpose]
    missing = [k for k in report.missing if not k.startswith(allowed)]
    kind = checkpoint_kind(state)
    if purpose == "bao" and kind == "transcam":
        raise UserError(
            f"{name} is a TransCAM checkpoint: it has no BAO heads (label_enc, classifier_x). BAO maps "
            "need weights of the BAO stage; these give the TransCAM baseline's maps, or start a BAO training",
            about="transcam_for_bao")
    if purpose != "backbone" and kind == "imagenet":
        raise UserError(
            f"{name} holds ImageNet classification weights, not TransCAM/BAO weights; they start the "
            "TransCAM stage", about="imagenet")
    head_mismatch = [m for m in report.mismatched if m[0].startswith(CLASSIFIER_HEADS + BAO_HEADS)]
    if head_mismatch and len(head_mismatch) == len(report.mismatched):
        k, got, want = head_mismatch[0]
        num_classes = getattr(model, "num_classes", want[0])
        raise UserError(
            f"{name} was trained for a different number of classes than the {num_classes} of the label file "
            f"({k} has shape {list(got)}, the model needs {list(want)}); use the label file (and dataset) the "
            "weights were trained with", about="classes")
    if report.mismatched or missing or report.unexpected:
        raise UserError(
            f"{name} does not fit this model ({report.differences(missing)}); check the model size (published weights "
            "are 'sm') and that the file is a Conformer TransCAM/BAO checkpoint", about="arch")


def _first_sentence(err: BaseException) -> str:
    """The first sentence of an error message (torch's zip reader errors go on for lines)."""
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0][:160] if text else type(err).__name__


def _first(keys: list[str], n: int = 3) -> str:
    more = f", ... {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
