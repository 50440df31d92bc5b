"""The whole WSSS protocol as one resumable command: from TransCAM (or ImageNet) weights to the results table.

    python -m apps.pipeline --dataset voc --voc12_root VOCdevkit/VOC2012 --weights weights/transcam_voc.pth \\
        --backbone_weights weights/resnet101-63fe2227.pth --run_dir runs/protocol_voc
    python -m apps.pipeline --run_dir runs/protocol_voc --status

Each stage runs the real entry script (train_bao.py, infer_bao.py, evaluation_bao.py,
train_seg.py, infer_seg.py) in a subprocess, with the list the protocol names for it
(:data:`PROTOCOLS`, data rather than code), its output in ``<run_dir>/<stage>/`` and its log
in ``<run_dir>/logs/<stage>.log``. A finished stage leaves ``<run_dir>/stages/<stage>.json``
and is skipped on a rerun; a stage interrupted inside continues where it stopped (training
with ``--resume auto``, inference skipping finished images). ``--from STAGE`` redoes that stage
and the following ones (their folders are removed first); ``--until STAGE`` stops after one.
Everything a stage needs (weights, dataset root, lists, masks) is checked before the first
stage starts.

Stages, in order (:data:`STAGES`): ``transcam`` (only with ``--start imagenet`` or ``scratch``:
the TransCAM stage from ImageNet Conformer weights or from random initialisation), ``bao``
(BAO from TransCAM weights), ``pseudo_score``
(BAO pseudo-labels and maps, and TransCAM CAMs, of the scoring list), ``eval_score`` (their
mIoU and the background-threshold sweeps of TransCAM CAMs and BAO maps, with plots),
``pseudo_seg`` (pseudo-labels of the segmentation training list), ``seg_train``, ``seg_val``
(segmentation of the val list, with and without CRF, scored), ``seg_test`` (VOC: the test set
in the evaluation server's layout and archive), ``table`` (``results.md`` and ``results.json``,
beside the published figures). A protocol may add optional stages (:attr:`Protocol.extras`, the
demo's): ``cnn_score`` (the CNN CAMs before attention refinement, swept: an ablation),
``overlays`` (overlay sheets) and ``seg_upper`` (the segmentation model trained on the
ground-truth masks and scored on val: the fully supervised upper bound).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from apps.cli import DefaultsHelpFormatter, add_dataset_args, dataset_from_args, run_cli
from core.errors import UserError
from core.fileio import atomic_path
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
        seg_train_list: the segmentation model's training images (their pseudo-labels).
        seg_val_list: the segmentation model's score.
        seg_test_list: images written for an evaluation server (None: no server).
        published: row key of the results table -> the published figure.
        settings: stage -> extra flags of its entry script (the protocol's published defaults need none);
            keys: the stages, "infer" (every infer_bao.py / visual_bao.py run) and "seg_infer".
        extras: the optional stages of :data:`EXTRAS` this protocol runs.
    """

    train_list: str
    score_list: str
    seg_train_list: str
    seg_val_list: str
    seg_test_list: str | None
    published: dict[str, str]
    settings: dict[str, list[str]] = field(default_factory=dict)
    extras: tuple[str, ...] = ()


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
    parser.add_argument("--device", default="auto", help="--device of every stage")
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


def make_plan(args: argparse.Namespace, protocol: Protocol | None = None) -> Plan:
    """The run's plan; ``protocol`` overrides the dataset's table (the demo's preset)."""
    protocol = protocol or PROTOCOLS[args.dataset]
    lists = {"train": protocol.train_list, "score": protocol.score_list, "seg_train": protocol.seg_train_list,
             "seg_val": COCO_FULL_VAL if args.dataset == "coco" and args.coco_val == "full" else protocol.seg_val_list}
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
    train = ["train_bao.py", *data, "--train_list", plan.lists["train"], "--save_dir", str(plan.out(stage)),
             "--resume", "auto"]
    infer = ["infer_bao.py", *data]
    if stage in EXTRAS and stage not in plan.protocol.extras:
        return []
    if stage == "transcam":
        if a.start == "transcam":
            return []
        start = ["--from_scratch"] if a.start == "scratch" else ["--weights", str(Path(a.weights).resolve())]
        return [[*train, "--method", "transcam", *start, "--session_name", "transcam", *plan.settings("transcam")]]
    if stage == "bao":
        return [[*train, "--weights", transcam_weights(plan), "--session_name", "bao", *plan.settings("bao")]]
    if stage == "pseudo_score":
        out, settings = plan.out(stage), plan.settings("infer")
        return [[*infer, "--weights", bao_weights(plan), "--infer_list", plan.lists["score"], "--out_pred",
                 str(out / "bao_pred"), "--out_cam", str(out / "bao_cams"), *settings],
                [*infer, "--method", "transcam", "--weights", transcam_weights(plan), "--infer_list",
                 plan.lists["score"], "--out_cam", str(out / "transcam_cams"), *settings]]
    if stage == "eval_score":
        src, out = plan.out("pseudo_score"), plan.out(stage)
        return [_eval(plan, "score", "--predict_dir", str(src / "bao_pred"), "--json", str(out / "bao_pseudo.json"),
                      "--comment", "pipeline: BAO pseudo-labels"),
                _eval(plan, "score", "--type", "npy", "--bg_from_file", "--predict_dir", str(src / "bao_cams"),
                      "--json", str(out / "bao_maps.json"), "--plot", str(out / "bao_maps_sweep.png"),
                      "--comment", "pipeline: BAO maps sweep"),
                _eval(plan, "score", "--type", "npy", "--predict_dir", str(src / "transcam_cams"), "--json",
                      str(out / "transcam.json"), "--plot", str(out / "transcam_sweep.png"),
                      "--comment", "pipeline: TransCAM sweep")]
    if stage == "cnn_score":
        out = plan.out(stage)
        return [[*infer, "--method", "cnn", "--weights", transcam_weights(plan), "--infer_list", plan.lists["score"],
                 "--out_cam", str(out / "cnn_cams"), *plan.settings("infer")],
                _eval(plan, "score", "--type", "npy", "--predict_dir", str(out / "cnn_cams"), "--json",
                      str(out / "cnn.json"), "--comment", "pipeline: CNN CAM sweep (ablation)")]
    if stage == "overlays":
        return [["visual_bao.py", *data, "--weights", bao_weights(plan), "--list", plan.lists["score"], "--out_dir",
                 str(plan.out(stage)), *plan.settings("infer"), *plan.settings("overlays")]]
    if stage == "pseudo_seg":
        return [[*infer, "--weights", bao_weights(plan), "--infer_list", plan.lists["seg_train"], "--out_pred",
                 str(plan.out(stage)), *plan.settings("infer")]]
    if a.seg_from_scratch or not a.backbone_weights:  # the latter refused by check_prerequisites
        start = ["--from_scratch"]
    else:
        start = ["--backbone_weights", str(Path(a.backbone_weights).resolve())]
    seg_train = ["train_seg.py", *data, "--train_list", plan.lists["seg_train"], "--session_name", "seg",
                 "--resume", "auto", *start, *plan.settings("seg_train")]
    if stage == "seg_train":
        return [[*seg_train, "--label_dir", str(plan.out("pseudo_seg")), "--save_dir", str(plan.out(stage))]]
    seg_weights = plan.out("seg_train") / "seg" / "seg_final.pth"
    if stage == "seg_val":
        return _segment_and_score(plan, seg_weights, plan.out(stage), "segmentation val")
    if stage == "seg_upper":
        masks = dataset_from_args(a).layout.mask_folder()
        upper = plan.out(stage)
        return [[*seg_train, "--label_dir", str(masks), "--save_dir", str(upper)],
                *_segment_and_score(plan, upper / "seg" / "seg_final.pth", upper, "segmentation val, masks")]
    seg_infer = ["infer_seg.py", *data, "--weights", str(seg_weights), *plan.settings("seg_infer")]
    if stage == "seg_test":
        if "seg_test" not in plan.lists:
            return []
        return [[*seg_infer, "--infer_list", plan.lists["seg_test"], "--out_server", str(plan.out(stage))]]
    raise ValueError(f"no commands for stage {stage!r}")


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
            "seg_train": ("pseudo_seg", "seg_upper"), "seg_val": ("seg_val", "seg_upper"), "seg_test": ("seg_test",)}
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
    """(stage, "done in N s" | "partly done" | "to do") for every stage."""
    rows = []
    for stage in STAGES:
        done = _done_file(plan, stage)
        if done.is_file():
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
    cmds = [] if stage == "table" else commands(plan, stage)
    with open(log_path, "a", encoding="utf-8") as log:
        for cmd in cmds:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            if proc.wait() != 0:
                raise UserError(f"stage {stage} failed (exit {proc.returncode}); its output is in {log_path}; fix the "
                                "cause and rerun the same command, which continues from this stage")
    if stage == "table":
        write_table(plan)
    with atomic_path(_done_file(plan, stage)) as tmp:
        Path(tmp).write_text(json.dumps({"seconds": time.time() - start, "commands": cmds}, indent=1) + "\n")


ROWS = (("bao_pseudo", "BAO pseudo-labels, threshold-free", "score"),
        ("bao_maps_best", "BAO maps, best background threshold (reference)", "score"),
        ("transcam_best", "TransCAM CAMs, best background threshold (tuned on pixel labels)", "score"),
        ("transcam_fixed", f"TransCAM CAMs, fixed threshold t = {FIXED_T}", "score"),
        ("seg_val", "segmentation model on the BAO pseudo-labels", "seg_val"),
        ("seg_val_crf", "segmentation model on the BAO pseudo-labels, + CRF", "seg_val"))
# Rows of the optional stages: (key, title, list, stage).
EXTRA_ROWS = (("cnn_best", "CNN CAMs before attention refinement, best threshold (ablation)", "score", "cnn_score"),
              ("seg_upper", "segmentation model on the ground-truth masks (upper bound)", "seg_val", "seg_upper"),
              ("seg_upper_crf", "segmentation model on the ground-truth masks, + CRF (upper bound)", "seg_val",
               "seg_upper"))


def collect(plan: Plan) -> dict:
    """The results of the evaluation stages: row key -> {"miou", "t"?}."""
    def read(path: Path) -> dict:
        return json.loads(path.read_text())

    score, val = plan.out("eval_score"), plan.out("seg_val")
    transcam, maps = read(score / "transcam.json"), read(score / "bao_maps.json")
    fixed = min(transcam["sweep"], key=lambda row: abs(row["t"] - FIXED_T))
    extras = {}
    if "cnn_score" in plan.protocol.extras:
        cnn = read(plan.out("cnn_score") / "cnn.json")["best"]
        extras["cnn_best"] = {"miou": cnn["miou"], "t": cnn["t"]}
    if "seg_upper" in plan.protocol.extras:
        extras["seg_upper"] = {"miou": read(plan.out("seg_upper") / "pred.json")["result"]["miou"]}
        extras["seg_upper_crf"] = {"miou": read(plan.out("seg_upper") / "crf.json")["result"]["miou"]}
    return {
        "bao_pseudo": {"miou": read(score / "bao_pseudo.json")["result"]["miou"]},
        "bao_maps_best": {"miou": maps["best"]["miou"], "t": maps["best"]["t"]},
        "transcam_best": {"miou": transcam["best"]["miou"], "t": transcam["best"]["t"]},
        "transcam_fixed": {"miou": fixed["miou"], "t": fixed["t"]},
        "seg_val": {"miou": read(val / "pred.json")["result"]["miou"]},
        "seg_val_crf": {"miou": read(val / "crf.json")["result"]["miou"]},
        **extras,
    }


def write_table(plan: Plan) -> str:
    """``results.json`` and ``results.md`` in the run folder; returns the Markdown."""
    results = collect(plan)
    names = {k: Path(v).name for k, v in plan.lists.items()}
    lines = ["| result | list | mIoU % | threshold | published |", "|---|---|---|---|---|"]
    rows = [*ROWS, *((k, title, lst) for k, title, lst, stage in EXTRA_ROWS if stage in plan.protocol.extras)]
    for key, title, list_key in rows:
        r = results[key]
        t = f"{r['t']:.2f}" if "t" in r else "none"
        lines.append(f"| {title} | {names[list_key]} | {100 * r['miou']:.2f} | {t} | "
                     f"{plan.protocol.published.get(key, '-')} |")
    if "seg_test" in plan.lists:
        archive = plan.out("seg_test") / "results.tar.gz"
        lines.append(f"\nTest set ({names['seg_test']}): upload `{archive}` to the evaluation server; published: "
                     f"{plan.protocol.published['seg_test']}.")
    text = "\n".join(lines) + "\n"
    with atomic_path(plan.run_dir / "results.json") as tmp:
        Path(tmp).write_text(json.dumps({"lists": plan.lists, "results": results}, indent=1) + "\n")
    with atomic_path(plan.run_dir / "results.md") as tmp:
        Path(tmp).write_text(text)
    return text


def run(plan: Plan) -> None:
    """Run the stages that are not done (from ``--from``, up to ``--until``)."""
    a = plan.args
    first = STAGES.index(a.from_stage) if a.from_stage else 0
    last = STAGES.index(a.until) if a.until else len(STAGES) - 1
    if first > last:
        raise UserError(f"--from {a.from_stage} comes after --until {a.until}")
    selected = list(STAGES[:last + 1])
    todo = [s for s in selected if STAGES.index(s) >= first or not _done_file(plan, s).is_file()]
    check_prerequisites(plan, todo)
    if a.from_stage:
        for stage in STAGES[first:]:
            _done_file(plan, stage).unlink(missing_ok=True)
            shutil.rmtree(plan.out(stage), ignore_errors=True)
    for stage in selected:
        if _done_file(plan, stage).is_file():
            print(f"== {stage}: done before, skipped", flush=True)
            continue
        print(f"\n== {stage}", flush=True)
        _run_stage(plan, stage)
    if selected[-1] == "table":
        print("\n" + (plan.run_dir / "results.md").read_text())


def main(args: argparse.Namespace) -> None:
    plan = make_plan(args)
    if args.status:
        for stage, state in status(plan):
            print(f"{stage:<14} {state}")
        return
    os.makedirs(plan.run_dir, exist_ok=True)
    run(plan)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
