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
7. one table: BAO threshold-free mIoU, TransCAM at its best threshold (chosen with the
   pixel labels WSSS is not supposed to have), TransCAM at a fixed default threshold.

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
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per stage (0: all cores)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny version for tests: 16+8 images of 64 px, 1+1 epochs, small scales")
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


def apply_quick(args: argparse.Namespace) -> None:
    """Shrink everything for the CI test of the same path."""
    args.num_train, args.num_val, args.size = 16, 8, 64
    args.crop_size, args.resize_long, args.batch_size = 64, [48, 80], 8
    args.transcam_epochs, args.bao_epochs = 1, 1
    args.scales, args.sheets = "32,64", 2


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


def run_pipeline(args: argparse.Namespace) -> dict:
    """Run (or reuse) every stage and return the table's numbers as a dict."""
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
    return _collect(r, args.default_t)


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
    }


def format_table(res: dict) -> str:
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
    width = max(len(r[0]) for r in rows)
    lines = [f"{'pseudo-labels':<{width}}  {'mIoU':>6}  threshold", "-" * (width + 22)]
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
    print(f"\nDemo finished in {time.time() - start:.0f} s. Pseudo-labels of the generated {args.split} images:\n")
    print(format_table(res))
    print(f"\nSweep plot: {out / 'sweep_transcam.png'}\nOverlay sheets: {out / 'visual'}")
    return res


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
