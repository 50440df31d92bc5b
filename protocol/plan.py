"""The protocol runner's plan (protocol/pipeline.py runs it): which list and extra flags each stage
gets (:class:`Protocol`, from a protocol file or a preset), the folders of a run (:class:`Plan`),
every stage's entry-script command lines (:func:`commands`), checked by the scripts' own parsers
and, before the first stage, against the data and weights they need; the run's definition kept in
``run.json`` (:func:`check_definition`, :func:`recorded_plans`).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from apps.cli import dataset_from_args
from core.errors import UserError
from core.fileio import atomic_path
from data.labels import read_list
from data.layout import REPO_ROOT
from crf.params import resolve_backend


STAGES = ("transcam", "bao", "pseudo_score", "eval_score", "cnn_score", "overlays", "pseudo_seg", "seg_train",
          "seg_val", "seg_upper", "seg_test", "table")

EXTRAS = ("cnn_score", "overlays", "seg_upper")  # run only when the protocol names them

# The fixed background score carried over without pixel labels: TransCAM's best on VOC.
FIXED_T = 0.44

PRESETS = Path(__file__).resolve().parent / "presets"

LIST_KEYS = ("train", "score", "seg_train", "seg_val", "seg_test", "seg_val_full")

# settings keys besides the stages: both training stages, every infer_bao.py / visual_bao.py run, every infer_seg.py run
SETTING_GROUPS = ("train", "infer", "seg_infer")


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
        settings: stage -> extra flags of its entry script (the published protocols need none); keys: the
            stages, "train" (both training stages), "infer" (every infer_bao.py / visual_bao.py run) and
            "seg_infer".
        extras: the optional stages of :data:`EXTRAS` this protocol runs.
        fixed_t: the background threshold of the fixed-threshold row (carried over without pixel labels).
        base: the folder relative list paths start from (a protocol file's folder).
    """

    lists: dict[str, str]
    published: str | None = None
    settings: dict[str, list[str]] = field(default_factory=dict)
    extras: tuple[str, ...] = ()
    fixed_t: float = FIXED_T
    base: str = str(REPO_ROOT)


def load_protocol(path: str | os.PathLike) -> Protocol:
    """A protocol file: JSON with "lists" (required), "published", "settings", "extras", "fixed_t" and
    "about" (free text), the fields of :class:`Protocol`. Refuses unknown keys, stages and extras."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"protocol file {path} cannot be read: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"protocol file {path} is not JSON: {err}") from None
    if not isinstance(d, dict) or not isinstance(d.get("lists"), dict):
        raise UserError(f"protocol file {path} has no \"lists\" object (list key -> list file)")
    known = {"about", "lists", "published", "settings", "extras", "fixed_t"}
    problems = [f"key {k!r}" for k in d if k not in known]
    problems += [f"list {k!r}" for k in d["lists"] if k not in LIST_KEYS]
    problems += [f"settings of {k!r}" for k in d.get("settings", {}) if k not in (*STAGES, *SETTING_GROUPS)]
    problems += [f"extra stage {k!r}" for k in d.get("extras", []) if k not in EXTRAS]
    if problems:
        raise UserError(f"protocol file {path}: unknown {', '.join(problems)} (lists: {', '.join(LIST_KEYS)}; "
                        f"settings: the stages and {', '.join(SETTING_GROUPS)}; extras: {', '.join(EXTRAS)})")
    for k in ("train", "score"):
        if k not in d["lists"]:
            raise UserError(f"protocol file {path} names no {k!r} list")
    settings = d.get("settings", {})
    if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in settings.values()):
        raise UserError(f"protocol file {path}: every setting is a list of strings (a command line's words)")
    return Protocol(lists=dict(d["lists"]), published=d.get("published"), settings=settings,
                    extras=tuple(d.get("extras", ())), fixed_t=float(d.get("fixed_t", FIXED_T)),
                    base=str(path.resolve().parent))


def preset(name: str) -> Protocol:
    """A shipped protocol: "voc", "coco" or "demo" (protocol/presets/<name>.json)."""
    return load_protocol(PRESETS / f"{name}.json")


@dataclass
class Plan:
    """The lists, settings and folders of one run (what :func:`commands` turns into command lines).

    ``run_dir`` is this run's folder (``<root>/seed<S>`` for one seed of ``--seeds``); ``root`` the
    folder of the stages shared by the seeds (:meth:`shared`) and of ``run.json``; ``seed``: the
    ``--seed`` given to the training scripts (None: their default).
    """

    args: argparse.Namespace
    protocol: Protocol
    run_dir: Path
    lists: dict[str, str]
    root: Path
    seed: int | None = None

    def shared(self, stage: str) -> bool:
        """Whether ``stage`` is common to the seeds of the root: the CNN CAMs of given TransCAM weights."""
        return self.root != self.run_dir and stage == "cnn_score" and self.args.start == "transcam"

    def home(self, stage: str) -> Path:
        """The folder of ``stage``'s output, marker and log."""
        return self.root if self.shared(stage) else self.run_dir

    def out(self, stage: str) -> Path:
        return self.home(stage) / stage

    def settings(self, stage: str) -> list[str]:
        return list(self.protocol.settings.get(stage, []))

    def runs(self, stage: str) -> bool:
        """Whether ``stage`` has work in this plan (optional stages, the segmentation stage and the
        TransCAM stage only where the protocol and the arguments call for them)."""
        if stage in EXTRAS and stage not in self.protocol.extras:
            return False
        if stage == "transcam":
            return self.args.start != "transcam"
        if stage == "pseudo_seg":
            return "seg_train" in self.lists and self.lists["seg_train"] != self.lists["score"]
        if stage in ("seg_train", "seg_val", "seg_upper"):
            return "seg_train" in self.lists
        if stage == "seg_test":
            return "seg_test" in self.lists
        return True

    def seg_labels(self) -> Path:
        """The pseudo-labels the segmentation model trains on: the scoring list's when the lists are one."""
        return self.out("pseudo_seg") if self.runs("pseudo_seg") else self.out("pseudo_score") / "bao_pred"


def _resolve_list(value: str, protocol: Protocol, args: argparse.Namespace) -> str:
    """A protocol's list path as an absolute path (``{repo}``, ``{root}``, relative to the protocol's folder)."""
    if "{root}" in value:
        root = args.voc12_root if args.dataset == "voc" else args.coco_root
        if not root:
            raise UserError(f"the protocol's list {value} is in the dataset root: give --"
                            f"{'voc12_root' if args.dataset == 'voc' else 'coco_root'}")
        value = value.replace("{root}", str(Path(root).resolve()))
    value = value.replace("{repo}", str(REPO_ROOT))
    return str(Path(value) if Path(value).is_absolute() else Path(protocol.base) / value)


def make_plan(args: argparse.Namespace, protocol: Protocol | None = None, seed: int | None = None,
              run_dir: Path | None = None, check: bool = True) -> Plan:
    """The run's plan: ``protocol`` (default: ``--protocol``, else the dataset's preset); ``seed`` and
    ``run_dir`` (default: ``<run_dir>/seed<S>`` with a seed, else ``--run_dir``) for one seed's run.
    With ``check``, every stage's command line is parsed by its script's parser (:func:`check_commands`)."""
    protocol = protocol or (load_protocol(args.protocol) if args.protocol else preset(args.dataset))
    given = protocol.lists
    if ("seg_train" in given) != ("seg_val" in given):
        raise ValueError("a protocol names both segmentation lists or neither")
    lists = {k: given[k] for k in ("train", "score", "seg_train", "seg_val", "seg_test") if k in given}
    if "seg_val" in lists and args.dataset == "coco" and args.coco_val == "full":
        if "seg_val_full" not in given:
            raise UserError("--coco_val full: the protocol names no seg_val_full list")
        lists["seg_val"] = given["seg_val_full"]
    if "seg_train" not in lists:
        lists.pop("seg_test", None)
    lists = {k: _resolve_list(v, protocol, args) for k, v in lists.items()}
    root = Path(args.run_dir).resolve()
    if run_dir is None:
        run_dir = root / f"seed{seed}" if seed is not None else root
    plan = Plan(args, protocol, Path(run_dir).resolve(), lists, root, seed)
    if check:
        check_commands(plan)
    return plan


def make_plans(args: argparse.Namespace, protocol: Protocol | None = None) -> list[Plan]:
    """One plan, or one per ``--seeds`` (in ``<run_dir>/seed<S>``)."""
    if not args.seeds:
        return [make_plan(args, protocol)]
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds repeats a seed: {' '.join(map(str, args.seeds))}")
    return [make_plan(args, protocol, seed=s) for s in args.seeds]


def script_parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    """Entry script -> its ``get_args_parser`` (imported here: the scripts import torch)."""
    import evaluation_bao
    import infer_bao
    import infer_seg
    import train_bao
    import train_seg
    import visual_bao

    return {f"{m.__name__}.py": m.get_args_parser
            for m in (train_bao, infer_bao, evaluation_bao, visual_bao, train_seg, infer_seg)}


def check_commands(plan: Plan) -> None:
    """Parse every command line of the plan with its script's own parser: a flag the script does not
    know, or a bad value, is one UserError naming the stage, before any stage runs."""
    parsers = script_parsers()
    for stage in STAGES:
        for cmd in commands(plan, stage, planned=True):
            parser = parsers[cmd[0]]()

            def refuse(message: str, stage: str = stage, script: str = cmd[0]) -> None:
                raise UserError(f"stage {stage}: {script} refuses its command line: {message} (check the protocol's "
                                f"settings of {stage} and its groups)")

            parser.error = refuse  # argparse reports every parse error through error()
            parser.parse_args(cmd[1:])


def _data_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--dataset", args.dataset, "--device", args.device]
    for name in ("voc12_root", "coco_root", "coco_mask_dir", "label_file"):
        value = getattr(args, name)
        if value:
            flags += [f"--{name}", str(Path(value).resolve())]
    return flags


def _crf_flags(args: argparse.Namespace) -> list[str]:
    """``--crf_backend`` of the stages that run a CRF; left out at its default (auto), so that the
    default command lines are those of the scripts' own defaults."""
    return [] if args.crf_backend == "auto" else ["--crf_backend", args.crf_backend]


def _gt_dir(plan: Plan) -> str:
    return str(dataset_from_args(plan.args).layout.mask_folder())


def _eval(plan: Plan, list_key: str, *flags: str) -> list[str]:
    return ["evaluation_bao.py", "--gt_dir", _gt_dir(plan), "--list", plan.lists[list_key], "--logfile",
            str(plan.run_dir / "eval_log.txt"), "--no_progress", *_label_flags(plan.args), *flags]


def _label_flags(args: argparse.Namespace) -> list[str]:
    """Evaluation's classes: the label file's when one is given, else the dataset's."""
    if args.label_file:
        return ["--label_file", str(Path(args.label_file).resolve())]
    return ["--dataset", args.dataset]


def transcam_weights(plan: Plan, planned: bool = False) -> str:
    """The TransCAM weights BAO starts from: the given ones, or the TransCAM stage's last epoch
    (``planned``: a stand-in name when that stage has not run yet)."""
    if plan.args.start == "transcam":
        return str(Path(plan.args.weights or "").resolve())
    return str(_last_weights(plan.out("transcam") / "transcam", "epochs.pth", planned))


def bao_weights(plan: Plan, planned: bool = False) -> str:
    return str(_last_weights(plan.out("bao") / "bao", "epochs_modelt.pth", planned))


def _last_weights(run: Path, suffix: str, planned: bool = False) -> Path:
    """The highest-epoch ``*_{ep}{suffix}`` file of a training run folder; ``planned``: a stand-in
    name when there is none yet (a command line checked before its stage can run)."""
    found = sorted(run.glob(f"*_*{suffix}"), key=lambda p: int(p.name[:-len(suffix)].rsplit("_", 1)[1]))
    if not found and planned:
        return run / f"<last epoch>{suffix}"
    if not found:
        raise UserError(f"no weights *{suffix} in {run}: the training stage did not finish; rerun the pipeline")
    return found[-1]


def commands(plan: Plan, stage: str, planned: bool = False) -> list[list[str]]:
    """The entry-script command lines of ``stage`` (run in order; [] when the stage has nothing to do);
    ``planned``: before the earlier stages ran (weights they write get stand-in names)."""
    a, data = plan.args, _data_flags(plan.args)
    seed = [] if plan.seed is None else ["--seed", str(plan.seed)]
    if not plan.runs(stage) or stage == "table":
        return []
    refine = ["--refine", a.refine]
    train = ["train_bao.py", *data, *refine, "--train_list", plan.lists["train"], "--save_dir", str(plan.out(stage)),
             "--resume", "auto", *plan.settings("train"), *seed]
    infer = ["infer_bao.py", *data]
    if stage == "transcam":
        start = ["--from_scratch"] if a.start == "scratch" else ["--weights", str(Path(a.weights or "").resolve())]
        return [[*train, "--method", "transcam", *start, "--session_name", "transcam", *plan.settings("transcam")]]
    if stage == "bao":
        return [[*train, "--weights", transcam_weights(plan, planned), "--session_name", "bao",
                 *plan.settings("bao")]]
    if stage == "pseudo_score":
        out, settings = plan.out(stage), plan.settings("infer")
        return [[*infer, *refine, "--weights", bao_weights(plan, planned), "--infer_list", plan.lists["score"],
                 "--out_pred", str(out / "bao_pred"), "--out_cam", str(out / "bao_cams"), *settings],
                _eval(plan, "score", "--predict_dir", str(out / "bao_pred"), "--json", str(out / "bao_pseudo.json"),
                      "--comment", "pipeline: BAO pseudo-labels"),
                [*infer, *refine, "--method", "transcam", "--weights", transcam_weights(plan, planned), "--infer_list",
                 plan.lists["score"], "--out_cam", str(out / "transcam_cams"), *settings]]
    if stage == "eval_score":
        src, out = plan.out("pseudo_score"), plan.out(stage)
        return [_eval(plan, "score", "--type", "npy", "--bg_from_file", "--predict_dir", str(src / "bao_cams"),
                      "--json", str(out / "bao_maps.json"), "--plot", str(out / "bao_maps_sweep.png"),
                      "--comment", "pipeline: BAO maps sweep", "--no_progress"),
                _eval(plan, "score", "--type", "npy", "--predict_dir", str(src / "transcam_cams"), "--json",
                      str(out / "transcam.json"), "--plot", str(out / "transcam_sweep.png"), *_bao_line(plan),
                      "--comment", f"pipeline: {cams_name(plan)} sweep", "--no_progress")]
    if stage == "cnn_score":
        out = plan.out(stage)
        line = [] if plan.shared(stage) else _bao_line(plan)  # one seed's BAO line would not fit the others
        return [[*infer, "--method", "cnn", "--weights", transcam_weights(plan, planned), "--infer_list",
                 plan.lists["score"], "--out_cam", str(out / "cnn_cams"), *plan.settings("infer")],
                _eval(plan, "score", "--type", "npy", "--predict_dir", str(out / "cnn_cams"), "--json",
                      str(out / "cnn.json"), "--plot", str(out / "cnn_sweep.png"), *line,
                      "--comment", "pipeline: CNN CAM sweep (ablation)", "--no_progress")]
    if stage == "overlays":
        return [["visual_bao.py", *data, *refine, "--weights", bao_weights(plan, planned), "--list",
                 plan.lists["score"], "--out_dir", str(plan.out(stage)), *plan.settings("infer"),
                 *plan.settings("overlays")]]
    if stage == "pseudo_seg":
        return [[*infer, *refine, "--weights", bao_weights(plan, planned), "--infer_list", plan.lists["seg_train"],
                 "--out_pred", str(plan.out(stage)), *plan.settings("infer")]]
    if a.seg_from_scratch or not a.backbone_weights:  # the latter refused by check_prerequisites
        start = ["--from_scratch"]
    else:
        start = ["--backbone_weights", str(Path(a.backbone_weights).resolve())]
    seg_train = ["train_seg.py", *data, "--train_list", plan.lists["seg_train"], "--session_name", "seg",
                 "--resume", "auto", *start, *plan.settings("seg_train"), *seed]
    if stage == "seg_train":
        return [[*seg_train, "--label_dir", str(plan.seg_labels()), "--save_dir", str(plan.out(stage))]]
    seg_weights = plan.out("seg_train") / "seg" / "seg_final.pth"
    if stage == "seg_val":
        return _segment_and_score(plan, seg_weights, plan.out(stage), "segmentation val")
    if stage == "seg_upper":
        masks = dataset_from_args(a).layout.mask_folder()
        upper = plan.out(stage)
        return [[*seg_train, "--label_dir", str(masks), "--save_dir", str(upper)],
                *_segment_and_score(plan, upper / "seg" / "seg_final.pth", upper, "segmentation val, masks")]
    if stage == "seg_test":
        return [["infer_seg.py", *data, "--weights", str(seg_weights), *plan.settings("seg_infer"), "--infer_list",
                 plan.lists["seg_test"], "--out_server", str(plan.out(stage)), *_crf_flags(a)]]
    raise ValueError(f"no commands for stage {stage!r}")


def cams_name(plan: Plan) -> str:
    """What the TransCAM stage's CAMs are in this run: refined by attention, or the CNN CAMs."""
    return "TransCAM CAMs" if plan.args.refine == "attention" else "CNN CAMs (TransCAM CAMs unrefined)"


def _bao_line(plan: Plan) -> list[str]:
    """``--ref_miou``: BAO's threshold-free mIoU as a line on a sweep plot (once pseudo_score scored it)."""
    path = plan.out("pseudo_score") / "bao_pseudo.json"
    if not path.is_file():
        return []
    return ["--ref_miou", f"{100 * json.loads(path.read_text())['result']['miou']:.4f}"]


def _segment_and_score(plan: Plan, weights: Path, out: Path, what: str) -> list[list[str]]:
    """Segment the val list with ``weights`` (with and without CRF) and score both."""
    return [["infer_seg.py", *_data_flags(plan.args), "--weights", str(weights), *plan.settings("seg_infer"),
             "--infer_list", plan.lists["seg_val"], "--out_pred", str(out / "pred"), "--out_crf", str(out / "crf"),
             *_crf_flags(plan.args)],
            _eval(plan, "seg_val", "--predict_dir", str(out / "pred"), "--json", str(out / "pred.json"),
                  "--comment", f"pipeline: {what}"),
            _eval(plan, "seg_val", "--predict_dir", str(out / "crf"), "--json", str(out / "crf.json"),
                  "--comment", f"pipeline: {what} + CRF")]


def check_prerequisites(plan: Plan, stages: list[str]) -> None:
    """Everything the ``stages`` to run need, checked before the first one starts (one UserError)."""
    a = plan.args
    stages = [s for s in stages if plan.runs(s)]
    needs_start = a.start != "scratch" and (
        any(s in stages for s in ("transcam", "bao")) or (a.start == "transcam" and "pseudo_score" in stages))
    if a.start == "scratch" and a.weights:
        raise UserError("--start scratch trains the TransCAM stage from random initialisation: drop --weights")
    if needs_start and not a.weights:
        raise UserError(f"give --weights ({'TransCAM' if a.start == 'transcam' else 'ImageNet Conformer'} weights)")
    if needs_start and not Path(a.weights).is_file():
        raise UserError(f"weights file not found: {a.weights}")
    if any(s in stages for s in ("seg_train", "seg_upper")) and not a.seg_from_scratch:
        if not a.backbone_weights:
            raise UserError("give --backbone_weights (ImageNet ResNet-101, torchvision's layout) or --seg_from_scratch")
        if not Path(a.backbone_weights).is_file():
            raise UserError(f"backbone weights not found: {a.backbone_weights}")
    spec = dataset_from_args(a)
    used = {"train": ("transcam", "bao"), "score": ("pseudo_score", "eval_score", "cnn_score"),
            "seg_train": ("pseudo_seg", "seg_train", "seg_upper"), "seg_val": ("seg_val", "seg_upper"),
            "seg_test": ("seg_test",)}
    for key, users in used.items():
        if key not in plan.lists or not any(s in stages for s in users):
            continue
        path = plan.lists[key]
        if not Path(path).is_file():
            hint = " (python -m coco14.prepare_coco writes the COCO lists)" if a.dataset == "coco" else ""
            raise UserError(f"the {key} list {path} is missing{hint}")
        names = read_list(path)
        spec.layout.check(names, path)
        if key in ("score", "seg_val"):
            spec.layout.check_masks(names, path)


def definition(plan: Plan) -> dict:
    """What makes a run's results what they are: kept in ``run.json``, and a rerun must agree with it."""
    p = plan.protocol
    return {"dataset": plan.args.dataset, "refine": plan.args.refine, "start": plan.args.start,
            "seg_from_scratch": plan.args.seg_from_scratch, "crf_backend": resolve_backend(plan.args.crf_backend),
            "lists": plan.lists, "settings": p.settings,
            "extras": list(p.extras), "fixed_t": p.fixed_t, "published": p.published,
            "seed": plan.seed if plan.run_dir == plan.root else "one folder per seed"}


def _differences(before, now, name: str) -> list[str]:
    """``name old -> new`` for every value that differs, descending into dicts (``settings.bao ...``)."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for k in sorted(set(before) | set(now), key=str)
                for d in _differences(before.get(k), now.get(k), f"{name}.{k}" if name else str(k))]
    return [] if before == now else [f"{name} {before} -> {now}"]


def check_definition(plan: Plan) -> None:
    """Write ``run.json`` on a new run; refuse a rerun whose :func:`definition` differs (its finished
    stages would be mixed with stages of other settings), naming every setting that differs."""
    path = plan.root / "run.json"
    now = definition(plan)
    if path.is_file():
        # a run made before "published", "seed" and "crf_backend" were recorded had none of them (published
        # figures change no result; its CRF was the one "auto" gives here)
        before = {"published": now["published"], "seed": None, "crf_backend": now["crf_backend"],
                  **json.loads(path.read_text())}
        changed = _differences(before, now, "")
        if changed:
            raise UserError(f"{plan.root} holds a run made with other settings ({'; '.join(changed)}); rerun it "
                            "with the same flags and protocol, or give another --run_dir")
        return
    plan.root.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(now, indent=1) + "\n")


def recorded_plans(args: argparse.Namespace) -> list[Plan]:
    """The plans of the run in ``args.run_dir`` as its ``run.json`` recorded them, whatever flags and
    preset (the demo's) made it: one, or one per ``seed<S>`` folder. A folder without ``run.json``
    holds no run: UserError."""
    root = Path(args.run_dir)
    path = root / "run.json"
    if not path.is_file():
        state = "does not exist" if not root.exists() else "holds no run (no run.json)"
        raise UserError(f"{root} {state}: give the --run_dir of a run (a run folder has run.json)")
    d = json.loads(path.read_text())
    protocol = Protocol(lists=d["lists"], published=d.get("published"), settings=d["settings"],
                        extras=tuple(d["extras"]), fixed_t=d["fixed_t"])
    recorded = argparse.Namespace(**{**vars(args), "dataset": d["dataset"], "refine": d["refine"],
                                     "start": d["start"], "seg_from_scratch": d["seg_from_scratch"],
                                     "crf_backend": d.get("crf_backend", args.crf_backend), "coco_val": "labelled"})
    if d.get("seed") != "one folder per seed":
        return [make_plan(recorded, protocol, seed=d.get("seed"), run_dir=root, check=False)]
    seeds = sorted(int(p.name[4:]) for p in root.glob("seed*") if p.name[4:].isdigit() and p.is_dir())
    return [make_plan(recorded, protocol, seed=s, check=False) for s in seeds]
