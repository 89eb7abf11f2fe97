"""The demo under load (issue #7): the real server on a tiny model, 50 requests from 5 concurrent gradio_client
clients mixing good and bad files, then 20 identical requests from 5 clients (issue 19); every request answered,
the server healthy and its memory back afterwards.

Localhost only (127.0.0.1). The load itself lives in benchmarks/load_demo.py (also a script printing the figures).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# gradio_client stages each download in <tempdir>/<40 hex>/: keep those inside the test's tmp_path.
pytestmark = pytest.mark.usefixtures("contained_tempdir")

ROOT = Path(__file__).resolve().parents[1]
REQUESTS, CLIENTS, PER_REQUEST_TIMEOUT_S, SETTLE_S = 50, 5, 30, 20


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def load_demo():
    return _load("vip2clip_load_demo", ROOT / "benchmarks" / "load_demo.py")


@pytest.fixture(scope="module")
def app_module():
    return _load("vip2clip_demo_app_load", ROOT / "demo" / "app.py")


@pytest.fixture(scope="module")
def model_dir(load_demo, tmp_path_factory):
    return load_demo.save_tiny_model(tmp_path_factory.mktemp("load_model") / "tiny")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_under_load(load_demo, model_dir, tmp_path):
    inputs = load_demo.make_inputs(tmp_path / "inputs")
    assert {i.name for i in inputs if not i.good} == {"corrupt.png", "empty.png", "notes.png", "huge.png"}
    assert {"sixteen_bit.tif", "generated_rgb.png", "fabric_hole.png"} <= {i.name for i in inputs if i.good}
    server = load_demo.DemoServer(model_dir, tmp_path / "server")  # no --host: the app's default
    try:
        server.wait(timeout=120)
        # binds the loopback address only, by default
        listening = server.listen_addresses()
        assert listening and {ip for ip, _ in listening} == {"127.0.0.1"}, listening
        assert server.port in {port for _, port in listening}

        report, records = load_demo.load_session(
            server, inputs, tmp_path / "clients", requests=REQUESTS, clients=CLIENTS, timeout=PER_REQUEST_TIMEOUT_S,
            settle=SETTLE_S,
        )
        print(report)

        # every request answered, as expected for its file
        assert report.warmup_ok
        assert len(records) == REQUESTS and {r.client for r in records} == set(range(CLIENTS)), records
        assert report.unanswered == report.exceptions == report.wrong == 0, report.problems
        by_name = {item.name: item for item in inputs}
        for record in records:
            item = by_name[record.input]
            if item.good:  # a score in [0, 1]
                assert record.outcome == "ok" and 0.0 <= record.score <= 1.0, record
            else:  # a readable message naming the file and the problem, no traceback
                assert record.outcome == "message", record
                assert record.detail.startswith(f"{item.name}: ") and any(p in record.detail for p in item.expect)
                assert "Traceback" not in record.detail and 'File "' not in record.detail
        assert report.ok == sum(by_name[r.input].good for r in records) and report.ok + report.error_messages == REQUESTS
        for item in inputs:  # each file went through both inputs (single image and batch)
            sent = [r for r in records if r.input == item.name]
            assert {r.batch for r in sent} == {False, True}, item.name
        assert report.latency_max_s < PER_REQUEST_TIMEOUT_S

        # healthy afterwards: alive, answers one more good request, nothing crashed in the log
        assert report.server_alive and server.alive()
        assert report.answers_after_load
        assert not report.traceback_in_server_log, server.output()[-3000:]
        # memory back within 10 % of its level before the load (after a warm-up round)
        assert report.rss_after_mib <= 1.10 * report.rss_before_mib, report
        # uploads were cached in this test's temp dir (GRADIO_TEMP_DIR), not the user's
        assert any(path.name == "notes.png" for path in server.temp_dir.rglob("*"))

        # 5 clients sending the *same* image at once (issue 19): identical results share Gradio's content-hash
        # cache path, which was rewritten while being served (h11 "Too little data for declared Content-Length");
        # modeling_vip2clip.gradio_cache makes those writes write-once, renamed into place.
        same = next(item for item in inputs if item.good)
        identical = load_demo.run_load(server.url, [same], requests=20, clients=CLIENTS, timeout=PER_REQUEST_TIMEOUT_S,
                                       download_dir=tmp_path / "identical")
        assert [r.outcome for r in identical] == ["ok"] * 20, [r for r in identical if r.outcome != "ok"][:3]
        assert server.alive() and "Traceback" not in server.output(), server.output()[-3000:]
    finally:
        server.stop()
    assert not server.alive()


def test_session_state_expires_and_expired_rethreshold_keeps_the_page(app_module, capsys):
    """Each session's last results are held for re-thresholding; API clients never close their session, so the
    state must expire, and moving a slider after that must leave the page as it is."""
    import gradio as gr

    app = app_module.AnomalyDemo(app_module.LoadedModel(None, None, "none", trained=False))
    outputs = app.rethreshold(None, 0.3, 0.7)
    assert len(outputs) == 5 and all(output == gr.skip() for output in outputs)
    assert "No results to re-threshold" in capsys.readouterr().out  # gr.Info outside a running app prints
    demo = app_module.build_demo(app)
    states = [block for block in demo.blocks.values() if isinstance(block, gr.State)]
    assert len(states) == 1 and states[0].time_to_live == app_module.STATE_TTL_S <= 3600
