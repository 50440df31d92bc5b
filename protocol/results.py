"""The runner's results: the scoring stages' figures collected into ``results.json`` and the
table ``results.md`` beside the published figures, and the seeds' ``seeds.json`` / ``seeds.md``.
"""
from __future__ import annotations

import json
from pathlib import Path

from core.fileio import atomic_path
from protocol import rows
from protocol.plan import Plan, cams_name
from crf.params import resolve_backend


def collect(plan: Plan) -> dict:
    """The results of the scoring stages that ran: row key -> {"miou", "t"?}."""
    def read(path: Path) -> dict:
        return json.loads(path.read_text())

    def best(path: Path) -> dict:
        return {"miou": read(path)["best"]["miou"], "t": read(path)["best"]["t"]}

    def miou(path: Path) -> dict:
        return {"miou": read(path)["result"]["miou"]}

    score = plan.out("eval_score")
    sweep = read(score / "transcam.json")["sweep"]
    fixed = min(sweep, key=lambda row: abs(row["t"] - plan.protocol.fixed_t))
    results = {"bao_pseudo": miou(plan.out("pseudo_score") / "bao_pseudo.json"),
               "bao_maps_best": best(score / "bao_maps.json"), "transcam_best": best(score / "transcam.json"),
               "transcam_fixed": {"miou": fixed["miou"], "t": fixed["t"]}}
    if plan.runs("cnn_score"):
        results["cnn_best"] = best(plan.out("cnn_score") / "cnn.json")
    for stage in ("seg_val", "seg_upper"):
        if plan.runs(stage):
            results[stage] = miou(plan.out(stage) / "pred.json")
            results[f"{stage}_crf"] = miou(plan.out(stage) / "crf.json")
    return results


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
    if plan.runs("seg_test"):
        archive = plan.out("seg_test") / "results.tar.gz"
        lines.append(f"\nTest set ({names['seg_test']}): upload `{archive}` to the evaluation server; published: "
                     f"{rows.published(plan.protocol.published, 'seg_test')}.")
    text = "\n".join(lines) + "\n"
    with atomic_path(plan.run_dir / "results.json") as tmp:
        Path(tmp).write_text(json.dumps({"lists": plan.lists, "refine": plan.args.refine,
                                         "crf_backend": resolve_backend(plan.args.crf_backend), "results": results},
                                        indent=1) + "\n")
    with atomic_path(plan.run_dir / "results.md") as tmp:
        Path(tmp).write_text(text)
    return text


def write_seed_table(plans: list[Plan], folder: Path) -> str:
    """``seeds.json`` and ``seeds.md`` in ``folder``: :func:`protocol.rows.seed_summary` of the plans'
    ``results.json`` (every plan one seed, all finished); returns the Markdown."""
    per_seed = {p.seed: json.loads((p.run_dir / "results.json").read_text())["results"] for p in plans}
    summary = rows.seed_summary(per_seed)
    first = plans[0]
    text = (f"Seeds {', '.join(map(str, sorted(per_seed)))}: mean ± sample standard deviation (n - 1) over the "
            f"seeds, then each seed's value ({_regime(first)}).\n\n"
            + rows.seed_table(summary, cams_name(first), first.protocol.fixed_t, published_column(first)))
    write_seed_files(folder, sorted(per_seed), {"rows": summary}, text)
    return text


def write_seed_files(folder: Path, seeds: list[int], summaries: dict, text: str) -> None:
    """``seeds.json`` (the seeds, the kind of sd, ``summaries``) and ``seeds.md`` (``text``) in ``folder``."""
    with atomic_path(folder / "seeds.json") as tmp:
        Path(tmp).write_text(json.dumps({"seeds": seeds, "sd": "sample (n - 1)", **summaries}, indent=1) + "\n")
    with atomic_path(folder / "seeds.md") as tmp:
        Path(tmp).write_text(text)
