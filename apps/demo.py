"""The whole pipeline on the generated dataset, on a laptop CPU: ``make demo``.

Stages (each runs the real entry script in a subprocess, shows its progress bar, and is
skipped when its outputs already exist, so a re-run reuses what is done):

1. generate the VOC-format dataset (apps/make_dataset.py);
2. train the TransCAM stage from scratch with the tiny Conformer (train_bao.py --method transcam);
3. train the BAO stage from it (train_bao.py --method bao);
4. threshold-free BAO pseudo-labels (infer_bao.py) and their evaluation (evaluation_bao.py);
5. TransCAM CAMs (infer_bao.py --method transcam) swept over background thresholds, with a
   plot, and the same for the CNN CAMs before attention refinement (--method cnn, an ablation);
6. a few overlay sheets (visual_bao.py);
7. the segmentation stage: a tiny DeepLab-V2 trained on the BAO pseudo-labels of the train
   images (train_seg.py) and, as the fully supervised upper bound, on their ground-truth
   masks; both segment the val images (infer_seg.py) and are scored there;
8. one table: BAO threshold-free mIoU, TransCAM at its best threshold (chosen with the
   pixel labels WSSS is not supposed to have), TransCAM at a fixed default threshold, and
   the two segmentation models.

With ``--regimes attention none`` (``--quick`` runs both) the same is repeated without
attention refinement (``--refine none``): BAO trained and applied on the maps straight from
their heads, against the CNN CAMs at their best and at a fixed threshold, in a second table.

``python -m apps.demo --help`` lists the knobs; apps/repro_demo.py repeats it over seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from apps.cli import run_cli
from core.errors import UserError
from core.fileio import atomic_path
from data.layout import REPO_ROOT

# Background score carried over when no pixel labels are available to tune it: the best
# threshold published for TransCAM on VOC (spec section 7).
DEFAULT_T = 0.44
# The values of train_bao.py --refine (network.conformer.REFINE_MODES; not imported: the demo
# process itself stays free of torch).
REGIMES = ("attention", "none")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="folder for the dataset, runs and results")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training runs (the dataset has its own)")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the generated dataset")
    parser.add_argument("--num_train", type=int, default=300, help="generated training images")
    parser.add_argument("--num_val", type=int, default=100, help="generated validation images")
    parser.add_argument("--size", type=int, default=128, help="nominal side of the generated images")
    parser.add_argument("--crop_size", type=int, default=128, help="training crop side (multiple of 16)")
    parser.add_argument("--resize_long", type=int, nargs=2, default=[96, 160], metavar=("LO", "HI"),
                        help="training resize range of the long side (scaled down from the published "
                             "320-640 with the image size)")
    parser.add_argument("--batch_size", type=int, default=16, help="training batch size")
    parser.add_argument("--transcam_epochs", type=int, default=30, help="epochs of the TransCAM stage")
    parser.add_argument("--transcam_lr", type=float, default=1e-3,
                        help="learning rate of the TransCAM stage (from scratch, so larger than the "
                             "published fine-tuning rate)")
    parser.add_argument("--bao_epochs", type=int, default=10, help="epochs of the BAO stage (published: 10)")
    parser.add_argument("--bao_lr", type=float, default=1e-4, help="learning rate of the BAO stage")
    parser.add_argument("--scales", default="96,128,192",
                        help="inference scales (the published 256,512,768 scaled to the image size)")
    parser.add_argument("--split", default="train", choices=["train", "val"],
                        help="images whose pseudo-labels are made and scored (published: train)")
    parser.add_argument("--default_t", type=float, default=DEFAULT_T,
                        help="fixed background threshold for the TransCAM row that tunes nothing")
    parser.add_argument("--sheets", type=int, default=4, help="overlay sheets to draw")
    parser.add_argument("--seg_iters", type=int, default=600, help="iterations of each segmentation training")
    parser.add_argument("--seg_batch", type=int, default=8, help="batch size of the segmentation training")
    parser.add_argument("--seg_crop", type=int, default=96, help="crop side of the segmentation training")
    parser.add_argument("--seg_lr", type=float, default=0.01,
                        help="base learning rate of the segmentation training (from scratch, so larger than "
                             "the recipe's 2.5e-4 for ImageNet fine-tuning)")
    parser.add_argument("--seg_scales", default="0.5,0.75,1.0,1.25,1.5",
                        help="segmentation inference scales, each with its flip (the recipe's)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per stage (0: all cores)")
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=None,
                        help="refinement regimes: attention (published; the main table and the segmentation "
                             "stage, always run) and none (--refine none: BAO trained and applied without "
                             "attention refinement, against the CNN CAMs; a second table) (default: attention; "
                             "with --quick: attention none)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny version for tests: 16+8 images of 64 px, 1+1 epochs, small scales, both "
                             "regimes")
    return parser


@dataclass
class Paths:
    """Where the demo keeps everything, under ``--out``."""

    out: Path
    seed: int

    @property
    def data(self) -> Path:
        return self.out / "data" / "VOC2012"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def results(self) -> Path:
        return self.out / f"seed{self.seed}"


@dataclass(frozen=True)
class Variant:
    """A variation of the BAO stage without attention refinement, for apps/repro_demo.py's
    experiments; its run is ``bao_none_<name>_s<seed>``, its results ``refine_none_<name>/``."""

    name: str
    epochs: int | None = None  # BAO epochs; None: --bao_epochs
    flags: tuple[str, ...] = ()  # more train_bao.py flags

    @property
    def suffix(self) -> str:
        """``_<name>``; empty for the regime's own run (name "")."""
        return f"_{self.name}" if self.name else ""


def apply_quick(args: argparse.Namespace) -> None:
    """Shrink everything for the CI test of the same path."""
    args.num_train, args.num_val, args.size = 16, 8, 64
    args.crop_size, args.resize_long, args.batch_size = 64, [48, 80], 8
    args.transcam_epochs, args.bao_epochs = 1, 1
    args.scales, args.sheets = "32,64", 2
    args.seg_iters, args.seg_batch, args.seg_crop, args.seg_scales = 2, 4, 48, "1.0"
    args.regimes = args.regimes or list(REGIMES)


def _run(stage: str, cmd: list[str], threads: int) -> None:
    """Run one stage's entry script; its own progress bar goes straight to the terminal."""
    print(f"\n== {stage}", flush=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.time()
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO_ROOT, env=env)
    if proc.returncode != 0:
        raise UserError(f"demo stage '{stage}' failed (exit {proc.returncode}); see its message above")
    print(f"   {stage}: {time.time() - start:.0f} s", flush=True)


def _skip(stage: str, done: Path) -> bool:
    if done.exists():
        print(f"\n== {stage}: done before ({done}), reused", flush=True)
        return True
    return False


def run_pipeline(args: argparse.Namespace, variants: tuple[Variant, ...] = ()) -> dict:
    """Run (or reuse) every stage and return the table's numbers as a dict (the regime without
    attention refinement, when run, under ``"refine_none"``, each of its ``variants`` under
    ``"refine_none_<name>"``)."""
    regimes = args.regimes or ["attention"]
    if "attention" not in regimes:
        raise UserError("--regimes must include attention: the published regime makes the main table and the "
                        "segmentation stage; none is run beside it (--regimes attention none)")
    p = Paths(Path(args.out).resolve(), args.seed)
    labels = p.data / "cls_labels.json"
    train_list = p.data / "ImageSets" / "Segmentation" / f"{args.split}.txt"
    data_flags = ["--voc12_root", str(p.data), "--label_file", str(labels)]
    train_flags = [*data_flags, "--arch", "tiny", "--train_list", str(p.data / "ImageSets/Segmentation/train.txt"),
                   "--crop_size", str(args.crop_size), "--resize_long", *map(str, args.resize_long),
                   "--batch_size", str(args.batch_size), "--num_workers", "1", "--seed", str(args.seed),
                   "--save_dir", str(p.runs), "--resume", "auto", "--log_every", "50"]
    infer_flags = [*data_flags, "--arch", "tiny", "--scales", args.scales, "--batch_size", "16",
                   "--num_workers", "1"]
    eval_flags = ["--gt_dir", str(p.data / "SegmentationClass"), "--list", str(train_list),
                  "--label_file", str(labels), "--logfile", str(p.out / "eval_log.txt")]

    if not _skip("dataset", labels):
        _run("dataset", ["-m", "apps.make_dataset", "--out", str(p.data), "--num_train", str(args.num_train),
                         "--num_val", str(args.num_val), "--size", str(args.size), "--seed", str(args.data_seed),
                         "--overwrite"], args.threads)

    tc_name = f"transcam_s{args.seed}"
    # The published names count epochs from 0: the last of N epochs is "_{N-1}epochs".
    tc_weights = p.runs / tc_name / f"{tc_name}_{args.transcam_epochs - 1}epochs.pth"
    if not _skip("TransCAM stage (from scratch)", tc_weights):
        _run("TransCAM stage (from scratch)",
             ["train_bao.py", "--method", "transcam", "--from_scratch", "--session_name", tc_name,
              "--max_epoches", str(args.transcam_epochs), "--lr", str(args.transcam_lr), *train_flags], args.threads)

    bao_name = f"bao_s{args.seed}"
    bao_weights = p.runs / bao_name / f"{bao_name}_{args.bao_epochs - 1}epochs_modelt.pth"
    if not _skip("BAO stage", bao_weights):
        _run("BAO stage", ["train_bao.py", "--method", "bao", "--weights", str(tc_weights), "--session_name",
                           bao_name, "--max_epoches", str(args.bao_epochs), "--lr", str(args.bao_lr), *train_flags],
             args.threads)

    r = p.results
    # infer_bao skips images whose outputs exist, so these two stages resume by themselves.
    _run("BAO pseudo-labels (no threshold)",
         ["infer_bao.py", "--method", "bao", "--weights", str(bao_weights), "--infer_list", str(train_list),
          "--out_pred", str(r / "bao_pred"), "--out_cam", str(r / "bao_cams"), *infer_flags], args.threads)
    _run("TransCAM CAMs", ["infer_bao.py", "--method", "transcam", "--weights", str(tc_weights),
                           "--infer_list", str(train_list), "--out_cam", str(r / "transcam_cams"), *infer_flags],
         args.threads)
    _run("CNN CAMs before attention refinement (ablation)",
         ["infer_bao.py", "--method", "cnn", "--weights", str(tc_weights), "--infer_list", str(train_list),
          "--out_cam", str(r / "cnn_cams"), *infer_flags], args.threads)

    _run("evaluate BAO pseudo-labels",
         ["evaluation_bao.py", "--type", "png", "--predict_dir", str(r / "bao_pred"), "--json",
          str(r / "eval_bao.json"), "--comment", f"demo seed {args.seed}: BAO threshold-free", *eval_flags],
         args.threads)
    bao = json.loads((r / "eval_bao.json").read_text())["result"]["miou"]
    _run("sweep TransCAM CAMs over background thresholds",
         ["evaluation_bao.py", "--type", "npy", "--predict_dir", str(r / "transcam_cams"), "--json",
          str(r / "eval_transcam.json"), "--plot", str(r / "sweep_transcam.png"), "--ref_miou", f"{100 * bao:.4f}",
          "--comment", f"demo seed {args.seed}: TransCAM sweep", "--no_progress", *eval_flags], args.threads)
    _run("sweep BAO maps over background thresholds (reference)",
         ["evaluation_bao.py", "--type", "npy", "--bg_from_file", "--predict_dir", str(r / "bao_cams"), "--json",
          str(r / "eval_bao_maps.json"), "--comment", f"demo seed {args.seed}: BAO maps sweep", "--no_progress",
          *eval_flags], args.threads)
    _run("sweep CNN CAMs over background thresholds (ablation)",
         ["evaluation_bao.py", "--type", "npy", "--predict_dir", str(r / "cnn_cams"), "--json",
          str(r / "eval_cnn.json"), "--comment", f"demo seed {args.seed}: CNN CAM sweep", "--no_progress",
          *eval_flags], args.threads)
    _run("overlay sheets", ["visual_bao.py", "--weights", str(bao_weights), "--list", str(train_list),
                            "--max_images", str(args.sheets), "--out_dir", str(r / "visual"), *infer_flags],
         args.threads)
    _segmentation_stage(args, p, train_list, infer_flags)
    res = _collect(r, args.default_t)
    for variant in ([Variant("")] if "none" in regimes else []) + list(variants):
        res[f"refine_none{variant.suffix}"] = _refine_none_regime(
            args, p, tc_weights, train_flags, infer_flags, eval_flags, train_list, variant)
    return res


def _segmentation_stage(args: argparse.Namespace, p: Paths, pseudo_list: Path, infer_flags: list[str]) -> None:
    """Train the tiny segmentation model on BAO pseudo-labels and on the masks; score both on val."""
    r = p.results
    train_list = p.data / "ImageSets" / "Segmentation" / "train.txt"
    val_list = p.data / "ImageSets" / "Segmentation" / "val.txt"
    data_flags = ["--voc12_root", str(p.data), "--label_file", str(p.data / "cls_labels.json")]
    pseudo = r / "bao_pred"
    if pseudo_list != train_list:  # the segmentation model trains on the train images' pseudo-labels
        pseudo = r / "bao_pred_train"
        bao_weights = p.runs / f"bao_s{args.seed}" / f"bao_s{args.seed}_{args.bao_epochs - 1}epochs_modelt.pth"
        _run("BAO pseudo-labels of the train images",
             ["infer_bao.py", "--method", "bao", "--weights", str(bao_weights), "--infer_list", str(train_list),
              "--out_pred", str(pseudo), *infer_flags], args.threads)
    for kind, label_dir, what in (("bao", pseudo, "BAO pseudo-labels"),
                                  ("gt", p.data / "SegmentationClass", "ground-truth masks (upper bound)")):
        name = f"seg_{kind}_s{args.seed}"
        weights = p.runs / name / f"{name}_final.pth"
        stage = f"segmentation model on {what}"
        if not _skip(stage, weights):
            _run(stage, ["train_seg.py", *data_flags, "--label_dir", str(label_dir), "--train_list", str(train_list),
                         "--backbone", "tiny", "--bn", "train", "--from_scratch", "--max_iters", str(args.seg_iters),
                         "--batch_size", str(args.seg_batch), "--crop_size", str(args.seg_crop), "--lr",
                         str(args.seg_lr), "--num_workers", "1", "--seed", str(args.seed), "--session_name", name,
                         "--save_dir", str(p.runs), "--resume", "auto", "--log_every", "50"], args.threads)
        _run(f"segment the val images ({what})",
             ["infer_seg.py", *data_flags, "--weights", str(weights), "--backbone", "tiny", "--infer_list",
              str(val_list), "--scales", args.seg_scales, "--out_pred", str(r / f"seg_{kind}_val"),
              "--num_workers", "1"], args.threads)
        _run(f"evaluate the segmentation model on {what}",
             ["evaluation_bao.py", "--type", "png", "--predict_dir", str(r / f"seg_{kind}_val"), "--gt_dir",
              str(p.data / "SegmentationClass"), "--list", str(val_list), "--label_file",
              str(p.data / "cls_labels.json"), "--logfile", str(p.out / "eval_log.txt"), "--json",
              str(r / f"eval_seg_{kind}.json"), "--comment", f"demo seed {args.seed}: segmentation on {what}",
              "--no_progress"], args.threads)


def _refine_none_regime(args: argparse.Namespace, p: Paths, tc_weights: Path, train_flags: list[str],
                        infer_flags: list[str], eval_flags: list[str], pseudo_list: Path, variant: Variant) -> dict:
    """The regime without attention refinement (``--refine none``), or a ``variant`` of its BAO
    stage; its results as a dict.

    BAO is trained from the same TransCAM weights with its teacher CAMs, its activation map and
    its pseudo-labels unrefined, and compared with the CNN CAMs, which are the TransCAM CAMs
    unrefined (``--method cnn``). The TransCAM stage itself is shared with the attention
    regime: its loss reads only the logits, which refinement does not touch, so a ``--refine
    none`` run trains the same weights (tests/test_train.py checks it).
    """
    r = p.results / f"refine_none{variant.suffix}"
    none = ["--refine", "none"]
    name = f"bao_none{variant.suffix}_s{args.seed}"
    epochs = variant.epochs or args.bao_epochs
    weights = p.runs / name / f"{name}_{epochs - 1}epochs_modelt.pth"
    stage = f"BAO stage without attention refinement{f' ({variant.name})' if variant.name else ''}"
    if not _skip(stage, weights):
        _run(stage, ["train_bao.py", "--method", "bao", *none, "--weights", str(tc_weights), "--session_name", name,
                     "--max_epoches", str(epochs), "--lr", str(args.bao_lr), *variant.flags, *train_flags],
             args.threads)
    _run("BAO pseudo-labels without attention refinement (no threshold)",
         ["infer_bao.py", "--method", "bao", *none, "--weights", str(weights), "--infer_list", str(pseudo_list),
          "--out_pred", str(r / "bao_pred"), "--out_cam", str(r / "bao_cams"), *infer_flags], args.threads)
    what = f"--refine none{variant.suffix}"
    _run("evaluate BAO pseudo-labels without attention refinement",
         ["evaluation_bao.py", "--type", "png", "--predict_dir", str(r / "bao_pred"), "--json",
          str(r / "eval_bao.json"), "--comment", f"demo seed {args.seed}: BAO threshold-free, {what}",
          *eval_flags], args.threads)
    bao = json.loads((r / "eval_bao.json").read_text())["result"]["miou"]
    _run("sweep CNN CAMs over background thresholds, against BAO without attention refinement",
         ["evaluation_bao.py", "--type", "npy", "--predict_dir", str(p.results / "cnn_cams"), "--json",
          str(r / "eval_cnn.json"), "--plot", str(r / "sweep_cnn.png"), "--ref_miou", f"{100 * bao:.4f}",
          "--comment", f"demo seed {args.seed}: CNN CAM sweep", "--no_progress", *eval_flags], args.threads)
    _run("sweep BAO maps without attention refinement over background thresholds (reference)",
         ["evaluation_bao.py", "--type", "npy", "--bg_from_file", "--predict_dir", str(r / "bao_cams"), "--json",
          str(r / "eval_bao_maps.json"), "--comment", f"demo seed {args.seed}: BAO maps sweep, {what}",
          "--no_progress", *eval_flags], args.threads)
    _run("overlay sheets without attention refinement",
         ["visual_bao.py", *none, "--weights", str(weights), "--list", str(pseudo_list), "--max_images",
          str(args.sheets), "--out_dir", str(r / "visual"), *infer_flags], args.threads)
    cnn = json.loads((r / "eval_cnn.json").read_text())
    maps = json.loads((r / "eval_bao_maps.json").read_text())
    fixed = min(cnn["sweep"], key=lambda row: abs(row["t"] - args.default_t))
    return {"bao_miou": bao, "cnn_best_miou": cnn["best"]["miou"], "cnn_best_t": cnn["best"]["t"],
            "cnn_fixed_miou": fixed["miou"], "cnn_fixed_t": fixed["t"],
            "bao_maps_best_miou": maps["best"]["miou"], "bao_maps_best_t": maps["best"]["t"]}


def _collect(r: Path, default_t: float) -> dict:
    tc = json.loads((r / "eval_transcam.json").read_text())
    maps = json.loads((r / "eval_bao_maps.json").read_text())
    cnn = json.loads((r / "eval_cnn.json").read_text())
    fixed = min(tc["sweep"], key=lambda row: abs(row["t"] - default_t))
    return {
        "bao_miou": json.loads((r / "eval_bao.json").read_text())["result"]["miou"],
        "transcam_best_miou": tc["best"]["miou"], "transcam_best_t": tc["best"]["t"],
        "transcam_fixed_miou": fixed["miou"], "transcam_fixed_t": fixed["t"],
        "bao_maps_best_miou": maps["best"]["miou"], "bao_maps_best_t": maps["best"]["t"],
        "cnn_best_miou": cnn["best"]["miou"], "cnn_best_t": cnn["best"]["t"],
        "seg_bao_miou": json.loads((r / "eval_seg_bao.json").read_text())["result"]["miou"],
        "seg_gt_miou": json.loads((r / "eval_seg_gt.json").read_text())["result"]["miou"],
    }


def format_table(res: dict, split: str = "train") -> str:
    """The demo's result table (mIoU in percent)."""
    rows = [
        ("BAO pseudo-labels, threshold-free", res["bao_miou"], "none"),
        ("TransCAM CAMs, best threshold (tuned on pixel labels)", res["transcam_best_miou"],
         f"t = {res['transcam_best_t']:.2f}"),
        ("TransCAM CAMs, fixed default threshold", res["transcam_fixed_miou"], f"t = {res['transcam_fixed_t']:.2f}"),
        ("BAO maps, best threshold (reference)", res["bao_maps_best_miou"], f"t = {res['bao_maps_best_t']:.2f}"),
        ("CNN CAMs before attention refinement, best threshold (ablation)", res["cnn_best_miou"],
         f"t = {res['cnn_best_t']:.2f}"),
    ]
    seg = [("Segmentation model trained on BAO pseudo-labels", res["seg_bao_miou"]),
           ("Segmentation model trained on ground-truth masks (upper bound)", res["seg_gt_miou"])]
    width = max(len(r[0]) for r in rows + seg)
    lines = [f"{'pseudo-labels of the ' + split + ' images':<{width}}  {'mIoU':>6}  threshold", "-" * (width + 22)]
    lines += [f"{name:<{width}}  {100 * v:6.2f}  {t}" for name, v, t in rows]
    lines += ["", f"{'segmentation of the val images':<{width}}  {'mIoU':>6}", "-" * (width + 8)]
    lines += [f"{name:<{width}}  {100 * v:6.2f}" for name, v in seg]
    return "\n".join(lines)


def format_refine_none_table(res: dict, split: str = "train") -> str:
    """The table of the regime without attention refinement (``run_pipeline``'s ``"refine_none"``; mIoU in percent)."""
    rows = [
        ("BAO pseudo-labels, threshold-free", res["bao_miou"], "none"),
        ("CNN CAMs (TransCAM CAMs unrefined), best threshold (tuned on pixel labels)", res["cnn_best_miou"],
         f"t = {res['cnn_best_t']:.2f}"),
        ("CNN CAMs, fixed default threshold", res["cnn_fixed_miou"], f"t = {res['cnn_fixed_t']:.2f}"),
        ("BAO maps, best threshold (reference)", res["bao_maps_best_miou"], f"t = {res['bao_maps_best_t']:.2f}"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"pseudo-labels of the {split} images without attention refinement (--refine none)",
             f"{'':<{width}}  {'mIoU':>6}  threshold", "-" * (width + 22)]
    lines += [f"{name:<{width}}  {100 * v:6.2f}  {t}" for name, v, t in rows]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    if args.quick:
        apply_quick(args)
    start = time.time()
    res = run_pipeline(args)
    out = Paths(Path(args.out).resolve(), args.seed).results
    with atomic_path(out / "table.json") as tmp:
        Path(tmp).write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nDemo finished in {time.time() - start:.0f} s.\n")
    print(format_table(res, args.split))
    print(f"\nSweep plot: {out / 'sweep_transcam.png'}\nOverlay sheets: {out / 'visual'}")
    if "refine_none" in res:
        none = out / "refine_none"
        print(f"\n{format_refine_none_table(res['refine_none'], args.split)}")
        print(f"\nSweep plot: {none / 'sweep_cnn.png'}\nOverlay sheets: {none / 'visual'}")
    return res


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
