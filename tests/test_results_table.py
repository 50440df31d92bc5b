"""The runner's results table (protocol/results.py): each row's published column is that of its regime.

With attention refinement (the published regime) a row shows the published figure of the protocol's
column; a ``--refine none`` run is an ablation, whose rows show none ("-"), in ``results.md`` and in the
seeds table alike. The figures are made-up evaluation files (distinct values), so the rows' mIoU and
thresholds are checked too.
"""
from __future__ import annotations

import json

import pytest

from protocol import pipeline, results, rows
from protocol.plan import cams_name
from tests.test_pipeline import _fake_roots


def _plan(tmp_path, refine: str):
    f = _fake_roots(tmp_path)
    args = pipeline.get_args_parser().parse_args(["--run_dir", str(tmp_path / refine), "--weights", f["weights"],
                                                  "--backbone_weights", f["backbone"], "--start", "transcam",
                                                  "--voc12_root", f["voc"], "--refine", refine])
    protocol = pipeline.preset("voc")
    assert protocol.published == "voc"
    plan = pipeline.make_plan(args, protocol, check=False)
    for i, (stage, figure) in enumerate((s, fig) for s in plan.stages if plan.runs(s.name) for fig in s.figures):
        path = plan.out(stage.name) / figure.file
        path.parent.mkdir(parents=True, exist_ok=True)
        miou = 0.10 + 0.01 * i
        doc = json.loads(path.read_text()) if path.is_file() else {}
        doc.update({"result": {"miou": miou}, "best": {"miou": miou, "t": 0.30},
                    "sweep": [{"t": protocol.fixed_t, "miou": miou}]})
        path.write_text(json.dumps(doc))
    return plan


def _published_cells(markdown: str) -> dict[str, str]:
    """Row title -> its last cell (the published column), for the table's rows."""
    cells = {}
    for line in markdown.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(parts) >= 4 and parts[0] not in ("result",) and not parts[0].startswith("---"):
            cells[parts[0]] = parts[-1]
    return cells


@pytest.mark.parametrize("refine", ["attention", "none"])
def test_each_row_shows_the_published_figure_of_its_regime(refine, tmp_path):
    plan = _plan(tmp_path, refine)
    table = results.write_table(plan)
    found = json.loads((plan.run_dir / "results.json").read_text())["results"]
    cells = _published_cells(table)
    assert len(cells) == len(found) >= 4
    for row in rows.ROWS:
        if row.key not in found:
            continue
        title = rows.title(row, cams_name(plan), plan.protocol.fixed_t)
        expected = rows.PUBLISHED["voc"].get(row.key, "-") if refine == "attention" else "-"
        assert cells[title] == expected, (row.key, refine)
    if refine == "attention":  # the column is really there to show
        assert any(cell != "-" for cell in cells.values())

    summary, seeds_md = results.seed_rows({0: found, 1: found}, plan)
    assert set(summary) == set(found)
    assert _published_cells(seeds_md) == cells
