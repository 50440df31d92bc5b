"""Generate a small synthetic segmentation dataset in the real PASCAL VOC on-disk format.

    python -m protocol.make_dataset --out demo_data/VOC2012 --num_train 300 --num_val 100 --size 128

The command of :mod:`data.synthetic`, which describes the output (``--out`` is used like a
VOC root, i.e. pass it as ``--voc12_root``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from apps.cli import add_generated_dataset_args, run_cli
from data.synthetic import generate


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of the generator."""
    parser = argparse.ArgumentParser(
        description="Generate a seeded synthetic dataset in the PASCAL VOC 2012 folder format "
                    "(images, XML annotations, class masks, list files, cls_labels.json).")
    parser.add_argument("--out", default="demo_data/VOC2012",
                        help="output VOC root; pass it later as --voc12_root (default: demo_data/VOC2012)")
    add_generated_dataset_args(parser)
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed writes byte-identical files (default: 0)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (default: 90)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --out that already holds images (files of the same "
                             "names are replaced; the list files define the new dataset)")
    return parser


def main(args: argparse.Namespace) -> None:
    """Generate the dataset and print where it went, its classes and sizes."""
    summary = generate(args.out, args.num_train, args.num_val, args.size, args.seed,
                       quality=args.quality, overwrite=args.overwrite, progress=True)
    print(f"wrote {summary['num_train']} train + {summary['num_val']} val images to {summary['root']} "
          f"in {summary['seconds']:.1f} s")
    print(f"classes (ids 1..{len(summary['classes'])}): {', '.join(summary['classes'])}")
    print(f"image height {summary['height'][0]}..{summary['height'][1]}, "
          f"width {summary['width'][0]}..{summary['width'][1]}; {summary['objects']} objects, "
          f"{summary['two_class_images']} images with two classes")
    print(f"labels: {Path(summary['root']) / 'cls_labels.json'} (pass as --label_file)")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
