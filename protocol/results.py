"""The runner's results: the figures the stages' records name (:attr:`protocol.plan.Stage.figures`)
collected into ``results.json`` and the table ``results.md`` beside the published figures; the seeds'
``seeds.json`` / ``seeds.md`` (the runner's, and the demo's, one section per regime), and the check
of a ``--seeds`` list both take.
"""
from __future__ import annotations

import json
from pathlib import Path

from core.errors import UserError
from core.fileio import atomic_path
from crf.params import resolve_backend
from protocol import rows
from protocol.plan import Figure, Plan, cams_name


def _figure(path: Path, figure: Figure, fixed_t: float) -> dict:
    """One figure of an evaluation_bao.py JSON file: {"miou", "t"?}."""
    d = json.loads(path.read_text())
    if figure.read == "result":
        return {"miou": d["result"]["miou"]}
    if figure.read == "best":
        return {"miou": d["best"]["miou"], "t": d["best"]["t"]}
    if figure.read == "fixed":  # the protocol's fixed_t is on the sweep's grid (protocol/protocol_file.py)
        fixed = min(d["sweep"], key=lambda row: abs(row["t"] - fixed_t))
        return {"miou": fixed["miou"], "t": fixed["t"]}
    raise ValueError(f"a figure is read as result, best or fixed, not {figure.read!r}")


def collect(plan: Plan) -> dict:
    """The figures of the stages that ran, in table order: row key -> {"miou", "t"?}."""
    return {figure.row: _figure(plan.out(stage.name) / figure.file, figure, plan.protocol.fixed_t)
            for stage in plan.stages if plan.runs(stage.name) for figure in stage.figures}


def _regime(plan: Plan) -> str:
    return "attention refinement" if plan.args.refine == "attention" else "`--refine none`"


def published_column(plan: Plan) -> str | None:
    """The published figures the table compares with: none without attention refinement (an ablation)."""
    return plan.protocol.published if plan.args.refine == "attention" else None


def write_table(plan: Plan) -> str:
    """``results.json`` and ``results.md`` in the run folder; returns the Markdown."""
    results = collect(plan)
    names = {k: Path(v).name for k, v in plan.lists.items()}
    attention = plan.args.refine == "attention"
    lines = ["Attention refinement (published)." if attention else
             "No attention refinement (`--refine none`, an ablation): the TransCAM stage's CAMs are the CNN CAMs; "
             "the published figures are with refinement.", "",
             "| result | list | mIoU % | threshold | published |", "|---|---|---|---|---|"]
    for row in rows.ROWS:
        if row.key not in results:
            continue
        r = results[row.key]
        t = f"{r['t']:.2f}" if "t" in r else "none"
        lines.append(f"| {rows.title(row, cams_name(plan), plan.protocol.fixed_t)} | {names[row.list_key]} | "
                     f"{100 * r['miou']:.2f} | {t} | {rows.published(published_column(plan), row.key)} |")
    for stage in (s for s in plan.stages if s.upload and plan.runs(s.name)):
        lines.append(f"\nTest set ({names[stage.reads[0]]}): upload `{plan.out(stage.name) / stage.upload}` to the "
                     f"evaluation server; published: {rows.published(plan.protocol.published, stage.name)}.")
    text = "\n".join(lines) + "\n"
    with atomic_path(plan.run_dir / "results.json") as tmp:
        Path(tmp).write_text(json.dumps({"lists": plan.lists, "refine": plan.args.refine,
                                         "crf_backend": resolve_backend(plan.args.crf_backend), "results": results},
                                        indent=1) + "\n")
    with atomic_path(plan.run_dir / "results.md") as tmp:
        Path(tmp).write_text(text)
    return text


def check_seeds(seeds: list[int], flag: str = "--seeds") -> None:
    """Refuse a seed list that repeats a seed (two runs would share one folder and one table column)."""
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{flag} repeats a seed: {' '.join(map(str, seeds))}")


def seed_rows(per_seed: dict[int, dict], plan: Plan) -> tuple[dict, str]:
    """The seeds table of one kind of run: :func:`protocol.rows.seed_summary` of ``per_seed`` (seed -> the
    ``results.json`` results of a run of ``plan``'s settings) and its Markdown table."""
    summary = rows.seed_summary(per_seed)
    return summary, rows.seed_table(summary, cams_name(plan), plan.protocol.fixed_t, published_column(plan))


def write_seed_table(plans: list[Plan], folder: Path) -> str:
    """``seeds.json`` and ``seeds.md`` in ``folder``: :func:`seed_rows` of the plans' ``results.json``
    (every plan one seed, all finished); returns the Markdown."""
    per_seed = {p.seed: json.loads((p.run_dir / "results.json").read_text())["results"] for p in plans}
    summary, table = seed_rows(per_seed, plans[0])
    text = (f"Seeds {', '.join(map(str, sorted(per_seed)))}: mean ± sample standard deviation (n - 1) over the "
            f"seeds, then each seed's value ({_regime(plans[0])}).\n\n" + table)
    write_seed_files(folder, sorted(per_seed), {"rows": summary}, text)
    return text


def write_seed_files(folder: Path, seeds: list[int], summaries: dict, text: str) -> None:
    """``seeds.json`` (the seeds, the kind of sd, ``summaries``) and ``seeds.md`` (``text``) in ``folder``."""
    with atomic_path(folder / "seeds.json") as tmp:
        Path(tmp).write_text(json.dumps({"seeds": seeds, "sd": "sample (n - 1)", **summaries}, indent=1) + "\n")
    with atomic_path(folder / "seeds.md") as tmp:
        Path(tmp).write_text(text)
