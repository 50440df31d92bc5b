"""The rows of the results table, with the published figures, and the multi-seed summary.

One table for the runner (``results.md``), the demo and the multi-seed summary (``seeds.md``):
each row is a key of the runner's ``results.json``, a title and the list it scores (the stage
that scores it names the row in its record's figures, protocol/stages.py). :data:`PUBLISHED`
holds the published figures per dataset; a protocol file names the column it is compared with
(``"published": "voc"``).
"""
from __future__ import annotations

import statistics
from typing import NamedTuple


class Row(NamedTuple):
    key: str  # the row's key in results.json; the stage table's figures say which stage scores it
    title: str  # "{cams}": what the TransCAM stage's CAMs are in the run; "{fixed_t}": the fixed threshold
    list_key: str


ROWS = (Row("bao_pseudo", "BAO pseudo-labels, threshold-free", "score"),
        Row("bao_maps_best", "BAO maps, best background threshold (reference)", "score"),
        Row("transcam_best", "{cams}, best background threshold (tuned on pixel labels)", "score"),
        Row("transcam_fixed", "{cams}, fixed threshold t = {fixed_t}", "score"),
        Row("cnn_best", "CNN CAMs before attention refinement, best threshold (ablation)", "score"),
        Row("seg_val", "segmentation model on the BAO pseudo-labels", "seg_val"),
        Row("seg_val_crf", "segmentation model on the BAO pseudo-labels, + CRF", "seg_val"),
        Row("seg_upper", "segmentation model on the ground-truth masks (upper bound)", "seg_val"),
        Row("seg_upper_crf", "segmentation model on the ground-truth masks, + CRF (upper bound)", "seg_val"))

# The threshold-free BAO pseudo-labels' figure is in the paper, not in the published repository;
# 74.97 is the BAO maps' at their best background threshold (t = 0.49-0.50).
PUBLISHED = {
    "voc": {"bao_pseudo": "paper", "bao_maps_best": "74.97 (t = 0.49-0.50)", "transcam_best": "64.85 (t = 0.44)",
            "transcam_fixed": "64.85 (t = 0.44)", "seg_val": "TransCAM 69.3; BAO: in the paper",
            "seg_val_crf": "TransCAM 69.3; BAO: in the paper", "seg_test": "TransCAM 69.6 (server)"},
    "coco": {"bao_pseudo": "paper", "seg_val": "ToCo 42.2, DuPL 43.5 (their READMEs)",
             "seg_val_crf": "ToCo 42.2, DuPL 43.5 (their READMEs)"},
}


def published(column: str | None, key: str) -> str:
    """The published figure of row ``key`` in ``column`` ("voc", "coco"; None: none), "-" when there is none."""
    return PUBLISHED.get(column or "", {}).get(key, "-")


def title(row: Row, cams: str, fixed_t: float) -> str:
    return row.title.format(cams=cams, fixed_t=fixed_t)


def seed_summary(per_seed: dict[int, dict]) -> dict:
    """Mean and sample standard deviation (n - 1; 0 for one seed) of every row that all seeds scored.

    Args:
        per_seed: seed -> the runner's ``results.json`` results (row key -> ``{"miou", "t"?}``).

    Returns:
        row key -> ``{"mean", "sd", "miou": {seed: miou}, "t": {seed: t}?}`` (fractions, as results.json).
    """
    seeds = sorted(per_seed)
    summary = {}
    for row in ROWS:
        if not all(row.key in per_seed[s] for s in seeds):
            continue
        values = [per_seed[s][row.key]["miou"] for s in seeds]
        entry = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                 "miou": {str(s): v for s, v in zip(seeds, values)}}
        if "t" in per_seed[seeds[0]][row.key]:
            entry["t"] = {str(s): per_seed[s][row.key]["t"] for s in seeds}
        summary[row.key] = entry
    return summary


def seed_table(summary: dict, cams: str, fixed_t: float, column: str | None) -> str:
    """Markdown of :func:`seed_summary`: mIoU % mean ± sd, the per-seed values and thresholds, the published figure."""
    seeds = next(iter(summary.values()))["miou"] if summary else {}
    lines = [f"| result | mIoU % mean ± sd | per seed ({', '.join(seeds)}) | threshold | published |",
             "|---|---|---|---|---|"]
    for row in ROWS:
        if row.key not in summary:
            continue
        s = summary[row.key]
        values = ", ".join(f"{100 * v:.2f}" for v in s["miou"].values())
        ts = ", ".join(f"{t:.2f}" for t in s["t"].values()) if "t" in s else "none"
        lines.append(f"| {title(row, cams, fixed_t)} | {100 * s['mean']:.2f} ± {100 * s['sd']:.2f} | {values} | "
                     f"{ts} | {published(column, row.key)} |")
    return "\n".join(lines) + "\n"
