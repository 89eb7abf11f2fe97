"""`report.html`: one self-contained page that shows a person what a `predict` or `evaluate` run found, worst first.

Self-contained: the charts are inline SVG (matplotlib), the thumbnails small base64 JPEGs, the script a few
lines of inline vanilla JS (paging and filtering); nothing is fetched, so the file opens from a file manager and
can be mailed alone (the full-size overlays and the CSV are linked relatively, for when it sits in its run folder).

Bounded: a run of 100,000 images embeds only the `top` most and `bottom` least anomalous thumbnails (200 and 50
by default, ~4 KB each) and links the CSV for the rest; the histogram summarises every score. A 20,000-row
report stays under 3 MB (tests/test_html_report.py).

Built from the files a run leaves (`predictions.csv`, `skipped.csv`, the overlays; `evaluate`'s records), after
the run, by the main process: a resumed or multi-process run gets one report of everything. A report that
cannot be built is a warning, never a failed run (the CSV and results are already written).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import logging
import math
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..files import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["REPORT_HTML", "run_provenance", "threshold_origin", "write_prediction_report", "write_evaluation_report"]

REPORT_HTML = "report.html"
THUMBNAIL_SIDE = 160


def run_provenance() -> dict[str, str]:
    """The date (UTC, ISO 8601, seconds) and the vip2clip version that wrote a result."""
    from .. import __version__

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {"date": now.isoformat().replace("+00:00", "Z"), "package_version": __version__}


def threshold_origin(source: str, config: Any) -> str:
    """Where a run's image threshold came from, in words: `source` is what `ViP2CLIPConfig.resolve_threshold` said
    ("option", "calibrated" or "default"), detailed with the calibration's method and rate."""
    if source == "option":
        return "--threshold option"
    if source == "calibrated":
        calibration = getattr(config, "calibration", None) or {}
        method = str(calibration.get("method", "")).split(" (")[0]
        rate = calibration.get("false_alarm_rate")
        detail = f"{method}, false-alarm rate {rate:g}" if rate is not None else method
        return f"calibrated ({detail})" if detail else "calibrated (model config)"
    return "default (0.5; the model is not calibrated)"


def _model_source(model: str) -> str:
    """The model as given, and what kind of source it is."""
    return f"{model} (local folder)" if Path(model).expanduser().exists() else f"{model} (Hugging Face Hub id)"


# ---------------------------------------------------------------------------------------------------- pieces


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _svg(figure) -> str:
    """A matplotlib figure as inline SVG markup (text kept as text: smaller, searchable)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        # No metadata block: its date would make every report differ, its RDF namespaces look like links.
        figure.savefig(buffer, format="svg", bbox_inches="tight",
                       metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float = 6.4, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _histogram_svg(scores: np.ndarray, threshold: float | None, title: str) -> str:
    figure = _figure()
    axes = figure.add_subplot(1, 1, 1)
    axes.hist(scores, bins=50, range=(0.0, 1.0) if scores.size and scores.min() >= 0 and scores.max() <= 1 else None,
              color="#4c72b0", edgecolor="white", linewidth=0.4)
    if threshold is not None:
        axes.axvline(threshold, color="#c44e52", linewidth=1.6, label=f"threshold {threshold:.3g}")
        axes.legend(loc="upper right", fontsize=8)
    axes.set_xlabel("image anomaly score")
    axes.set_ylabel("images")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    return _svg(figure)


def _thumbnail(picture) -> str:
    """A PIL image as a small base64 JPEG data URI."""
    from PIL import Image

    picture = picture.convert("RGB")
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=72, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail_of_file(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as picture:
            picture.draft("RGB", (THUMBNAIL_SIDE * 2, THUMBNAIL_SIDE * 2))  # JPEG: decode at a reduced scale
            return _thumbnail(picture)
    except (OSError, ValueError):
        return None


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
dl.header { display: grid; grid-template-columns: max-content 1fr; gap: 0.15em 1em; }
dl.header dt { font-weight: 600; } dl.header dd { margin: 0; }
.counts span { display: inline-block; margin-right: 1.2em; font-size: 1.1em; } .counts b { font-size: 1.3em; }
.chart svg { max-width: 100%; height: auto; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 10px; }
.item { margin: 0; padding: 5px; border: 1px solid #ddd; border-radius: 4px; font-size: 12px; overflow-wrap: anywhere; }
.item img { width: 100%; height: auto; display: block; background: #eee; }
.item.anomalous { border-color: #c44e52; } .item .verdict { font-weight: 600; }
.item.anomalous .verdict { color: #c44e52; } .item.normal .verdict { color: #2a7a2a; }
.controls { margin: 0.6em 0; display: flex; gap: 0.8em; flex-wrap: wrap; align-items: center; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 2px 7px; text-align: right; }
td:first-child, th:first-child { text-align: left; } .note { color: #666; font-size: 12px; }
"""

# Paging and filtering of the (capped) gallery; no library.
_SCRIPT = """
(function () {
  const items = Array.from(document.querySelectorAll('#gallery .item'));
  const size = 60; let page = 0, shown = items;
  const verdict = document.getElementById('filter-verdict'), text = document.getElementById('filter-text');
  const info = document.getElementById('page-info');
  function apply() {
    const v = verdict.value, t = text.value.toLowerCase();
    shown = items.filter(el => (!v || el.dataset.verdict === v) && (!t || el.dataset.path.toLowerCase().includes(t)));
    const pages = Math.max(1, Math.ceil(shown.length / size)); page = Math.min(page, pages - 1);
    items.forEach(el => { el.hidden = true; });
    shown.slice(page * size, (page + 1) * size).forEach(el => { el.hidden = false; });
    info.textContent = 'page ' + (page + 1) + ' of ' + pages + ' (' + shown.length + ' images)';
  }
  document.getElementById('prev').onclick = () => { page = Math.max(0, page - 1); apply(); };
  document.getElementById('next').onclick = () => { page += 1; apply(); };
  verdict.onchange = text.oninput = () => { page = 0; apply(); };
  apply();
})();
"""


def _page(title: str, body: str, script: str = "") -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}\n"
            + (f"<script>{script}</script>" if script else "") + "</body></html>\n")


def _header(items: Sequence[tuple[str, str]]) -> str:
    return "<dl class=\"header\">" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items) + "</dl>"


def _skipped_table(rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return "<p>None.</p>"
    lines = "".join(f"<tr><td>{_e(path)}</td><td>{_e(reason)}</td></tr>" for path, reason in rows)
    return f"<table id=\"skipped\"><tr><th>input</th><th>reason</th></tr>{lines}</table>"


def _capped(order: np.ndarray, top: int, bottom: int) -> tuple[list[tuple[int, int]], int]:
    """`(rank, index)` (1-based rank in `order`, most anomalous first) of the gallery's images: all of them, or the
    first `top` and the last `bottom`; and how many were left out in between."""
    ranked = list(enumerate(order.tolist(), start=1))
    if order.size <= top + bottom:
        return ranked, 0
    return ranked[:top] + ranked[order.size - bottom:], int(order.size - top - bottom)


def _write(output_dir: Path, page: str) -> Path:
    path = output_dir / REPORT_HTML
    atomic_write_text(path, page)
    return path


# ---------------------------------------------------------------------------------------------------- predict


def write_prediction_report(output_dir: str | PathLike[str], *, model: str, threshold: float, threshold_from: str,
                            top: int = 200, bottom: int = 50) -> Path | None:
    """`OUTPUT_DIR/report.html` of a `vip2clip predict` run, from its `predictions.csv` and `skipped.csv`
    (whatever processes and resumptions wrote them). Returns its path, or None (with a warning) when it could
    not be written."""
    try:
        return _prediction_report(Path(output_dir), model, threshold, threshold_from, top, bottom)
    except Exception as error:  # noqa: BLE001 - the run's results are written; the report is a view of them
        logger.warning("report.html not written: %s: %s", type(error).__name__, error)
        return None


def _prediction_report(output_dir: Path, model: str, threshold: float, threshold_from: str, top: int,
                       bottom: int) -> Path:
    from .results_csv import PREDICTIONS_CSV, SKIPPED_CSV, read_csv_rows

    header, rows = read_csv_rows(output_dir / PREDICTIONS_CSV)
    _, skipped = read_csv_rows(output_dir / SKIPPED_CSV)
    header = header or ["path", "score", "verdict", "overlay"]
    column = {name: index for index, name in enumerate(header)}
    scores = np.array([float(row[column["score"]]) for row in rows], dtype=np.float64)
    anomalous = sum(1 for row in rows if row[column["verdict"]] == "anomalous")
    order = np.argsort(-scores, kind="stable")
    chosen, left_out = _capped(order, top, bottom)
    provenance = run_provenance()

    figures = []
    for rank, index in chosen:
        row = rows[index]
        overlay = row[column["overlay"]] if "overlay" in column and len(row) > column["overlay"] else ""
        source = _thumbnail_of_file(output_dir / overlay) if overlay else None
        picture = (f"<a href=\"{_e(overlay)}\"><img src=\"{source}\" alt=\"overlay of {_e(row[0])}\"></a>" if source
                   else "<div class=\"note\">(no overlay)</div>")
        verdict = row[column["verdict"]]
        figures.append(
            f"<figure class=\"item {_e(verdict)}\" data-score=\"{scores[index]:.6f}\" data-verdict=\"{_e(verdict)}\" "
            f"data-path=\"{_e(row[0])}\" data-rank=\"{rank}\">"
            f"{picture}<figcaption><span class=\"score\">{scores[index]:.3f}</span> "
            f"<span class=\"verdict\">{_e(verdict)}</span><br><span class=\"path\">{_e(row[0])}</span>"
            "</figcaption></figure>")
    try:
        histogram = (_histogram_svg(scores, threshold, f"{len(rows)} images") if scores.size
                     else "<p>No image was scored.</p>")
    except ImportError:  # matplotlib comes with the train extra; predict runs without it
        histogram = "<p class=\"note\">No histogram: install matplotlib (pip install 'vip2clip[train]').</p>"
    cap = (f"<p class=\"note\" id=\"cap-note\">Showing the {top} most and the {bottom} least anomalous of "
           f"{len(rows)} images ({left_out} in between are in <a href=\"{PREDICTIONS_CSV}\">{PREDICTIONS_CSV}</a>)."
           "</p>" if left_out else "")
    body = f"""<h1>vip2clip predict — {_e(output_dir.name or output_dir)}</h1>
{_header([("model", _model_source(model)), ("threshold", f"{threshold:g} — {threshold_from}"), ("date", provenance["date"]),
          ("vip2clip", provenance["package_version"]), ("results", PREDICTIONS_CSV)])}
<p class="counts" id="counts" data-scored="{len(rows)}" data-anomalous="{anomalous}" data-skipped="{len(skipped)}">
<span><b>{len(rows)}</b> scored</span><span><b>{anomalous}</b> anomalous</span><span><b>{len(skipped)}</b> skipped</span>
<a href="{PREDICTIONS_CSV}">{PREDICTIONS_CSV}</a></p>
<h2>Scores</h2><div class="chart" id="histogram">{histogram}</div>
<h2>Images, most anomalous first</h2>{cap}
<div class="controls"><label>verdict <select id="filter-verdict"><option value="">all</option>
<option value="anomalous">anomalous</option><option value="normal">normal</option></select></label>
<label>path contains <input id="filter-text" type="search"></label>
<button id="prev">◀ previous</button><span id="page-info"></span><button id="next">next ▶</button></div>
<div class="gallery" id="gallery">{''.join(figures)}</div>
<h2>Skipped inputs ({len(skipped)})</h2>{_skipped_table(skipped)}
<p class="note">Overlays: the anomaly map (jet, fixed scale 0 … 1) over the image; click a thumbnail for the full
overlay. Written by vip2clip {_e(provenance["package_version"])}.</p>"""
    return _write(output_dir, _page(f"vip2clip predict — {output_dir.name}", body, _SCRIPT))


# ---------------------------------------------------------------------------------------------------- evaluate


def write_evaluation_report(output_dir: str | PathLike[str], results: dict, records: dict, dataset, processor,
                            threshold: float | None = None, worst: int = 6) -> Path | None:
    """`OUTPUT_DIR/report.html` of a `vip2clip evaluate` run: its header, the per-category metrics, the ROC and PR
    curves, and per category the `worst` highest-scored normal images (false positives first) and lowest-scored
    anomalous ones (false negatives first) with their maps. `records` are the evaluation's per-sample records
    (`PartialResults.records()`: label, score, category, where the map is), `dataset` the evaluated rows (their
    images). Returns the path, or None (with a warning) when it could not be written."""
    try:
        return _evaluation_report(Path(output_dir), results, records, dataset, processor, threshold, worst)
    except Exception as error:  # noqa: BLE001 - the results are written; the report is a view of them
        logger.warning("report.html not written: %s: %s", type(error).__name__, error)
        return None


def _metrics_table(results: dict) -> str:
    from ..post_processing.metrics import METRIC_KEYS

    rows = {**results.get("per_category", {}), "mean": results.get("mean", {})}
    counts = results.get("counts", {})

    def cell(value) -> str:
        return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.3f}"

    head = "".join(f"<th>{_e(key)}</th>" for key in METRIC_KEYS)
    lines = []
    for name, metrics in rows.items():
        count = counts.get(name, {})
        images = f"{count.get('normal', '')} / {count.get('anomalous', '')}" if count else ""
        lines.append(f"<tr><td>{_e(name)}</td><td>{images}</td>"
                     + "".join(f"<td>{cell(metrics.get(key))}</td>" for key in METRIC_KEYS) + "</tr>")
    return (f"<table id=\"metrics\"><tr><th>category</th><th>normal / anomalous</th>{head}</tr>{''.join(lines)}"
            "</table><p class=\"note\">Fractions in [0, 1], as in results.json and results.md.</p>")


def _curves_svg(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> tuple[str, str]:
    """The ROC (engine.report's drawing) and the precision-recall curves of every category with both classes."""
    import warnings

    from sklearn.metrics import average_precision_score, precision_recall_curve

    from .report import draw_roc_curves

    roc = _figure(5.2, 4.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        draw_roc_curves(roc.add_subplot(1, 1, 1), curves, title=f"ROC — {title}")
    roc.tight_layout()
    pr = _figure(5.2, 4.8)
    axes = pr.add_subplot(1, 1, 1)
    for name, (labels, scores) in curves.items():
        if 0 < int(labels.sum()) < labels.size:
            precision, recall, _ = precision_recall_curve(labels, scores)
            axes.plot(recall, precision, linewidth=1.4,
                      label=f"{name} (AP {100 * average_precision_score(labels, scores):.1f})")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(f"Precision-recall — {title}")
    axes.grid(True, alpha=0.3)
    if axes.lines:
        axes.legend(loc="lower left", fontsize=8)
    pr.tight_layout()
    return _svg(roc), _svg(pr)


def _evaluation_report(output_dir: Path, results: dict, records: dict, dataset, processor, threshold: float | None,
                       worst: int) -> Path:
    from ..processing_vip2clip import annotate_overlay

    provenance = run_provenance()
    usable = [(index, record) for index, record in records.items() if not record["bad"]]
    by_category: dict[str, list[tuple[int, dict]]] = {}
    for index, record in usable:
        by_category.setdefault(record["category"], []).append((index, record))
    curves = {name: (np.array([r["label"] for _, r in rows], dtype=np.int64),
                     np.array([r["score"] for _, r in rows], dtype=np.float64))
              for name, rows in sorted(by_category.items())}
    roc_svg, pr_svg = _curves_svg(curves, str(results.get("dataset", "")))

    opened: dict[Path, np.ndarray] = {}

    def thumbnail(index: int, record: dict, label: str) -> str:
        directory = record["dir"]
        if directory not in opened:
            opened[directory] = np.load(directory / "map.npy", mmap_mode="r")
        anomaly_map = np.array(opened[directory][record["row"]], dtype=np.float32)  # a copy: torch wants it writable
        import torch

        picture = processor.overlay(dataset[int(index)]["image"], torch.from_numpy(anomaly_map))
        return _thumbnail(annotate_overlay(picture, record["score"], threshold, label=label))

    sections = []
    for name, rows in sorted(by_category.items()):
        normal = sorted((item for item in rows if item[1]["label"] == 0), key=lambda item: -item[1]["score"])[:worst]
        anomalous = sorted((item for item in rows if item[1]["label"] == 1), key=lambda item: item[1]["score"])[:worst]
        blocks = []
        for kind, chosen, miss in (("highest-scored normal images (false positives first)", normal, "false positive"),
                                   ("lowest-scored anomalous images (false negatives first)", anomalous,
                                    "false negative")):
            figures = []
            for index, record in chosen:
                wrong = threshold is not None and ((record["score"] >= threshold) == (record["label"] == 0))
                verdict = miss if wrong else ("labelled normal" if record["label"] == 0 else "labelled anomalous")
                figures.append(
                    f"<figure class=\"item {'anomalous' if wrong else 'normal'}\" data-score=\"{record['score']:.6f}\">"
                    f"<img src=\"{thumbnail(index, record, verdict)}\" alt=\"map of {_e(record['image_path'])}\">"
                    f"<figcaption><span class=\"score\">{record['score']:.3f}</span> <span class=\"verdict\">"
                    f"{_e(verdict)}</span><br>{_e(record['image_path'])}</figcaption></figure>")
            blocks.append(f"<h3>{_e(kind)}</h3>" + (f"<div class=\"gallery\">{''.join(figures)}</div>" if figures
                                                   else "<p>None.</p>"))
        sections.append(f"<section class=\"category\" data-category=\"{_e(name)}\"><h2>{_e(name)}</h2>"
                        + "".join(blocks) + "</section>")

    skipped = [(item.get("image_path", ""), item.get("reason", "")) for item in results.get("skipped", [])]
    k_shot = int(results.get("k_shot", 0) or 0)
    mode = f"{k_shot}-shot (seeds {', '.join(map(str, results.get('shot_seeds', [])))})" if k_shot else "zero-shot"
    rule = (f"{threshold:g} (the model's calibrated image_threshold)" if threshold is not None else
            "none (the model is not calibrated): no verdicts, images ranked by score")
    body = f"""<h1>vip2clip evaluate — {_e(results.get("dataset", ""))} ({_e(results.get("split", ""))})</h1>
{_header([("model", _model_source(str(results.get("model", "")))), ("dataset", results.get("dataset", "")),
          ("split", results.get("split", "")), ("mode", mode), ("threshold", rule), ("date", provenance["date"]),
          ("vip2clip", provenance["package_version"]), ("results", "results.json, results.md")])}
<p class="counts" id="counts" data-scored="{len(usable)}" data-skipped="{len(skipped)}">
<span><b>{len(usable)}</b> evaluated</span><span><b>{len(skipped)}</b> skipped</span></p>
<h2>Metrics</h2>{_metrics_table(results)}
<h2>Curves (image level)</h2><div class="chart" id="roc">{roc_svg}</div><div class="chart" id="pr">{pr_svg}</div>
{''.join(sections)}
<h2>Skipped inputs ({len(skipped)})</h2>{_skipped_table(skipped)}"""
    return _write(output_dir, _page(f"vip2clip evaluate — {results.get('dataset', '')}", body))
