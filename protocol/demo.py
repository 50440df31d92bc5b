"""The whole pipeline on the generated dataset, on a laptop CPU: ``make demo``.

The demo is the protocol runner's small preset (protocol/pipeline.py, the code path of a real
run, with the settings of protocol/presets/demo.json, scaled to a CPU and a few hundred images
of about 128 px; this command's flags override them):

1. generate the VOC-format dataset (data/synthetic.py), once;
2. run the protocol on it (``<out>/seed<S>/attention``): the TransCAM stage from scratch with
   the tiny Conformer, the BAO stage from it, the threshold-free BAO pseudo-labels of the
   train images and their mIoU, the background-threshold sweeps of the TransCAM CAMs and the
   BAO maps (plots), the CNN CAMs before attention refinement (an ablation), overlay sheets, a
   tiny DeepLab-V2 trained on the BAO pseudo-labels and, as the fully supervised upper bound,
   on the ground-truth masks, both segmenting the val images (with and without CRF), scored;
3. the runner again without attention refinement (``--refine none``,
   ``<out>/seed<S>/refine_none``) from the same TransCAM weights, up to the pseudo-labels: BAO
   trained and applied on the maps straight from their heads, its pseudo-labels, the sweeps of
   its maps and of the CNN CAMs, overlay sheets (``--regimes attention`` leaves it out);
4. the runners' tables: BAO threshold-free, TransCAM at its best threshold (chosen with the
   pixel labels WSSS is not supposed to have), TransCAM at a fixed default threshold, BAO maps
   and CNN CAMs at their best thresholds, and the segmentation rows; without refinement, BAO
   against the CNN CAMs at their best and at a fixed threshold, in a second table;
5. per image of the overlay sheets, both regimes' sheets one above the other, labelled
   (``<out>/seed<S>/regimes_<image>.png``, :func:`tool.overlay.stack_sheet_files`): where the
   maps localise (no refinement) and where the attention trained from scratch does not.

``--seeds 0 1 2`` runs all of it once per training seed on the same generated data (the
miniature reproduction) and writes ``<out>/seeds.md`` and ``seeds.json``: per regime, every
row's mean ± sample standard deviation (n - 1) over the seeds, the per-seed values and the
published figure.

Every stage is the runner's, so a rerun skips what is done and ``python -m protocol.pipeline
--run_dir demo_out/seed0/attention --status`` shows where a run stands. ``python -m
protocol.demo --help`` lists the knobs.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from apps.cli import add_generated_dataset_args, add_stages_device_arg, run_cli
from core.errors import UserError
from core.fileio import atomic_path
from core.runlock import RunLock, in_use_hint
from data.synthetic import generate_once
from protocol import pipeline
from protocol.plan import Plan
from protocol.protocol_file import Protocol, fixed_t_problem
from protocol.results import check_seeds, seed_rows, write_seed_files
from protocol.stages import transcam_weights
from tool.overlay import stack_sheet_files

# The values of train_bao.py --refine (network.conformer.REFINE_MODES, which tests/test_demo.py
# checks), spelled out so that --help needs no model import.
REGIMES = ("attention", "none")
# regime -> the label of its sheet on the regimes sheet of an image
REGIME_LABELS = {"attention": "attention refinement (published)", "none": "no refinement"}
REGIMES_SHEET = "regimes_"  # <out>/seed<S>/regimes_<image>.png
PRESET = pipeline.preset("demo")
# demo flag -> (settings key of the preset, the script's flag, number of values): the knobs this
# command turns; their defaults are the preset's values.
KNOBS = {"crop_size": ("train", "--crop_size", 1), "resize_long": ("train", "--resize_long", 2),
         "batch_size": ("train", "--batch_size", 1), "transcam_epochs": ("transcam", "--max_epoches", 1),
         "transcam_lr": ("transcam", "--lr", 1), "bao_epochs": ("bao", "--max_epoches", 1),
         "bao_lr": ("bao", "--lr", 1), "scales": ("infer", "--scales", 1), "sheets": ("overlays", "--max_images", 1),
         "seg_iters": ("seg_train", "--max_iters", 1), "seg_batch": ("seg_train", "--batch_size", 1),
         "seg_crop": ("seg_train", "--crop_size", 1), "seg_lr": ("seg_train", "--lr", 1),
         "seg_scales": ("seg_infer", "--scales", 1)}


def _preset_value(name: str, type_: type = str):
    """The preset's value of knob ``name`` (a list for a flag of several values)."""
    key, flag, n = KNOBS[name]
    words = PRESET.settings[key]
    values = [type_(w) for w in words[words.index(flag) + 1:words.index(flag) + 1 + n]]
    return values if n > 1 else values[0]


def _with_knobs(settings: dict[str, list[str]], args: argparse.Namespace) -> dict[str, list[str]]:
    """The preset's settings with every knob's flag set to this command's value."""
    settings = {k: list(v) for k, v in settings.items()}
    for name, (key, flag, n) in KNOBS.items():
        value = getattr(args, name)
        words, at = settings[key], settings[key].index(flag) + 1
        words[at:at + n] = [str(v) for v in (value if n > 1 else [value])]
    return settings


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="folder for the dataset, runs and results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of the training runs, one run each (the dataset has its own); more than one: "
                             "the mean ± sd table <out>/seeds.md")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the generated dataset")
    add_generated_dataset_args(parser)
    parser.add_argument("--crop_size", type=int, default=_preset_value("crop_size", int),
                        help="training crop side (multiple of 16)")
    parser.add_argument("--resize_long", type=int, nargs=2, default=_preset_value("resize_long", int),
                        metavar=("LO", "HI"), help="training resize range of the long side (scaled down from the "
                                                   "published 320-640 with the image size)")
    parser.add_argument("--batch_size", type=int, default=_preset_value("batch_size", int), help="training batch size")
    parser.add_argument("--transcam_epochs", type=int, default=_preset_value("transcam_epochs", int),
                        help="epochs of the TransCAM stage")
    parser.add_argument("--transcam_lr", type=float, default=_preset_value("transcam_lr", float),
                        help="learning rate of the TransCAM stage (from scratch, so larger than the "
                             "published fine-tuning rate)")
    parser.add_argument("--bao_epochs", type=int, default=_preset_value("bao_epochs", int),
                        help="epochs of the BAO stage (published: 10)")
    parser.add_argument("--bao_lr", type=float, default=_preset_value("bao_lr", float),
                        help="learning rate of the BAO stage")
    parser.add_argument("--scales", default=_preset_value("scales"),
                        help="inference scales (the published 256,512,768 scaled to the image size)")
    parser.add_argument("--split", default="train", choices=["train", "val"],
                        help="images whose pseudo-labels are made and scored (published: train)")
    parser.add_argument("--default_t", type=float, default=PRESET.fixed_t,
                        help="fixed background threshold for the TransCAM row that tunes nothing (the best "
                             "threshold published for TransCAM on VOC)")
    parser.add_argument("--sheets", type=int, default=_preset_value("sheets", int), help="overlay sheets to draw")
    parser.add_argument("--seg_iters", type=int, default=_preset_value("seg_iters", int),
                        help="iterations of each segmentation training")
    parser.add_argument("--seg_batch", type=int, default=_preset_value("seg_batch", int),
                        help="batch size of the segmentation training")
    parser.add_argument("--seg_crop", type=int, default=_preset_value("seg_crop", int),
                        help="crop side of the segmentation training")
    parser.add_argument("--seg_lr", type=float, default=_preset_value("seg_lr", float),
                        help="base learning rate of the segmentation training (from scratch, so larger than "
                             "the recipe's 2.5e-4 for ImageNet fine-tuning)")
    parser.add_argument("--seg_scales", default=_preset_value("seg_scales"),
                        help="segmentation inference scales, each with its flip (the recipe's)")
    add_stages_device_arg(parser)
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES),
                        help="refinement regimes: attention (published; the main table and the segmentation "
                             "stage, always run) and none (--refine none: BAO trained and applied without "
                             "attention refinement, against the CNN CAMs; a second table; with both, the "
                             "regimes sheets <out>/seed<S>/regimes_<image>.png)")
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
    def results(self) -> Path:
        return self.out / f"seed{self.seed}"


def apply_quick(args: argparse.Namespace) -> None:
    """Shrink everything for the CI test of the same path."""
    args.num_train, args.num_val, args.size = 16, 8, 64
    args.crop_size, args.resize_long, args.batch_size = 64, [48, 80], 8
    args.transcam_epochs, args.bao_epochs = 1, 1
    args.scales, args.sheets = "32,64", 2
    args.seg_iters, args.seg_batch, args.seg_crop, args.seg_scales = 2, 4, 48, "1.0"


def demo_protocol(args: argparse.Namespace, regime: str = "attention") -> Protocol:
    """The runner's protocol for the generated dataset: the preset with this command's knobs; the
    attention regime runs the whole protocol, the demo's optional stages included; "none" runs up
    to the pseudo-labels (with overlays)."""
    lists = {**PRESET.lists, "score": f"{{root}}/ImageSets/Segmentation/{args.split}.txt"}
    attention = replace(PRESET, lists=lists, settings=_with_knobs(PRESET.settings, args), fixed_t=args.default_t)
    if regime == "attention":
        return attention
    return replace(attention, lists={k: lists[k] for k in ("train", "score")}, extras=("overlays",))


def demo_plan(args: argparse.Namespace, p: Paths, regime: str = "attention") -> Plan:
    """The runner's plan of one demo run at seed ``p.seed``: the attention regime, or a run without
    attention refinement from the attention run's TransCAM weights."""
    run = "attention" if regime == "attention" else "refine_none"
    values = {"device": args.device, "voc12_root": str(p.data), "label_file": str(p.data / "cls_labels.json"),
              "seg_from_scratch": True}
    if regime == "attention":
        values["start"] = "scratch"
    else:
        values.update(refine="none", start="transcam", weights=transcam_weights(demo_plan(args, p)))
    runner_args = pipeline.runner_args(p.results / run, **values)
    return pipeline.make_plan(runner_args, demo_protocol(args, regime), seed=p.seed, run_dir=p.results / run)


def run_pipeline(args: argparse.Namespace, seed: int) -> dict:
    """Generate the dataset when missing, run (or resume) the runner's demo runs of ``seed``, draw
    the regimes sheets when both regimes run, and return the results: ``{"attention": {...}}``, plus
    ``"refine_none"`` when that regime runs; each the runner's ``results.json`` results (row key ->
    ``{"miou", "t"?}``)."""
    regimes = args.regimes
    if "attention" not in regimes:
        raise UserError("--regimes must include attention: the published regime makes the main table and the "
                        "segmentation stage; none is run beside it (--regimes attention none)")
    p = Paths(Path(args.out).resolve(), seed)
    print(f"== dataset: {args.num_train} + {args.num_val} images in {p.data}", flush=True)
    if not generate_once(p.data, args.num_train, args.num_val, size=args.size, seed=args.data_seed, progress=True):
        print("== dataset: done before, reused", flush=True)
    results, overlays = {}, []
    for regime in ("attention", "none"):
        if regime not in regimes:
            continue
        key = "attention" if regime == "attention" else "refine_none"
        print(f"\n=== demo run {key} (seed {seed})", flush=True)
        plan = demo_plan(args, p, regime)
        pipeline.run(plan, show_table=False)  # both tables are printed together at the end
        results[key] = json.loads((plan.run_dir / "results.json").read_text())["results"]
        overlays.append((REGIME_LABELS[regime], plan.out("overlays")))
    if len(overlays) > 1:
        # drawn again on every run: cheap, and always from the overlays the runs hold now
        stack_sheet_files(overlays, p.results, REGIMES_SHEET)
    return results


def write_seed_tables(args: argparse.Namespace, per_seed: dict[int, dict]) -> str:
    """``<out>/seeds.json`` and ``seeds.md``: per regime, the runner's seeds table
    (:func:`protocol.results.seed_rows`) over the seeds."""
    out = Path(args.out).resolve()
    sections, summaries = [], {}
    for key in per_seed[min(per_seed)]:
        plan = demo_plan(args, Paths(out, min(per_seed)), "attention" if key == "attention" else "none")
        summaries[key], table = seed_rows({s: r[key] for s, r in per_seed.items()}, plan)
        sections.append(f"## {key}\n\n" + table)
    text = (f"Demo over seeds {', '.join(map(str, sorted(per_seed)))}: mIoU % mean ± sample standard deviation "
            f"(n - 1), then each seed's value; {args.num_train} generated train images of about {args.size} px.\n\n"
            + "\n".join(sections))
    write_seed_files(out, sorted(per_seed), {"regimes": summaries}, text)
    return text


def main(args: argparse.Namespace) -> dict:
    """Run the demo for every seed; returns seed -> :func:`run_pipeline`'s results."""
    check_seeds(args.seeds)  # the runner's check: one folder and one table column per seed
    if problem := fixed_t_problem(args.default_t):
        raise UserError(f"--default_t {problem}")
    # One demo per --out: a second one would train in the same run folders.
    with RunLock(args.out, in_use_hint("--out")):
        return _demo(args)


def _demo(args: argparse.Namespace) -> dict:
    if args.quick:
        apply_quick(args)
    start = time.time()
    per_seed = {}
    for seed in args.seeds:
        res = per_seed[seed] = run_pipeline(args, seed)
        p = Paths(Path(args.out).resolve(), seed)
        with atomic_path(p.results / "table.json") as tmp:
            Path(tmp).write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nDemo finished in {time.time() - start:.0f} s: pseudo-labels of the {args.split} images, segmentation "
          f"of the val images.")
    for seed, res in per_seed.items():
        for key in res:
            run = Paths(Path(args.out).resolve(), seed).results / key
            print(f"\n{key} (seed {seed}): {run}\n\n{(run / 'results.md').read_text()}")
            print(f"Sweep plots: {run / 'eval_score'}\nOverlay sheets: {run / 'overlays'}")
        sheets = sorted(Paths(Path(args.out).resolve(), seed).results.glob(f"{REGIMES_SHEET}*.png"))
        if len(res) > 1 and sheets:
            print(f"\nBoth regimes on one sheet per image (seed {seed}): " + ", ".join(map(str, sheets)))
    if len(per_seed) > 1:
        print("\n" + write_seed_tables(args, per_seed))
    return per_seed


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
