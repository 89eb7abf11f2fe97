"""Reports of an evaluation: the markdown table of per-category metrics and the drawn image-level ROC curves.

`metrics` holds the math; this module only formats and draws what it computed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ..post_processing.metrics import METRIC_KEYS, _image_inputs, _undefined, summarize

__all__ = ["draw_roc_curves", "format_markdown_table", "markdown_heading", "plot_roc_curves", "roc_curve_points"]


def format_markdown_table(
    results: Mapping[str, Mapping[str, float]],
    columns: list[str] | tuple[str, ...] | None = None,
    std: Mapping[str, Mapping[str, float]] | None = None,
    unit: str = "percent",
) -> str:
    """Markdown (pipe) table: one row per category plus ``mean``, values x100 with one decimal (``unit="percent"``,
    as papers print them) or as fractions in [0, 1] with three decimals (``unit="fraction"``, as results.json
    holds them — what `vip2clip evaluate` writes to results.md).

    With ``std`` (same keys, e.g. over few-shot seeds) each cell reads ``mean ± std``, as the few-shot literature
    reports.

    ``results`` maps category -> metrics (as from :func:`compute_category_metrics`);
    the ``mean`` row is added with :func:`summarize` when absent.  By default
    the columns are :data:`METRIC_KEYS` (then any other keys) that are not
    NaN in every row.  Undefined values print as ``nan``.
    """
    table = dict(results) if "mean" in results else summarize(results)
    rows = [k for k in table if k != "mean"] + ["mean"]
    if columns is None:
        present: list[str] = []
        for r in rows:
            present.extend(k for k in table[r] if k not in present)
        ordered = [k for k in METRIC_KEYS if k in present] + [k for k in present if k not in METRIC_KEYS]

        def all_nan(key: str) -> bool:
            return all(math.isnan(float(table[r].get(key, float("nan")))) for r in rows)

        columns = [k for k in ordered if not all_nan(k)]

    if unit not in ("percent", "fraction"):
        raise ValueError(f"unit {unit!r}: must be 'percent' or 'fraction'.")

    def fmt(v: float) -> str:
        v = float(v)
        if math.isnan(v):
            return "nan"
        # np.round then one decimal, as the reference table does.
        return f"{np.round(v * 100, 1):.1f}" if unit == "percent" else f"{v:.3f}"

    header = ["objects", *columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|:" + "-" * max(len(header[0]) - 1, 3) + "|" + "|".join("-" * max(len(c) - 1, 3) + ":" for c in columns) + "|",
    ]
    def cell(r: str, c: str) -> str:
        text = fmt(table[r].get(c, float("nan")))
        if std is not None and r in std:
            text += " ± " + fmt(std[r].get(c, float("nan")))
        return text

    for r in rows:
        lines.append("| " + " | ".join([r, *(cell(r, c) for c in columns)]) + " |")
    return "\n".join(lines) + "\n"


def markdown_heading(results: Mapping[str, Any]) -> str:
    """The heading of results.md: what was evaluated, how, when and by which version, and the unit."""
    k_shot = int(results.get("k_shot", 0) or 0)
    mode = f"{k_shot}-shot (seeds {', '.join(map(str, results.get('shot_seeds', [])))})" if k_shot else "zero-shot"
    lines = [
        f"# {results.get('dataset', '')} ({results.get('split', '')}): vip2clip evaluate",
        "",
        f"- model: {results.get('model', '')}",
        f"- dataset: {results.get('dataset', '')}, split {results.get('split', '')}, "
        f"{results.get('num_evaluated', '')} of {results.get('num_samples', '')} images evaluated",
        f"- k-shot: {mode}; AUPRO: {results.get('pro_mode', '')}",
        f"- date: {results.get('date', '')}; vip2clip {results.get('package_version', '')}",
        "- unit: fractions in [0, 1] (as in results.json)",
        "",
    ]
    return "\n".join(lines) + "\n"


def plot_roc_curves(
    results: Mapping[str, tuple[Any, Any]], path: str | PathLike[str], title: str = "Image-level ROC"
) -> Path:
    """Draw the image-level ROC curve of each category to a PNG; returns the path.

    ``results`` maps category -> ``(labels, scores)``.  Categories where the
    ROC is undefined (a single class) are skipped with a warning.  Uses the
    Agg canvas directly, so pyplot's global backend/state is left untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.0), dpi=120)
    FigureCanvasAgg(fig)
    draw_roc_curves(fig.add_subplot(1, 1, 1), results, title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def draw_roc_curves(ax, results: Mapping[str, tuple[Any, Any]], title: str = "Image-level ROC") -> int:
    """The ROC curves of `results` (category -> (labels, scores)) on the matplotlib axes `ax` (the drawing of
    `plot_roc_curves` and of report.html); returns how many were drawn."""
    from sklearn.metrics import roc_auc_score

    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    n_drawn = 0
    for name, (labels, scores) in results.items():
        y, s = _image_inputs(labels, scores)
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == y.size:
            _undefined(f"ROC curve of {name!r}", "single class among the images (skipped in the plot)")
            continue
        fpr, tpr = roc_curve_points(y, s)
        ax.plot(fpr, tpr, linewidth=1.4, label=f"{name} (AUROC {100 * roc_auc_score(y, s):.1f})")
        n_drawn += 1
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=7 if n_drawn > 8 else 9, frameon=True)
    return n_drawn


def roc_curve_points(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """The (FPR, TPR) points drawn for one category: scikit-learn's `roc_curve`."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr
