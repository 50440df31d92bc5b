"""On one machine, the same command and seed give identical results (issue 22): the protocol runner
with tiny settings, the TransCAM stage from random initialisation (the demo's start), BAO, the
pseudo-labels and the sweeps, run twice into two folders, gives the same results.json (its folder
paths aside) and the same PNGs (pseudo-labels, sweep plots), byte for byte. The later stages only
read these outputs; they are left out to keep the test cheap (two runs in about a minute)."""
from __future__ import annotations

import json
from pathlib import Path

from protocol import pipeline
from tests.test_pipeline import TINY_TRAIN


def _protocol(voc_root: Path) -> pipeline.Protocol:
    sets = voc_root / "ImageSets" / "Segmentation"
    return pipeline.Protocol(lists={"train": str(sets / "train.txt"), "score": str(sets / "train.txt")},
                             published="voc",
                             settings={"train": TINY_TRAIN,
                                       "infer": ["--arch", "tiny", "--scales", "64", "--num_workers", "0"]})


def _run(voc_root: Path, run_dir: Path) -> Path:
    args = pipeline.get_args_parser().parse_args(
        ["--run_dir", str(run_dir), "--start", "scratch", "--seg_from_scratch", "--device", "cpu",
         "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json")])
    pipeline.run(pipeline.make_plan(args, _protocol(voc_root), seed=5, run_dir=run_dir))
    return run_dir


def test_same_command_and_seed_twice_gives_identical_results(voc_root, tmp_path):
    first, second = _run(voc_root, tmp_path / "first"), _run(voc_root, tmp_path / "second")
    results = [json.loads((run / "results.json").read_text().replace(str(run), "<run_dir>"))
               for run in (first, second)]
    assert results[0] == results[1]
    assert set(results[0]["results"]) == {"bao_pseudo", "bao_maps_best", "transcam_best", "transcam_fixed"}
    assert json.loads((first / "run.json").read_text())["start"] == "scratch"
    pngs = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert pngs == sorted(p.relative_to(second) for p in second.rglob("*.png"))
    names = (voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len([p for p in pngs if p.parts[:2] == ("pseudo_score", "bao_pred")]) == len(names)
    assert {p.name for p in pngs if p.parts[0] == "eval_score"} == {"bao_maps_sweep.png", "transcam_sweep.png"}
    differing = [str(p) for p in pngs if (first / p).read_bytes() != (second / p).read_bytes()]
    assert not differing, differing
