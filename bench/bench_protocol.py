"""Time every stage of the protocol runner with the real models, and what that gives for VOC.

    python -m bench.bench_protocol                   # Conformer-S, DeepLab-V2 ResNet-101 (a GPU machine)
    python -m bench.bench_protocol --device cpu --arch tiny --seg_backbone tiny --num_train 8 --num_val 4 \\
        --size 64 --batch_size 4 --crop_size 64 --scales 32,64 --seg_iters 2 --seg_batch 4 --seg_crop 48 \\
        --seg_scales 1.0 --no_write                  # CPU smoke run of the script itself

It generates a VOC-format dataset of ``--num_train`` + ``--num_val`` images of about ``--size``
pixels (data/synthetic.py) and runs ``protocol.pipeline`` on it, every stage (the TransCAM
stage and the CNN CAM ablation included, not the overlays and the upper bound; the val images
are also the test list) with the
scripts' published settings except three: random initialisation (no weights are read:
``--start scratch``, ``--seg_from_scratch``, which trains batch norm), ``--epochs`` per training
stage and ``--seg_iters`` segmentation steps. From the run it reads each stage's seconds and
the steady rates of the work that grows with the data: training images/s (the training logs,
first interval left out), inference images/s (the output files' times, first file left out),
and turns them into the time of the VOC protocol's lists (train_aug 10,582, train 1,464, val
1,449, test 1,456; published schedules). Data loading and the dense CRF run on this machine's
CPUs, so the figures are this machine's. The table goes to the ``bench_protocol`` section of
bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from apps.cli import add_generated_dataset_args, add_stages_device_arg, parse_scales, positive_int, run_cli
from bench.report import RESULTS_FILE, machine_line, write_section
from core.errors import UserError
from data.synthetic import generate_once
from protocol import pipeline

# The VOC protocol's sizes and the published schedules the estimate is for.
VOC = {"train_aug": 10582, "train": 1464, "val": 1449, "test": 1456}
EPOCHS = {"transcam": 20, "bao": 10}  # train_bao.py's defaults (DEFAULT_EPOCHS)
SEG_STEPS, SEG_BATCH = 20000, 10  # train_seg.py's defaults


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_stages_device_arg(parser)
    parser.add_argument("--arch", default="sm", help="Conformer size of the TransCAM and BAO stages")
    parser.add_argument("--seg_backbone", default="resnet101", help="backbone of the segmentation model")
    add_generated_dataset_args(parser, num_train=96, num_val=32, size=448)  # the val images are also the test list
    parser.add_argument("--epochs", type=positive_int, default=1, help="epochs of each training stage")
    parser.add_argument("--seg_iters", type=positive_int, default=200, help="segmentation training steps")
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help="train_bao.py --batch_size (default: the script's)")
    parser.add_argument("--crop_size", type=positive_int, default=None,
                        help="train_bao.py --crop_size (default: the script's)")
    parser.add_argument("--scales", type=parse_scales, default=None,
                        help="infer_bao.py --scales (default: the script's)")
    parser.add_argument("--seg_batch", type=positive_int, default=None,
                        help="train_seg.py --batch_size (default: the script's)")
    parser.add_argument("--seg_crop", type=positive_int, default=None,
                        help="train_seg.py --crop_size (default: the script's)")
    parser.add_argument("--seg_scales", default=None, help="infer_seg.py --scales (default: the script's)")
    parser.add_argument("--work_dir", default=None,
                        help="folder of the dataset and the run (default: a temporary folder, removed)")
    parser.add_argument("--out", default=str(RESULTS_FILE), help="results file whose section is rewritten")
    parser.add_argument("--no_write", action="store_true", help="print the report only")
    return parser


def _flags(**values: object) -> list[str]:
    """``--name value`` for each value given (None: the script's default)."""
    return [item for name, value in values.items() if value is not None for item in (f"--{name}", str(value))]


def protocol(args: argparse.Namespace, voc: Path) -> pipeline.Protocol:
    sets = voc / "ImageSets" / "Segmentation"
    train, val = str(sets / "train.txt"), str(sets / "val.txt")
    scales = ",".join(map(str, args.scales)) if args.scales else None
    epochs = ["--max_epoches", str(args.epochs), "--log_every", "5"]
    settings = {"train": ["--arch", args.arch, *_flags(batch_size=args.batch_size, crop_size=args.crop_size)],
                "transcam": epochs, "bao": epochs,
                "infer": ["--arch", args.arch, *_flags(scales=scales)],
                "seg_train": ["--backbone", args.seg_backbone, "--max_iters", str(args.seg_iters), "--log_every", "10",
                              *_flags(batch_size=args.seg_batch, crop_size=args.seg_crop)],
                "seg_infer": ["--backbone", args.seg_backbone, *_flags(scales=args.seg_scales)]}
    # The CNN CAM ablation is timed; the overlays and the upper bound repeat timed work.
    return pipeline.Protocol(lists={"train": train, "score": train, "seg_train": train, "seg_val": val,
                                    "seg_test": val}, settings=settings, extras=("cnn_score",))


def train_rate(log: Path) -> float:
    """Median images/s of a training log's step records, the first (warm-up) left out."""
    rates = [r["images_per_s"] for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "step"]
    if len(rates) < 2:
        raise UserError(f"{log} has {len(rates)} step records; run longer (--epochs, --seg_iters)")
    return statistics.median(rates[1:])


def file_rate(folder: Path, pattern: str) -> float:
    """Images/s of an inference from its output files' modification times, the first left out."""
    times = sorted(p.stat().st_mtime for p in folder.glob(pattern))
    if len(times) < 3 or times[-1] <= times[0]:
        raise UserError(f"{folder} holds {len(times)} files {pattern}: too few to time; use more images")
    return (len(times) - 1) / (times[-1] - times[0])


def measure(plan: pipeline.Plan, args: argparse.Namespace) -> list[dict]:
    """Rows of the report: stage, work here, seconds here, rate, work in the VOC protocol, expected seconds."""
    seconds = {s: json.loads((plan.run_dir / "stages" / f"{s}.json").read_text())["seconds"]
               for s in pipeline.STAGES if (plan.run_dir / "stages" / f"{s}.json").is_file()}
    out, n_train = plan.out, args.num_train
    bao_rate = file_rate(out("pseudo_score") / "bao_pred", "*.png")
    tc_rate = file_rate(out("pseudo_score") / "transcam_cams", "*.npz")
    rows = []

    def row(stage: str, here: str, rate: float | None, unit: str, voc_work: str, voc_seconds: float) -> None:
        rows.append({"stage": stage, "here": here, "seconds": seconds.get(stage), "rate": rate, "unit": unit,
                     "voc": voc_work, "voc_seconds": voc_seconds})

    for stage, session in (("transcam", "transcam"), ("bao", "bao")):
        rate = train_rate(out(stage) / session / "log.jsonl")
        images = EPOCHS[stage] * VOC["train_aug"]
        row(stage, f"{args.epochs} epoch(s) of {n_train} images", rate, "img/s", f"{EPOCHS[stage]} epochs of train_aug",
            images / rate)
    both = 1 / (1 / bao_rate + 1 / tc_rate)
    row("pseudo_score", f"{n_train} images, BAO {bao_rate:.2f} + TransCAM {tc_rate:.2f} img/s", both, "img/s",
        "train, BAO + TransCAM", VOC["train"] / both)
    row("eval_score", f"{n_train} images, 2 sweeps", None, "", "train, 2 sweeps",
        seconds["eval_score"] * VOC["train"] / n_train)
    cnn = file_rate(out("cnn_score") / "cnn_cams", "*.npz")
    row("cnn_score", f"{n_train} images (ablation)", cnn, "img/s", "train", VOC["train"] / cnn)
    row("pseudo_seg", "the scoring list's labels reused", bao_rate, "img/s", "train_aug (BAO inference)",
        VOC["train_aug"] / bao_rate)
    seg = train_rate(out("seg_train") / "seg" / "log.jsonl")
    row("seg_train", f"{args.seg_iters} steps", seg, "img/s", f"{SEG_STEPS} steps of {SEG_BATCH}",
        SEG_STEPS * SEG_BATCH / seg)
    val = file_rate(out("seg_val") / "crf", "*.png")
    row("seg_val", "val images with CRF", val, "img/s", "val, with CRF", VOC["val"] / val)
    test = file_rate(out("seg_test") / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls", "*.png")
    row("seg_test", "test images with CRF (server)", test, "img/s", "test, with CRF", VOC["test"] / test)
    return rows


def report(args: argparse.Namespace, rows: list[dict], total_here: float) -> str:
    def minutes(s: float) -> str:
        return f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"

    lines = ["| stage | here | seconds here | rate | VOC protocol | expected |", "|---|---|---|---|---|---|"]
    for r in rows:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        rate = "-" if r["rate"] is None else f"{r['rate']:.2f} {r['unit']}"
        lines.append(f"| {r['stage']} | {r['here']} | {secs} | {rate} | {r['voc']} | {minutes(r['voc_seconds'])} |")
    main_path = sum(r["voc_seconds"] for r in rows if r["stage"] not in ("transcam", "cnn_score"))
    defaults = vars(get_args_parser().parse_args([]))
    changed = [f"--{k} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in vars(args).items()
               if k in defaults and v != defaults[k] and k not in ("out", "no_write", "work_dir")]
    command = " ".join(["python -m bench.bench_protocol", *changed])
    return (f"## The protocol runner's stages, timed (bench/bench_protocol.py)\n\n{machine_line()}\n"
            f"Command: `{command}` ({total_here:.0f} s). Generated dataset: {args.num_train} + {args.num_val} images "
            f"of about {args.size} px; Conformer-{args.arch}, DeepLab-V2 {args.seg_backbone}, random initialisation, "
            f"the scripts' published settings otherwise (float32); the val images serve as the test list. Rates: "
            f"training from the logs, inference from the output files' times (CRF in worker processes on this "
            f"machine's CPUs). Expected: the VOC protocol's lists at these rates.\n\n" + "\n".join(lines) +
            f"\n\nVOC protocol from TransCAM weights (bao to seg_test, no ablation): about {minutes(main_path)}; the "
            f"TransCAM stage from ImageNet weights adds {minutes(rows[0]['voc_seconds'])}.\n")


def main(args: argparse.Namespace) -> str:
    start = time.time()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_protocol_"))
    try:
        voc = work / "VOC2012"
        generate_once(voc, args.num_train, args.num_val, size=args.size, progress=True)
        runner = pipeline.get_args_parser().parse_args(
            ["--run_dir", str(work / "run"), "--device", args.device, "--voc12_root", str(voc), "--label_file",
             str(voc / "cls_labels.json"), "--start", "scratch", "--seg_from_scratch"])
        plan = pipeline.make_plan(runner, protocol(args, voc))
        pipeline.run(plan)
        rows = measure(plan, args)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    body = report(args, rows, time.time() - start)
    print("\n" + body)
    if not args.no_write:
        write_section(args.out, "bench_protocol", body)
        print(f"written to the bench_protocol section of {args.out}")
    return body


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
