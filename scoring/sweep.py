"""The results of a background-score sweep: the best threshold (its one home), the printed table,
the JSON rows and the plot.

Every caller that picks a background score from a sweep (evaluation_bao.py, the validation of
TransCAM between epochs in :mod:`scoring.validation`, bench/bench_eval.py) uses
:func:`best_threshold`, so a tie or a NaN is decided alike everywhere.
"""
from __future__ import annotations

import numpy as np

from core.fileio import atomic_path

# The means of :func:`scoring.metrics.scores` a sweep reports per threshold, in column order.
SWEEP_KEYS = ("miou", "mean_fp", "mean_fn", "mean_precision", "mean_recall")


def best_threshold(thresholds: np.ndarray, mious: np.ndarray) -> tuple[int, float]:
    """The index of the highest mIoU and its background score, rounded to 6 decimals.

    Args:
        thresholds: (T,) the background scores swept.
        mious: (T,) their mIoU; NaN (nothing to score) never wins.

    Ties go to the lowest threshold (the first). When every mIoU is NaN, the first threshold is
    returned (its mIoU is NaN too; callers that must refuse that case check it first).
    """
    mious = np.asarray(mious, np.float64)
    best = 0 if np.all(np.isnan(mious)) else int(np.nanargmax(mious))
    return best, float(round(float(thresholds[best]), 6))


def _num(value: float) -> float | None:
    """A JSON number, or None for NaN (no valid JSON number)."""
    return None if np.isnan(value) else float(value)


def sweep_table(thresholds: np.ndarray, results: list[dict]) -> str:
    """The printed sweep: one line per threshold (T,) with the means of ``results`` in percent."""
    lines = [f"{'t':>6}{'mIoU':>8}{'FP':>8}{'FN':>8}{'prec':>8}{'recall':>8}"]
    for t, r in zip(thresholds, results):
        lines.append(f"{t:6.2f}" + "".join(f"{100 * r[k]:8.2f}" for k in SWEEP_KEYS))
    return "\n".join(lines)


def sweep_json(thresholds: np.ndarray, results: list[dict]) -> list[dict]:
    """The sweep as JSON rows: ``{"t", "miou", "mean_fp", ...}`` per threshold (fractions; NaN as null)."""
    return [{"t": float(round(float(t), 6)), **{k: _num(r[k]) for k in SWEEP_KEYS}}
            for t, r in zip(thresholds, results)]


def plot_sweep(path: str, thresholds: np.ndarray, results: list[dict], ref: tuple[float, str] | None,
               title: str) -> None:
    """Save a PNG of mIoU, FP and FN (%) against the background scores (T,), the best one marked,
    with an optional reference mIoU line ``ref`` = (mIoU in %, legend label); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("miou", "mIoU", "-"), ("mean_fp", "FP", "--"), ("mean_fn", "FN", ":")):
        ax.plot(thresholds, [100 * r[key] for r in results], style, label=label)
    mious = np.array([100 * r["miou"] for r in results])
    best, _ = best_threshold(thresholds, mious)
    ax.plot([thresholds[best]], [mious[best]], "o", color="C0",
            label=f"best t = {thresholds[best]:.2f} ({mious[best]:.2f})")
    if ref is not None:
        ax.axhline(ref[0], color="k", linewidth=1, linestyle="-.", label=f"{ref[1]} ({ref[0]:.2f})")
    ax.set_xlabel("background score t")
    ax.set_ylabel("%")
    ax.set_title(title or "threshold sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    print(f"plot saved to {path}")
