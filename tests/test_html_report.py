"""report.html (engine/html_report.py): what the page of a `predict` run holds, read back from its markup and
checked against the CSV it was built from; a 20,000-row run stays under 3 MB; the page opened in a real headless
Chromium (Playwright with Debian's chromium, as tests/test_demo.py) shows the highest score first, as many
gallery items as it embeds, the CSV's counts and the histogram."""

from __future__ import annotations

import csv
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch import CHROMIUM, chromium_context
from modeling_vip2clip.engine.html_report import REPORT_HTML, write_prediction_report

SIZE_BOUND = 3_000_000  # bytes: a 20,000-row report (250 thumbnails, the histogram) must stay under this


class _Facts(HTMLParser):
    """The gallery items (their data- attributes and whether they embed a thumbnail), the counts and the charts."""

    def __init__(self):
        super().__init__()
        self.items: list[dict] = []
        self.counts: dict | None = None
        self.svg_in: list[str] = []
        self._open: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure" and "item" in attrs.get("class", ""):
            self.items.append({**attrs, "thumbnail": False})
        if tag == "img" and self.items and attrs.get("src", "").startswith("data:image/jpeg;base64,"):
            self.items[-1]["thumbnail"] = True
        if tag in ("script", "link", "img") and (attrs.get("src") or attrs.get("href") or "").startswith("http"):
            self.external.append(attrs.get("src") or attrs.get("href"))
        if attrs.get("id") == "counts":
            self.counts = attrs
        if tag == "div" and attrs.get("id"):
            self._open.append(attrs["id"])
        if tag == "svg" and self._open:
            self.svg_in.append(self._open[-1])


def _facts(path: Path) -> _Facts:
    parser = _Facts()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _synthetic_run(root: Path, rows: int, overlays: int = 40, skipped: int = 3, seed: int = 0) -> tuple[list, list]:
    """A predict output folder without a model: `rows` CSV rows (random scores, verdict at 0.5), the overlays of
    `overlays` distinct pictures (annotated as predict draws them) shared cyclically by the rows, and a
    skipped.csv."""
    from modeling_vip2clip.processing_vip2clip import annotate_overlay, jet_colormap

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(overlays):
        heat = jet_colormap(np.kron(rng.random((8, 8)), np.ones((48, 48))))  # smooth 384² maps
        picture = annotate_overlay(Image.fromarray(heat), float(rng.random()), 0.5)
        name = f"overlays/cam_{index % 3}/img_{index:05d}.overlay.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        picture.save(root / name)
        names.append(name)
    scores = rng.beta(2, 5, rows)
    table = [[f"/data/line3/cam_{i % 3}/img_{i:05d}.png", f"{s:.6f}", "anomalous" if s >= 0.5 else "normal",
              names[i % overlays]] for i, s in enumerate(scores)]
    with open(root / "predictions.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["path", "score", "verdict", "overlay"], *table])
    bad = [[f"/data/line3/broken_{i}.png", "UnidentifiedImageError: cannot identify image file"] for i in range(skipped)]
    with open(root / "skipped.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["path", "reason"], *bad])
    return table, bad


def test_small_run_embeds_every_row_highest_score_first(tmp_path):
    table, bad = _synthetic_run(tmp_path / "run", rows=30, overlays=5)
    path = write_prediction_report(tmp_path / "run", model="org/model", threshold=0.5, threshold_from="default")
    assert path == tmp_path / "run" / REPORT_HTML
    facts = _facts(path)
    scores = [float(item["data-score"]) for item in facts.items]
    assert len(facts.items) == 30 and scores == sorted((float(row[1]) for row in table), reverse=True)
    assert all(item["thumbnail"] for item in facts.items) and not facts.external
    assert [item["data-rank"] for item in facts.items] == [str(i) for i in range(1, 31)]
    anomalous = sum(row[2] == "anomalous" for row in table)
    assert (facts.counts["data-scored"], facts.counts["data-anomalous"], facts.counts["data-skipped"]) == (
        "30", str(anomalous), str(len(bad)))
    assert facts.svg_in == ["histogram"]
    text = path.read_text(encoding="utf-8")
    assert "org/model" in text and "0.5 — default" in text and "broken_2.png" in text and "vip2clip" in text


def test_twenty_thousand_rows_stay_under_the_size_bound(tmp_path):
    """The gallery is capped (200 most + 50 least anomalous), the rest is in the linked CSV; the page's size
    does not grow with the rows beyond the histogram."""
    table, _ = _synthetic_run(tmp_path / "run", rows=20_000)
    path = write_prediction_report(tmp_path / "run", model="m", threshold=0.5, threshold_from="default")
    size = path.stat().st_size
    assert size < SIZE_BOUND, f"{size} bytes"
    facts = _facts(path)
    ranked = sorted((float(row[1]) for row in table), reverse=True)
    scores = [float(item["data-score"]) for item in facts.items]
    assert len(scores) == 250 and scores == ranked[:200] + ranked[-50:]
    assert [int(item["data-rank"]) for item in facts.items][199:201] == [200, 19_951]
    assert facts.counts["data-scored"] == "20000" and "19750 in between" in path.read_text(encoding="utf-8")


def test_a_report_that_cannot_be_built_is_a_warning(tmp_path, caplog):
    (tmp_path / "predictions.csv").write_text("path,score,verdict,overlay\nx.png,not-a-number,normal,\n")
    with caplog.at_level("WARNING"):
        assert write_prediction_report(tmp_path, model="m", threshold=0.5, threshold_from="default") is None
    assert "report.html not written" in caplog.text and not (tmp_path / REPORT_HTML).exists()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")
def test_report_in_a_real_browser(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    table, bad = _synthetic_run(tmp_path / "run", rows=20_000)
    path = write_prediction_report(tmp_path / "run", model="m", threshold=0.5, threshold_from="default")
    expected_max = max(float(row[1]) for row in table)
    anomalous = sum(row[2] == "anomalous" for row in table)
    artifacts = Path(__file__).resolve().parents[1] / "artifacts"
    artifacts.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        context = chromium_context(p, tmp_path / "chromium-profile", 1300, 1000)
        try:
            page = context.new_page()
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(path.as_uri(), wait_until="load")
            assert page.locator("#gallery .item").count() == 250
            visible = page.locator("#gallery .item:visible")
            assert visible.count() == 60  # the first page
            first = visible.first
            assert float(first.get_attribute("data-score")) == pytest.approx(expected_max, abs=1e-6)
            assert first.locator(".score").inner_text() == f"{expected_max:.3f}"
            # every thumbnail decoded (naturalWidth > 0), none fetched from anywhere but this file
            assert page.eval_on_selector_all("#gallery .item:not([hidden]) img", "els => els.every(e => e.naturalWidth > 0)")
            assert all(url.startswith(("file:", "data:")) for url in requests), requests
            counts = page.locator("#counts")
            assert counts.get_attribute("data-scored") == str(len(table))
            assert counts.get_attribute("data-anomalous") == str(anomalous)
            assert counts.get_attribute("data-skipped") == str(len(bad))
            assert f"{len(table)} scored" in counts.inner_text().replace("\n", " ")
            box = page.locator("#histogram svg").bounding_box()
            assert box is not None and box["width"] > 200 and box["height"] > 100
            # paging and the verdict filter
            page.click("#next")
            second = page.locator("#gallery .item:visible").first
            assert int(second.get_attribute("data-rank")) == 61
            page.select_option("#filter-verdict", "normal")
            shown = page.locator("#gallery .item:visible")
            assert shown.count() > 0 and all(
                verdict == "normal" for verdict in shown.evaluate_all("els => els.map(e => e.dataset.verdict)"))
            assert "page 1 of" in page.inner_text("#page-info")
            page.select_option("#filter-verdict", "")
            page.screenshot(path=str(artifacts / "report_screenshot.png"), full_page=False)
            assert errors == []
        finally:
            context.close()
