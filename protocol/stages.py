"""The stage table: every stage of the protocol as one record (:class:`protocol.plan.Stage`), in order.

:data:`STAGE_TABLE` is the one place a stage is defined: its name, scripts and command lines, the
lists (and masks) it reads, whether it is shared by the seeds, what it needs first, the settings
keys it takes, what it writes for the results table and whether it is optional. The runner
(protocol/pipeline.py), ``--status``, the prerequisite check, the results (protocol/results.py),
the protocol-file schema (through :data:`EXTRAS` and :data:`SETTING_KEYS`) and the demo read it.

Adding a stage is adding a record here (and, when it scores something, its rows to
protocol/rows.py); a plan may also be made with another table (``make_plan(..., stages=...)``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from apps.cli import dataset_from_args
from protocol.plan import Figure, Plan, Stage, cams_name
from tool.training import weights_prefix

# ---------------------------------------------------------------------------- command-line parts


def _data_flags(plan: Plan) -> list[str]:
    args = plan.args
    flags = ["--dataset", args.dataset, "--device", args.device]
    for name in ("voc12_root", "coco_root", "coco_mask_dir", "label_file"):
        value = getattr(args, name)
        if value:
            flags += [f"--{name}", str(Path(value).resolve())]
    return flags


def _crf_flags(plan: Plan) -> list[str]:
    """``--crf_backend`` of the stages that run a CRF; left out at its default (auto), so that the
    default command lines are those of the scripts' own defaults."""
    return [] if plan.args.crf_backend == "auto" else ["--crf_backend", plan.args.crf_backend]


def _label_flags(args: argparse.Namespace) -> list[str]:
    """Evaluation's classes: the label file's when one is given, else the dataset's."""
    if args.label_file:
        return ["--label_file", str(Path(args.label_file).resolve())]
    return ["--dataset", args.dataset]


def _eval(plan: Plan, list_key: str, *flags: str) -> list[str]:
    gt_dir = str(dataset_from_args(plan.args).layout.mask_folder().resolve())
    return ["evaluation_bao.py", "--gt_dir", gt_dir, "--list", plan.lists[list_key], "--logfile",
            str(plan.run_dir / "eval_log.txt"), "--no_progress", *_label_flags(plan.args), *flags]


def _seed(plan: Plan) -> list[str]:
    return [] if plan.seed is None else ["--seed", str(plan.seed)]


def _refine(plan: Plan) -> list[str]:
    return ["--refine", plan.args.refine]


def _train_bao(plan: Plan, stage: str) -> list[str]:
    """train_bao.py's command line shared by both training stages, up to the stage's own flags."""
    return ["train_bao.py", *_data_flags(plan), *_refine(plan), "--train_list", plan.lists["train"], "--save_dir",
            str(plan.out(stage)), "--resume", "auto", *plan.settings("train"), *_seed(plan)]


def transcam_weights(plan: Plan) -> str:
    """The TransCAM weights BAO starts from: the given ones, or the TransCAM stage's last epoch."""
    if plan.args.start == "transcam":
        return str(Path(plan.args.weights or "").resolve())
    return str(_final_weights(plan, "transcam"))


def bao_weights(plan: Plan) -> str:
    """The BAO stage's last epoch: the teacher's weights."""
    return str(_final_weights(plan, "bao"))


def _final_weights(plan: Plan, stage: str) -> Path:
    """The weights of the last epoch that the training ``stage`` writes, named from its command line (its
    session and epoch count) as train_bao.py names them, before the stage runs: the command lines of a
    run are known in full before its first stage (``--print_commands``, every node of a run alike)."""
    import train_bao

    (cmd,) = plan.stage(stage).commands(plan)
    run, _ = train_bao.get_args_parser().parse_known_args(cmd[1:])  # an unknown flag: check_commands says so
    epochs, session = run.max_epoches or train_bao.DEFAULT_EPOCHS[run.method], run.session_name or run.method
    name = weights_prefix(session, epochs - 1) + ("_modelt.pth" if run.method == "bao" else ".pth")
    return Path(run.save_dir) / session / name


def _bao_line(plan: Plan) -> list[str]:
    """``--ref_miou``: BAO's threshold-free mIoU as a line on a sweep plot (once pseudo_score scored it)."""
    path = plan.out("pseudo_score") / "bao_pseudo.json"
    if not path.is_file():
        return []
    return ["--ref_miou", f"{100 * json.loads(path.read_text())['result']['miou']:.4f}"]


def _train_seg(plan: Plan) -> list[str]:
    """train_seg.py's command line of both segmentation trainings, up to the labels and folder."""
    a = plan.args
    if a.seg_from_scratch or not a.backbone_weights:  # the latter refused by check_prerequisites
        start = ["--from_scratch"]
    else:
        start = ["--backbone_weights", str(Path(a.backbone_weights).resolve())]
    return ["train_seg.py", *_data_flags(plan), "--train_list", plan.lists["seg_train"], "--session_name", "seg",
            "--resume", "auto", *start, *plan.settings("seg_train"), *_seed(plan)]


def _segment_and_score(plan: Plan, weights: Path, out: Path, what: str) -> list[list[str]]:
    """Segment the val list with ``weights`` (with and without CRF) and score both."""
    return [["infer_seg.py", *_data_flags(plan), "--weights", str(weights), *plan.settings("seg_infer"),
             "--infer_list", plan.lists["seg_val"], "--out_pred", str(out / "pred"), "--out_crf", str(out / "crf"),
             *_crf_flags(plan)],
            _eval(plan, "seg_val", "--predict_dir", str(out / "pred"), "--json", str(out / "pred.json"),
                  "--comment", f"pipeline: {what}"),
            _eval(plan, "seg_val", "--predict_dir", str(out / "crf"), "--json", str(out / "crf.json"),
                  "--comment", f"pipeline: {what} + CRF")]


def _seg_weights(plan: Plan) -> Path:
    return plan.out("seg_train") / "seg" / "seg_final.pth"


# ------------------------------------------------------------------------- each stage's commands


def _transcam(plan: Plan) -> list[list[str]]:
    a = plan.args
    start = ["--from_scratch"] if a.start == "scratch" else ["--weights", str(Path(a.weights or "").resolve())]
    return [[*_train_bao(plan, "transcam"), "--method", "transcam", *start, "--session_name", "transcam",
             *plan.settings("transcam")]]


def _bao(plan: Plan) -> list[list[str]]:
    return [[*_train_bao(plan, "bao"), "--weights", transcam_weights(plan), "--session_name", "bao",
             *plan.settings("bao")]]


def _pseudo_score(plan: Plan) -> list[list[str]]:
    out, settings, infer = plan.out("pseudo_score"), plan.settings("infer"), ["infer_bao.py", *_data_flags(plan)]
    return [[*infer, *_refine(plan), "--weights", bao_weights(plan), "--infer_list", plan.lists["score"],
             "--out_pred", str(out / "bao_pred"), "--out_cam", str(out / "bao_cams"), *settings],
            _eval(plan, "score", "--predict_dir", str(out / "bao_pred"), "--json", str(out / "bao_pseudo.json"),
                  "--comment", "pipeline: BAO pseudo-labels"),
            [*infer, *_refine(plan), "--method", "transcam", "--weights", transcam_weights(plan),
             "--infer_list", plan.lists["score"], "--out_cam", str(out / "transcam_cams"), *settings]]


def _eval_score(plan: Plan) -> list[list[str]]:
    src, out = plan.out("pseudo_score"), plan.out("eval_score")
    return [_eval(plan, "score", "--type", "npy", "--bg_from_file", "--predict_dir", str(src / "bao_cams"),
                  "--json", str(out / "bao_maps.json"), "--plot", str(out / "bao_maps_sweep.png"),
                  "--comment", "pipeline: BAO maps sweep", "--no_progress"),
            _eval(plan, "score", "--type", "npy", "--predict_dir", str(src / "transcam_cams"), "--json",
                  str(out / "transcam.json"), "--plot", str(out / "transcam_sweep.png"), *_bao_line(plan),
                  "--comment", f"pipeline: {cams_name(plan)} sweep", "--no_progress")]


def _cnn_score(plan: Plan) -> list[list[str]]:
    out = plan.out("cnn_score")
    line = [] if plan.shared("cnn_score") else _bao_line(plan)  # one seed's BAO line would not fit the others
    return [["infer_bao.py", *_data_flags(plan), "--method", "cnn", "--weights", transcam_weights(plan),
             "--infer_list", plan.lists["score"], "--out_cam", str(out / "cnn_cams"), *plan.settings("infer")],
            _eval(plan, "score", "--type", "npy", "--predict_dir", str(out / "cnn_cams"), "--json",
                  str(out / "cnn.json"), "--plot", str(out / "cnn_sweep.png"), *line,
                  "--comment", "pipeline: CNN CAM sweep (ablation)", "--no_progress")]


def _overlays(plan: Plan) -> list[list[str]]:
    return [["visual_bao.py", *_data_flags(plan), *_refine(plan), "--weights", bao_weights(plan), "--list",
             plan.lists["score"], "--out_dir", str(plan.out("overlays")), *plan.settings("infer"),
             *plan.settings("overlays")]]


def _pseudo_seg(plan: Plan) -> list[list[str]]:
    return [["infer_bao.py", *_data_flags(plan), *_refine(plan), "--weights", bao_weights(plan),
             "--infer_list", plan.lists["seg_train"], "--out_pred", str(plan.out("pseudo_seg")),
             *plan.settings("infer")]]


def seg_labels(plan: Plan) -> Path:
    """The pseudo-labels the segmentation model trains on: the scoring list's when the lists are one."""
    return plan.out("pseudo_seg") if plan.runs("pseudo_seg") else plan.out("pseudo_score") / "bao_pred"


def _seg_train(plan: Plan) -> list[list[str]]:
    return [[*_train_seg(plan), "--label_dir", str(seg_labels(plan)), "--save_dir", str(plan.out("seg_train"))]]


def _seg_val(plan: Plan) -> list[list[str]]:
    return _segment_and_score(plan, _seg_weights(plan), plan.out("seg_val"), "segmentation val")


def _seg_upper(plan: Plan) -> list[list[str]]:
    masks, upper = dataset_from_args(plan.args).layout.mask_folder().resolve(), plan.out("seg_upper")
    return [[*_train_seg(plan), "--label_dir", str(masks), "--save_dir", str(upper)],
            *_segment_and_score(plan, upper / "seg" / "seg_final.pth", upper, "segmentation val, masks")]


def _seg_test(plan: Plan) -> list[list[str]]:
    return [["infer_seg.py", *_data_flags(plan), "--weights", str(_seg_weights(plan)), *plan.settings("seg_infer"),
             "--infer_list", plan.lists["seg_test"], "--out_server", str(plan.out("seg_test")), *_crf_flags(plan)]]


def _no_commands(plan: Plan) -> list[list[str]]:
    return []


# ------------------------------------------------------------------------------- the conditions


def _trains_transcam(plan: Plan) -> bool:
    """The TransCAM stage runs unless TransCAM weights are given."""
    return plan.args.start != "transcam"


def _own_seg_labels(plan: Plan) -> bool:
    """Segmentation training labels of their own: the scoring list's are reused when the lists are one."""
    return plan.lists["seg_train"] != plan.lists["score"]


def _of_given_transcam_weights(plan: Plan) -> bool:
    """Common to the seeds: the given TransCAM weights, which no seed trains."""
    return plan.args.start == "transcam"


# --------------------------------------------------------------------------------------- the table

STAGE_TABLE: tuple[Stage, ...] = (
    Stage("transcam", ("train_bao.py",), _transcam, ranked=("train_bao.py",), trains=True, reads=("train",),
          when=_trains_transcam, needs=("weights",), settings=("train", "transcam")),
    Stage("bao", ("train_bao.py",), _bao, ranked=("train_bao.py",), trains=True, reads=("train",), needs=("weights",),
          settings=("train", "bao")),
    Stage("pseudo_score", ("infer_bao.py", "evaluation_bao.py"), _pseudo_score, ranked=("infer_bao.py",),
          reads=("score",), masks=("score",), needs=("transcam_weights",), settings=("infer",),
          figures=(Figure("bao_pseudo", "bao_pseudo.json", "result"),)),
    Stage("eval_score", ("evaluation_bao.py",), _eval_score, reads=("score",), masks=("score",),
          figures=(Figure("bao_maps_best", "bao_maps.json", "best"), Figure("transcam_best", "transcam.json", "best"),
                   Figure("transcam_fixed", "transcam.json", "fixed"))),
    Stage("cnn_score", ("infer_bao.py", "evaluation_bao.py"), _cnn_score, ranked=("infer_bao.py",), reads=("score",),
          masks=("score",), shared=_of_given_transcam_weights, needs=("transcam_weights",), settings=("infer",),
          figures=(Figure("cnn_best", "cnn.json", "best"),), extra=True),
    Stage("overlays", ("visual_bao.py",), _overlays, reads=("score",), settings=("infer", "overlays"), extra=True),
    Stage("pseudo_seg", ("infer_bao.py",), _pseudo_seg, ranked=("infer_bao.py",), reads=("seg_train",),
          when=_own_seg_labels, settings=("infer",),
          absent="not in this run (the scoring list's pseudo-labels are reused)"),
    Stage("seg_train", ("train_seg.py",), _seg_train, ranked=("train_seg.py",), trains=True, reads=("seg_train",),
          needs=("backbone",), settings=("seg_train",)),
    Stage("seg_val", ("infer_seg.py", "evaluation_bao.py"), _seg_val, ranked=("infer_seg.py",), reads=("seg_val",),
          masks=("seg_val",), settings=("seg_infer",),
          figures=(Figure("seg_val", "pred.json", "result"), Figure("seg_val_crf", "crf.json", "result"))),
    Stage("seg_upper", ("train_seg.py", "infer_seg.py", "evaluation_bao.py"), _seg_upper,
          ranked=("train_seg.py", "infer_seg.py"), trains=True, reads=("seg_train", "seg_val"),
          masks=("seg_train", "seg_val"), needs=("backbone",), settings=("seg_train", "seg_infer"),
          figures=(Figure("seg_upper", "pred.json", "result"), Figure("seg_upper_crf", "crf.json", "result")),
          extra=True),
    Stage("seg_test", ("infer_seg.py",), _seg_test, ranked=("infer_seg.py",), reads=("seg_test",),
          settings=("seg_infer",), upload="results.tar.gz"),
    Stage("table", (), _no_commands, writes_results=True),
)

STAGES = tuple(s.name for s in STAGE_TABLE)  # the names, in order

EXTRAS = tuple(s.name for s in STAGE_TABLE if s.extra)  # run only when the protocol names them

SETTING_KEYS = tuple(dict.fromkeys(k for s in STAGE_TABLE for k in s.settings))  # the protocol's settings keys
