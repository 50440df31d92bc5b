"""The whole WSSS protocol as one resumable command: from TransCAM (or ImageNet) weights to the results table.

    python -m apps.pipeline --dataset voc --voc12_root VOCdevkit/VOC2012 --weights weights/transcam_voc.pth \\
        --backbone_weights weights/resnet101-63fe2227.pth --run_dir runs/protocol_voc
    python -m apps.pipeline --run_dir runs/protocol_voc --status

Each stage runs the real entry script (train_bao.py, infer_bao.py, evaluation_bao.py,
train_seg.py, infer_seg.py) in a subprocess, with the list the protocol names for it
(:data:`PROTOCOLS`, data rather than code), its output in ``<run_dir>/<stage>/`` and its log
in ``<run_dir>/logs/<stage>.log``. ``make demo`` is this runner's small preset on a generated
dataset (apps/demo.py). A finished stage leaves ``<run_dir>/stages/<stage>.json``
and is skipped on a rerun; a stage interrupted inside continues where it stopped (training
with ``--resume auto``, inference skipping finished images). ``--from STAGE`` redoes that stage
and the following ones (their folders are removed first); ``--until STAGE`` stops after one.
Everything a stage needs (weights, dataset root, lists, masks) is checked before the first
stage starts.

Stages, in order (:data:`STAGES`): ``transcam`` (only with ``--start imagenet`` or ``scratch``:
the TransCAM stage from ImageNet Conformer weights or from random initialisation), ``bao``
(BAO from TransCAM weights), ``pseudo_score``
(BAO pseudo-labels and maps, and TransCAM CAMs, of the scoring list; the pseudo-labels' mIoU),
``eval_score`` (the background-threshold sweeps of TransCAM CAMs and BAO maps, with plots),
``pseudo_seg`` (pseudo-labels of the segmentation training list; nothing to do when it is the
scoring list, whose labels are reused), ``seg_train``, ``seg_val``
(segmentation of the val list, with and without CRF, scored), ``seg_test`` (VOC: the test set
in the evaluation server's layout and archive), ``table`` (``results.md`` and ``results.json``,
beside the published figures). A protocol may add optional stages (:attr:`Protocol.extras`, the
demo's): ``cnn_score`` (the CNN CAMs before attention refinement, swept: an ablation),
``overlays`` (overlay sheets) and ``seg_upper`` (the segmentation model trained on the
ground-truth masks and scored on val: the fully supervised upper bound). A protocol without
segmentation lists stops at the pseudo-labels.

``--refine none`` runs the ablation without attention refinement (train_bao.py's flag) in
every BAO and TransCAM stage; the TransCAM CAMs are then the CNN CAMs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from apps.cli import (DefaultsHelpFormatter, add_dataset_args, add_refine_arg, add_stages_device_arg, dataset_from_args,
                      run_cli)
from core.errors import UserError, stop_signal
from core.fileio import atomic_path
from core.runlock import RunLock, describe, lock_holder
from data.labels import read_list
from data.layout import REPO_ROOT

STAGES = ("transcam", "bao", "pseudo_score", "eval_score", "cnn_score", "overlays", "pseudo_seg", "seg_train",
          "seg_val", "seg_upper", "seg_test", "table")
EXTRAS = ("cnn_score", "overlays", "seg_upper")  # run only when the protocol names them
# The fixed background score carried over without pixel labels: TransCAM's best on VOC.
FIXED_T = 0.44


@dataclass(frozen=True)
class Protocol:
    """Which list each stage of one dataset's protocol uses, and the published figures it is compared with.

    Attributes:
        train_list: BAO / TransCAM training.
        score_list: pseudo-label and CAM quality (scored against the masks).
        seg_train_list: the segmentation model's training images (their pseudo-labels); None: no
            segmentation stage (the run ends with the pseudo-labels).
        seg_val_list: the segmentation model's score (None with ``seg_train_list``).
        seg_test_list: images written for an evaluation server (None: no server).
        published: row key of the results table -> the published figure.
        settings: stage -> extra flags of its entry script (the protocol's published defaults need none);
            keys: the stages, "train" (both training stages), "infer" (every infer_bao.py / visual_bao.py
            run) and "seg_infer".
        extras: the optional stages of :data:`EXTRAS` this protocol runs.
        fixed_t: the background threshold of the fixed-threshold row (carried over without pixel labels).
    """

    train_list: str
    score_list: str
    seg_train_list: str | None
    seg_val_list: str | None
    seg_test_list: str | None
    published: dict[str, str]
    settings: dict[str, list[str]] = field(default_factory=dict)
    extras: tuple[str, ...] = ()
    fixed_t: float = FIXED_T


PROTOCOLS = {
    "voc": Protocol(
        train_list="voc12/train_aug.txt", score_list="voc12/train.txt", seg_train_list="voc12/train_aug.txt",
        seg_val_list="voc12/val.txt", seg_test_list="voc12/test.txt",
        published={"bao_pseudo": "not in the published repository", "bao_maps_best": "74.97 (t = 0.49-0.50)",
                   "transcam_best": "64.85 (t = 0.44)", "transcam_fixed": "64.85 (t = 0.44)",
                   "seg_val": "TransCAM 69.3; BAO: in the paper", "seg_val_crf": "TransCAM 69.3; BAO: in the paper",
                   "seg_test": "TransCAM 69.6 (server)"}),
    "coco": Protocol(
        train_list="coco14/train.txt", score_list="coco14/train.txt", seg_train_list="coco14/train.txt",
        seg_val_list="coco14/val_labelled.txt", seg_test_list=None,
        published={"bao_pseudo": "not in the published repository", "bao_maps_best": "-", "transcam_best": "-",
                   "transcam_fixed": "-", "seg_val": "ToCo 42.2, DuPL 43.5 (their READMEs)",
                   "seg_val_crf": "ToCo 42.2, DuPL 43.5 (their READMEs)", "seg_test": "-"}),
}
COCO_FULL_VAL = "coco14/val.txt"  # all 40,504 val images (MCTformer's figure)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="folder of the whole run: every stage's outputs and logs")
    parser.add_argument("--status", action="store_true", help="show which stages are done, then exit")
    parser.add_argument("--weights", default=None,
                        help="starting weights: TransCAM weights (--start transcam) or ImageNet Conformer weights "
                             "(--start imagenet)")
    parser.add_argument("--start", choices=("transcam", "imagenet", "scratch"), default="transcam",
                        help="what --weights are: transcam skips the TransCAM stage; imagenet trains it first from "
                             "them; scratch trains it from random initialisation (no --weights)")
    parser.add_argument("--backbone_weights", default=None,
                        help="ImageNet ResNet-101 weights in torchvision's layout for the segmentation model")
    parser.add_argument("--seg_from_scratch", action="store_true",
                        help="train the segmentation model from random initialisation (no --backbone_weights)")
    parser.add_argument("--coco_val", choices=("labelled", "full"), default="labelled",
                        help="COCO val list of the segmentation score: the 40,137 images with a labelled class "
                             "(coco14/val_labelled.txt) or all 40,504 (coco14/val.txt)")
    parser.add_argument("--from", dest="from_stage", choices=STAGES, default=None,
                        help="redo this stage and every later one (their outputs are removed first)")
    parser.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    add_stages_device_arg(parser)
    add_refine_arg(parser)
    add_dataset_args(parser)
    return parser


@dataclass
class Plan:
    """The lists, settings and folders of one run (what :func:`commands` turns into command lines)."""

    args: argparse.Namespace
    protocol: Protocol
    run_dir: Path
    lists: dict[str, str]

    def out(self, stage: str) -> Path:
        return self.run_dir / stage

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


def make_plan(args: argparse.Namespace, protocol: Protocol | None = None) -> Plan:
    """The run's plan; ``protocol`` overrides the dataset's table (the demo's preset)."""
    protocol = protocol or PROTOCOLS[args.dataset]
    if (protocol.seg_train_list is None) != (protocol.seg_val_list is None):
        raise ValueError("a protocol names both segmentation lists or neither")
    lists = {"train": protocol.train_list, "score": protocol.score_list}
    if protocol.seg_train_list:
        lists["seg_train"] = protocol.seg_train_list
        lists["seg_val"] = (COCO_FULL_VAL if args.dataset == "coco" and args.coco_val == "full"
                            else protocol.seg_val_list)
        if protocol.seg_test_list:
            lists["seg_test"] = protocol.seg_test_list
    lists = {k: str(v if Path(v).is_absolute() else REPO_ROOT / v) for k, v in lists.items()}
    return Plan(args, protocol, Path(args.run_dir).resolve(), lists)


def _data_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--dataset", args.dataset, "--device", args.device]
    for name in ("voc12_root", "coco_root", "coco_mask_dir", "label_file"):
        value = getattr(args, name)
        if value:
            flags += [f"--{name}", str(Path(value).resolve())]
    return flags


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


def transcam_weights(plan: Plan) -> str:
    """The TransCAM weights BAO starts from: the given ones, or the TransCAM stage's last epoch."""
    if plan.args.start == "transcam":
        return str(Path(plan.args.weights).resolve())
    return str(_last_weights(plan.out("transcam") / "transcam", "epochs.pth"))


def bao_weights(plan: Plan) -> str:
    return str(_last_weights(plan.out("bao") / "bao", "epochs_modelt.pth"))


def _last_weights(run: Path, suffix: str) -> Path:
    """The highest-epoch ``*_{ep}{suffix}`` file of a training run folder."""
    found = sorted(run.glob(f"*_*{suffix}"), key=lambda p: int(p.name[:-len(suffix)].rsplit("_", 1)[1]))
    if not found:
        raise UserError(f"no weights *{suffix} in {run}: the training stage did not finish; rerun the pipeline")
    return found[-1]


def commands(plan: Plan, stage: str) -> list[list[str]]:
    """The entry-script command lines of ``stage`` (run in order; [] when the stage has nothing to do)."""
    a, data = plan.args, _data_flags(plan.args)
    if not plan.runs(stage) or stage == "table":
        return []
    refine = ["--refine", a.refine]
    train = ["train_bao.py", *data, *refine, "--train_list", plan.lists["train"], "--save_dir", str(plan.out(stage)),
             "--resume", "auto", *plan.settings("train")]
    infer = ["infer_bao.py", *data]
    if stage == "transcam":
        start = ["--from_scratch"] if a.start == "scratch" else ["--weights", str(Path(a.weights).resolve())]
        return [[*train, "--method", "transcam", *start, "--session_name", "transcam", *plan.settings("transcam")]]
    if stage == "bao":
        return [[*train, "--weights", transcam_weights(plan), "--session_name", "bao", *plan.settings("bao")]]
    if stage == "pseudo_score":
        out, settings = plan.out(stage), plan.settings("infer")
        return [[*infer, *refine, "--weights", bao_weights(plan), "--infer_list", plan.lists["score"], "--out_pred",
                 str(out / "bao_pred"), "--out_cam", str(out / "bao_cams"), *settings],
                _eval(plan, "score", "--predict_dir", str(out / "bao_pred"), "--json", str(out / "bao_pseudo.json"),
                      "--comment", "pipeline: BAO pseudo-labels"),
                [*infer, *refine, "--method", "transcam", "--weights", transcam_weights(plan), "--infer_list",
                 plan.lists["score"], "--out_cam", str(out / "transcam_cams"), *settings]]
    if stage == "eval_score":
        src, out = plan.out("pseudo_score"), plan.out(stage)
        return [_eval(plan, "score", "--type", "npy", "--bg_from_file", "--predict_dir", str(src / "bao_cams"),
                      "--json", str(out / "bao_maps.json"), "--plot", str(out / "bao_maps_sweep.png"),
                      "--comment", "pipeline: BAO maps sweep", "--no_progress"),
                _eval(plan, "score", "--type", "npy", "--predict_dir", str(src / "transcam_cams"), "--json",
                      str(out / "transcam.json"), "--plot", str(out / "transcam_sweep.png"), *_bao_line(plan),
                      "--comment", f"pipeline: {_cams(plan)} sweep", "--no_progress")]
    if stage == "cnn_score":
        out = plan.out(stage)
        return [[*infer, "--method", "cnn", "--weights", transcam_weights(plan), "--infer_list", plan.lists["score"],
                 "--out_cam", str(out / "cnn_cams"), *plan.settings("infer")],
                _eval(plan, "score", "--type", "npy", "--predict_dir", str(out / "cnn_cams"), "--json",
                      str(out / "cnn.json"), "--plot", str(out / "cnn_sweep.png"), *_bao_line(plan),
                      "--comment", "pipeline: CNN CAM sweep (ablation)", "--no_progress")]
    if stage == "overlays":
        return [["visual_bao.py", *data, *refine, "--weights", bao_weights(plan), "--list", plan.lists["score"],
                 "--out_dir", str(plan.out(stage)), *plan.settings("infer"), *plan.settings("overlays")]]
    if stage == "pseudo_seg":
        return [[*infer, *refine, "--weights", bao_weights(plan), "--infer_list", plan.lists["seg_train"],
                 "--out_pred", str(plan.out(stage)), *plan.settings("infer")]]
    if a.seg_from_scratch or not a.backbone_weights:  # the latter refused by check_prerequisites
        start = ["--from_scratch"]
    else:
        start = ["--backbone_weights", str(Path(a.backbone_weights).resolve())]
    seg_train = ["train_seg.py", *data, "--train_list", plan.lists["seg_train"], "--session_name", "seg",
                 "--resume", "auto", *start, *plan.settings("seg_train")]
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
                 plan.lists["seg_test"], "--out_server", str(plan.out(stage))]]
    raise ValueError(f"no commands for stage {stage!r}")


def _cams(plan: Plan) -> str:
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
             "--infer_list", plan.lists["seg_val"], "--out_pred", str(out / "pred"), "--out_crf", str(out / "crf")],
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


def _done_file(plan: Plan, stage: str) -> Path:
    return plan.run_dir / "stages" / f"{stage}.json"


def status(plan: Plan) -> list[tuple[str, str]]:
    """(stage, "done in N s" | "partly done" | "to do" | "not in this run") for every stage."""
    rows = []
    for stage in STAGES:
        done = _done_file(plan, stage)
        if not plan.runs(stage) and stage != "pseudo_seg":
            rows.append((stage, "not in this run"))
        elif not plan.runs(stage):
            rows.append((stage, "not in this run (the scoring list's pseudo-labels are reused)"))
        elif done.is_file():
            rows.append((stage, f"done in {json.loads(done.read_text())['seconds']:.0f} s"))
        elif plan.out(stage).exists():
            rows.append((stage, "partly done (resumes)"))
        else:
            rows.append((stage, "to do"))
    return rows


def _run_stage(plan: Plan, stage: str) -> None:
    """Run the stage's commands, teeing their output to ``logs/<stage>.log``; mark it done."""
    start = time.time()
    log_path = plan.run_dir / "logs" / f"{stage}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    plan.out(stage).mkdir(parents=True, exist_ok=True)
    cmds = commands(plan, stage)
    with open(log_path, "ab") as log:
        for cmd in cmds:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            try:
                _pass_output(proc, log)
            except KeyboardInterrupt:
                # Stop the stage's script as the runner was stopped, and let it save: Ctrl-C in a
                # terminal reached it too; a SIGTERM sent to the runner alone is passed on.
                if stop_signal() == signal.SIGTERM:
                    proc.send_signal(signal.SIGTERM)
                _pass_output(proc, log)
                proc.wait()
                raise
            if proc.wait() != 0:
                raise UserError(f"stage {stage} failed (exit {proc.returncode}); its output is in {log_path}; fix the "
                                "cause and rerun the same command, which continues from this stage")
    if stage == "table":
        write_table(plan)
    with atomic_path(_done_file(plan, stage)) as tmp:
        Path(tmp).write_text(json.dumps({"seconds": time.time() - start, "commands": cmds}, indent=1) + "\n")


def _pass_output(proc: subprocess.Popen, log) -> None:
    """Copy a stage's output to the screen and its log until it ends."""
    # Raw chunks, not lines: a progress bar redraws its line with carriage returns, which a
    # line reader would turn into one printed line per refresh.
    while chunk := proc.stdout.read1(65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        log.write(chunk)


# The results table: (key, title, list, stage that scores it); "{cams}" is what the TransCAM
# stage's CAMs are in the run (refined by attention, or the CNN CAMs with --refine none).
ROWS = (("bao_pseudo", "BAO pseudo-labels, threshold-free", "score", "pseudo_score"),
        ("bao_maps_best", "BAO maps, best background threshold (reference)", "score", "eval_score"),
        ("transcam_best", "{cams}, best background threshold (tuned on pixel labels)", "score", "eval_score"),
        ("transcam_fixed", "{cams}, fixed threshold t = {fixed_t}", "score", "eval_score"),
        ("cnn_best", "CNN CAMs before attention refinement, best threshold (ablation)", "score", "cnn_score"),
        ("seg_val", "segmentation model on the BAO pseudo-labels", "seg_val", "seg_val"),
        ("seg_val_crf", "segmentation model on the BAO pseudo-labels, + CRF", "seg_val", "seg_val"),
        ("seg_upper", "segmentation model on the ground-truth masks (upper bound)", "seg_val", "seg_upper"),
        ("seg_upper_crf", "segmentation model on the ground-truth masks, + CRF (upper bound)", "seg_val",
         "seg_upper"))


def collect(plan: Plan) -> dict:
    """The results of the scoring stages that ran: row key -> {"miou", "t"?}."""
    def read(path: Path) -> dict:
        return json.loads(path.read_text())

    def best(path: Path) -> dict:
        return {"miou": read(path)["best"]["miou"], "t": read(path)["best"]["t"]}

    def miou(path: Path) -> dict:
        return {"miou": read(path)["result"]["miou"]}

    score = plan.out("eval_score")
    sweep = read(score / "transcam.json")["sweep"]
    fixed = min(sweep, key=lambda row: abs(row["t"] - plan.protocol.fixed_t))
    results = {"bao_pseudo": miou(plan.out("pseudo_score") / "bao_pseudo.json"),
               "bao_maps_best": best(score / "bao_maps.json"), "transcam_best": best(score / "transcam.json"),
               "transcam_fixed": {"miou": fixed["miou"], "t": fixed["t"]}}
    if plan.runs("cnn_score"):
        results["cnn_best"] = best(plan.out("cnn_score") / "cnn.json")
    for stage in ("seg_val", "seg_upper"):
        if plan.runs(stage):
            results[stage] = miou(plan.out(stage) / "pred.json")
            results[f"{stage}_crf"] = miou(plan.out(stage) / "crf.json")
    return results


def write_table(plan: Plan) -> str:
    """``results.json`` and ``results.md`` in the run folder; returns the Markdown."""
    results = collect(plan)
    names = {k: Path(v).name for k, v in plan.lists.items()}
    attention = plan.args.refine == "attention"
    lines = ["Attention refinement (published)." if attention else
             "No attention refinement (`--refine none`, an ablation): the TransCAM stage's CAMs are the CNN CAMs; "
             "the published figures are with refinement.", "",
             "| result | list | mIoU % | threshold | published |", "|---|---|---|---|---|"]
    for key, title, list_key, stage in ROWS:
        if key not in results:
            continue
        r = results[key]
        t = f"{r['t']:.2f}" if "t" in r else "none"
        published = plan.protocol.published.get(key, "-") if attention else "-"
        title = title.format(cams=_cams(plan), fixed_t=plan.protocol.fixed_t)
        lines.append(f"| {title} | {names[list_key]} | {100 * r['miou']:.2f} | {t} | {published} |")
    if plan.runs("seg_test"):
        archive = plan.out("seg_test") / "results.tar.gz"
        lines.append(f"\nTest set ({names['seg_test']}): upload `{archive}` to the evaluation server; published: "
                     f"{plan.protocol.published.get('seg_test', '-')}.")
    text = "\n".join(lines) + "\n"
    with atomic_path(plan.run_dir / "results.json") as tmp:
        Path(tmp).write_text(json.dumps({"lists": plan.lists, "refine": plan.args.refine, "results": results},
                                        indent=1) + "\n")
    with atomic_path(plan.run_dir / "results.md") as tmp:
        Path(tmp).write_text(text)
    return text


def definition(plan: Plan) -> dict:
    """What makes a run's results what they are: kept in ``run.json``, and a rerun must agree with it."""
    p = plan.protocol
    return {"dataset": plan.args.dataset, "refine": plan.args.refine, "start": plan.args.start,
            "seg_from_scratch": plan.args.seg_from_scratch, "lists": plan.lists, "settings": p.settings,
            "extras": list(p.extras), "fixed_t": p.fixed_t}


def check_definition(plan: Plan) -> None:
    """Write ``run.json`` on a new run; refuse a rerun whose :func:`definition` differs (its finished
    stages would be mixed with stages of other settings)."""
    path = plan.run_dir / "run.json"
    now = definition(plan)
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            values = [f"{k} {before.get(k)} -> {now.get(k)}" for k in changed
                      if not isinstance(now.get(k), (dict, list))]
            raise UserError(f"{plan.run_dir} holds a run made with other settings ({', '.join(values or changed)}); "
                            "rerun it with the same flags, or give another --run_dir")
        return
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(now, indent=1) + "\n")


def run(plan: Plan, show_table: bool = True) -> None:
    """Run the stages that are not done (from ``--from``, up to ``--until``); print the table at the end.

    The run folder is locked for the whole run (:class:`core.runlock.RunLock`): a second runner
    on it is refused before it writes anything."""
    with RunLock(plan.run_dir, "wait for it to end, stop it, or give another --run_dir"):
        _run_stages(plan, show_table)


def _run_stages(plan: Plan, show_table: bool) -> None:
    a = plan.args
    first = STAGES.index(a.from_stage) if a.from_stage else 0
    last = STAGES.index(a.until) if a.until else len(STAGES) - 1
    if first > last:
        raise UserError(f"--from {a.from_stage} comes after --until {a.until}")
    selected = list(STAGES[:last + 1])
    todo = [s for s in selected if STAGES.index(s) >= first or not _done_file(plan, s).is_file()]
    check_prerequisites(plan, todo)
    check_definition(plan)
    if a.from_stage:
        for stage in STAGES[first:]:
            _done_file(plan, stage).unlink(missing_ok=True)
            shutil.rmtree(plan.out(stage), ignore_errors=True)
    for stage in selected:
        if not plan.runs(stage):
            continue
        if _done_file(plan, stage).is_file():
            print(f"== {stage}: done before, skipped", flush=True)
            continue
        print(f"\n== {stage}", flush=True)
        _run_stage(plan, stage)
    if selected[-1] == "table" and show_table:
        print("\n" + (plan.run_dir / "results.md").read_text())


def recorded_plan(args: argparse.Namespace) -> Plan | None:
    """The plan of the run in ``args.run_dir`` as its ``run.json`` recorded it (None: no run there
    yet), whatever flags and preset (the demo's) made it."""
    path = Path(args.run_dir) / "run.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    lists = d["lists"]
    protocol = Protocol(train_list=lists["train"], score_list=lists["score"], seg_train_list=lists.get("seg_train"),
                        seg_val_list=lists.get("seg_val"), seg_test_list=lists.get("seg_test"), published={},
                        settings=d["settings"], extras=tuple(d["extras"]), fixed_t=d["fixed_t"])
    recorded = argparse.Namespace(**{**vars(args), "dataset": d["dataset"], "refine": d["refine"],
                                     "start": d["start"], "seg_from_scratch": d["seg_from_scratch"],
                                     "coco_val": "labelled"})
    return make_plan(recorded, protocol)


def main(args: argparse.Namespace) -> None:
    if args.status:
        holder = lock_holder(args.run_dir)
        if holder is not None:
            print(f"a run is in progress: {describe(holder)}")
        for stage, state in status(recorded_plan(args) or make_plan(args)):
            print(f"{stage:<14} {state}")
        return
    plan = make_plan(args)
    os.makedirs(plan.run_dir, exist_ok=True)
    run(plan)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
