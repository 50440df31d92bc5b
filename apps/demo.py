"""The whole pipeline on the generated dataset, on a laptop CPU: ``make demo``.

The demo is the protocol runner's small preset (apps/pipeline.py, the code path of a real
run, with settings scaled to a CPU and a few hundred images of about 128 px):

1. generate the VOC-format dataset (apps/make_dataset.py), once;
2. run the protocol on it (``<out>/seed<S>/attention``): the TransCAM stage from scratch with
   the tiny Conformer, the BAO stage from it, the threshold-free BAO pseudo-labels of the
   train images and their mIoU, the background-threshold sweeps of the TransCAM CAMs and the
   BAO maps (plots), the CNN CAMs before attention refinement (an ablation), overlay sheets, a
   tiny DeepLab-V2 trained on the BAO pseudo-labels and, as the fully supervised upper bound,
   on the ground-truth masks, both segmenting the val images (with and without CRF), scored;
3. the runner's table: BAO threshold-free, TransCAM at its best threshold (chosen with the
   pixel labels WSSS is not supposed to have), TransCAM at a fixed default threshold, BAO maps
   and CNN CAMs at their best thresholds, and the segmentation rows.

With ``--regimes attention none`` (``--quick`` runs both) the runner runs again without
attention refinement (``--refine none``, ``<out>/seed<S>/refine_none``) from the same TransCAM
weights, up to the pseudo-labels: BAO trained and applied on the maps straight from their
heads, against the CNN CAMs at their best and at a fixed threshold, in a second table.

Every stage is the runner's, so a rerun skips what is done and ``python -m apps.pipeline
--run_dir demo_out/seed0/attention --status`` shows where a run stands. ``python -m apps.demo
--help`` lists the knobs; apps/repro_demo.py repeats the demo over seeds.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from apps import pipeline
from apps.cli import add_generated_dataset_args, add_stages_device_arg, run_cli
from apps.make_dataset import generate_once
from core.errors import UserError
from core.fileio import atomic_path
from core.runlock import RunLock

# The values of train_bao.py --refine (network.conformer.REFINE_MODES, which tests/test_demo.py
# checks), spelled out so that --help needs no model import.
REGIMES = ("attention", "none")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="folder for the dataset, runs and results")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training runs (the dataset has its own)")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the generated dataset")
    add_generated_dataset_args(parser)
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
    parser.add_argument("--default_t", type=float, default=pipeline.FIXED_T,
                        help="fixed background threshold for the TransCAM row that tunes nothing (the best "
                             "threshold published for TransCAM on VOC)")
    parser.add_argument("--sheets", type=int, default=4, help="overlay sheets to draw")
    parser.add_argument("--seg_iters", type=int, default=600, help="iterations of each segmentation training")
    parser.add_argument("--seg_batch", type=int, default=8, help="batch size of the segmentation training")
    parser.add_argument("--seg_crop", type=int, default=96, help="crop side of the segmentation training")
    parser.add_argument("--seg_lr", type=float, default=0.01,
                        help="base learning rate of the segmentation training (from scratch, so larger than "
                             "the recipe's 2.5e-4 for ImageNet fine-tuning)")
    parser.add_argument("--seg_scales", default="0.5,0.75,1.0,1.25,1.5",
                        help="segmentation inference scales, each with its flip (the recipe's)")
    add_stages_device_arg(parser)
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
    def results(self) -> Path:
        return self.out / f"seed{self.seed}"


@dataclass(frozen=True)
class Variant:
    """A variation of the BAO stage without attention refinement, for apps/repro_demo.py's
    experiments; its run folder is ``refine_none_<name>``."""

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


def demo_protocol(args: argparse.Namespace, p: Paths, variant: Variant | None = None) -> pipeline.Protocol:
    """The runner's protocol for the generated dataset: ``variant`` None is the attention regime
    (the whole protocol, the demo's optional stages included), otherwise a run without attention
    refinement up to the pseudo-labels (overlays for the regime's own run only)."""
    sets = p.data / "ImageSets" / "Segmentation"
    worker = ["--num_workers", "1"]
    epochs = (variant and variant.epochs) or args.bao_epochs
    settings = {
        "train": ["--arch", "tiny", "--crop_size", str(args.crop_size), "--resize_long", *map(str, args.resize_long),
                  "--batch_size", str(args.batch_size), "--seed", str(args.seed), "--log_every", "50", *worker],
        "transcam": ["--max_epoches", str(args.transcam_epochs), "--lr", str(args.transcam_lr)],
        "bao": ["--max_epoches", str(epochs), "--lr", str(args.bao_lr), *(variant.flags if variant else ())],
        "infer": ["--arch", "tiny", "--scales", args.scales, "--batch_size", "16", *worker],
        "overlays": ["--max_images", str(args.sheets)],
        "seg_train": ["--backbone", "tiny", "--max_iters", str(args.seg_iters), "--batch_size", str(args.seg_batch),
                      "--crop_size", str(args.seg_crop), "--lr", str(args.seg_lr), "--seed", str(args.seed),
                      "--log_every", "50", *worker],
        "seg_infer": ["--backbone", "tiny", "--scales", args.seg_scales, *worker],
    }
    attention = pipeline.Protocol(
        train_list=str(sets / "train.txt"), score_list=str(sets / f"{args.split}.txt"),
        seg_train_list=str(sets / "train.txt"), seg_val_list=str(sets / "val.txt"), seg_test_list=None,
        published=pipeline.PROTOCOLS["voc"].published, settings=settings, extras=pipeline.EXTRAS,
        fixed_t=args.default_t)
    if variant is None:
        return attention
    return replace(attention, seg_train_list=None, seg_val_list=None, extras=() if variant.name else ("overlays",))


def demo_plan(args: argparse.Namespace, p: Paths, variant: Variant | None = None) -> pipeline.Plan:
    """The runner's plan of one demo run: the attention regime (``variant`` None), or a run without
    attention refinement from the attention run's TransCAM weights."""
    run = "attention" if variant is None else f"refine_none{variant.suffix}"
    argv = ["--run_dir", str(p.results / run), "--device", args.device, "--voc12_root", str(p.data),
            "--label_file", str(p.data / "cls_labels.json"), "--seg_from_scratch"]
    if variant is None:
        argv += ["--start", "scratch"]
    else:
        tc_weights = pipeline.transcam_weights(demo_plan(args, p))
        argv += ["--refine", "none", "--start", "transcam", "--weights", tc_weights]
    return pipeline.make_plan(pipeline.get_args_parser().parse_args(argv), demo_protocol(args, p, variant))


def run_pipeline(args: argparse.Namespace, variants: tuple[Variant, ...] = ()) -> dict:
    """Generate the dataset when missing, run (or resume) the runner's demo runs, and return their
    results: ``{"attention": {...}}``, plus ``"refine_none"`` when that regime runs and
    ``"refine_none_<name>"`` for each of ``variants``; each the runner's ``results.json`` results
    (row key -> ``{"miou", "t"?}``)."""
    regimes = args.regimes or ["attention"]
    if "attention" not in regimes:
        raise UserError("--regimes must include attention: the published regime makes the main table and the "
                        "segmentation stage; none is run beside it (--regimes attention none)")
    p = Paths(Path(args.out).resolve(), args.seed)
    print(f"== dataset: {args.num_train} + {args.num_val} images in {p.data}", flush=True)
    if not generate_once(p.data, args.num_train, args.num_val, size=args.size, seed=args.data_seed, progress=True):
        print("== dataset: done before, reused", flush=True)
    runs = {"attention": None}
    for variant in ([Variant("")] if "none" in regimes else []) + list(variants):
        runs[f"refine_none{variant.suffix}"] = variant
    results = {}
    for key, variant in runs.items():
        print(f"\n=== demo run {key} (seed {args.seed})", flush=True)
        plan = demo_plan(args, p, variant)
        pipeline.run(plan, show_table=False)  # both tables are printed together at the end
        results[key] = json.loads((plan.run_dir / "results.json").read_text())["results"]
    return results


def main(args: argparse.Namespace) -> dict:
    # One demo per --out: a second one would train in the same run folders.
    with RunLock(args.out, "wait for it to end, stop it, or give another --out"):
        return _demo(args)


def _demo(args: argparse.Namespace) -> dict:
    if args.quick:
        apply_quick(args)
    start = time.time()
    res = run_pipeline(args)
    p = Paths(Path(args.out).resolve(), args.seed)
    with atomic_path(p.results / "table.json") as tmp:
        Path(tmp).write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nDemo finished in {time.time() - start:.0f} s: pseudo-labels of the {args.split} images, segmentation "
          f"of the val images.")
    for key in res:
        run = p.results / key
        print(f"\n{key}: {run}\n\n{(run / 'results.md').read_text()}")
        print(f"Sweep plots: {run / 'eval_score'}\nOverlay sheets: {run / 'overlays'}")
    return res


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
