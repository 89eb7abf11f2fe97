"""Load test of the Gradio demo (demo/app.py) on localhost: concurrent clients, good and bad uploads, memory.

Starts the real server in a subprocess on 127.0.0.1 (the app's default host; never any other address), sends
`--requests` requests to its `/detect` endpoint from `--clients` concurrent `gradio_client.Client` instances
(one thread each), cycling through good images (the demo's examples, a generated RGB PNG larger than the display
size, a 16-bit TIFF) and bad files (corrupt PNG bytes, a 0-byte file, a text file named .png, a 10⁸-pixel PNG over
the app's pixel limit), some through the single-image input and some through the batch input, and prints ONE
JSON line:

* `ok` (a score in [0, 1]), `error_messages` (a readable message naming the file, no traceback),
  `wrong` (answered, but not as expected), `exceptions` (the client raised), `unanswered` (no answer in
  `--timeout` s);
* latency p50 / p95 / max (s) over all requests;
* server RSS (MiB) before the load (after a warm-up round: each input once), peak during it (sampled, and the
  kernel's VmHWM after a reset where allowed) and after it (polled up to `--settle` s for it to return within
  10 % of the level before);
* whether the server is alive and answers one more good request afterwards, and its listening addresses.

Usage::

    python benchmarks/load_demo.py --model DIR --requests 50 --clients 5
    python benchmarks/load_demo.py --tiny-model --requests 50 --clients 5   # builds a tiny random model first

tests/test_demo_load.py runs the same load (importing this file) and asserts on each answer.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "demo" / "app.py"
EXAMPLES = ROOT / "demo" / "examples"
HOST = "127.0.0.1"  # the only address this script talks to
MIB = 1024**2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Input:
    name: str
    path: Path
    good: bool
    expect: tuple[str, ...] = ()  # for a bad file: one of these phrases is in its message


def make_inputs(folder: Path) -> list[Input]:
    """The good and bad files of the load (written into `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    inputs = [Input(path.name, path, True) for path in sorted(EXAMPLES.glob("*.png"))]
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)  # upscaled: a smooth 1200×900 RGB image
    Image.fromarray(smooth).resize((1200, 900), Image.Resampling.BICUBIC).save(folder / "generated_rgb.png")
    inputs.append(Input("generated_rgb.png", folder / "generated_rgb.png", True))
    ramp = np.linspace(0, 65535, 120 * 90).reshape(90, 120).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "sixteen_bit.tif")
    inputs.append(Input("sixteen_bit.tif", folder / "sixteen_bit.tif", True))

    good = (EXAMPLES / "fabric_hole.png").read_bytes()
    (folder / "corrupt.png").write_bytes(good[:60] + b"\x00garbage" * 50 + good[-400:])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is a text file renamed to .png\n")
    Image.new("1", (10_000, 10_000)).save(folder / "huge.png")  # 10⁸ pixels (limit 4·10⁷), ~15 kB
    inputs += [
        Input("corrupt.png", folder / "corrupt.png", False, ("corrupt or truncated", "not an image", "cannot be opened")),
        Input("empty.png", folder / "empty.png", False, ("empty (0 bytes)",)),
        Input("notes.png", folder / "notes.png", False, ("not an image file",)),
        Input("huge.png", folder / "huge.png", False, ("too many pixels", "over the limit")),
    ]
    return inputs


# ---------------------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (psutil, else /proc/PID/status VmRSS)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        return _proc_status_kib(pid, "VmRSS") * 1024


def _proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of `pid` (Linux ≥ 4.0, own processes)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class DemoServer:
    """`python demo/app.py --model MODEL --port PORT` (no --host: the app's default) in a subprocess."""

    def __init__(self, model: str | Path, tmp: Path, *, host: str | None = None):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}/"
        tmp.mkdir(parents=True, exist_ok=True)
        self.temp_dir = tmp / "gradio_tmp"  # uploads and outputs are cached here, not in /tmp/gradio
        self.log = tmp / f"server_{self.port}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT")}
        env.update(GRADIO_TEMP_DIR=str(self.temp_dir), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                   GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1")
        command = [sys.executable, str(APP), "--model", str(model), "--port", str(self.port)]
        if host is not None:
            command += ["--host", host]
        self._log_file = self.log.open("w")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = 90) -> "DemoServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"server exited ({self.process.returncode}):\n{self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not up after {timeout} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def listen_addresses(self) -> list[tuple[str, int]]:
        """(ip, port) of the server process's listening TCP sockets (psutil, else `ss -ltnp`)."""
        try:
            import psutil

            connections = psutil.Process(self.pid).net_connections(kind="inet")
            return sorted({(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN})
        except ImportError:
            out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
            found = set()
            for line in out.splitlines():
                if f"pid={self.pid}," in line:
                    address = line.split()[3]
                    ip, _, port = address.rpartition(":")
                    found.add((ip.strip("[]"), int(port)))
            return sorted(found)

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log_file.close()


# ---------------------------------------------------------------------------------------------- requests
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")


@dataclass
class Record:
    index: int
    client: int
    input: str
    batch: bool  # sent through the batch (gr.File) input rather than the single-image input
    outcome: str = "unanswered"  # ok | message | wrong | exception | unanswered
    latency_s: float = float("nan")
    score: float | None = None
    detail: str = ""


def make_client(url: str, download_dir: Path, timeout: float = 30):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(download_dir), analytics_enabled=False,
                  httpx_kwargs={"timeout": timeout})


def classify(record: Record, item: Input, summary: str) -> Record:
    """Judge one answer: a good file must get a score in [0, 1], a bad file a readable message naming it."""
    summary = summary or ""
    if TRACEBACK.search(summary):
        record.outcome, record.detail = "wrong", "traceback text in the answer: " + summary[-300:]
        return record
    if item.good:
        match = re.search(rf"^### {re.escape(item.name)}: anomaly score ([0-9.]+)", summary, re.M)
        if match and 0.0 <= float(match.group(1)) <= 1.0 and "Not scored" not in summary:
            record.outcome, record.score = "ok", float(match.group(1))
        else:
            record.outcome, record.detail = "wrong", "no score for a good file: " + summary[-300:]
        return record
    lines = [line for line in summary.splitlines() if line.startswith(f"- {item.name}: ")]
    if "Not scored" in summary and lines and any(p in lines[0] for p in item.expect) and "###" not in summary:
        record.outcome, record.detail = "message", lines[0][2:]
    else:
        record.outcome, record.detail = "wrong", "no readable message for a bad file: " + summary[-300:]
    return record


def send(client, item: Input, *, batch: bool, timeout: float, record: Record) -> Record:
    from gradio_client import handle_file

    start = time.perf_counter()
    args = (None, [handle_file(str(item.path))]) if batch else (handle_file(str(item.path)), None)
    job = None
    try:
        job = client.submit(*args, 0.5, 0.5, api_name="/detect")
        summary = job.result(timeout=timeout)[0]
    except TimeoutError:
        record.outcome, record.detail = "unanswered", f"no answer within {timeout} s"
        if job is not None:
            job.cancel()
        return record
    except Exception as error:  # noqa: BLE001 - any client-side failure is a finding, reported as such
        record.outcome, record.detail = "exception", f"{type(error).__name__}: {error}"[:500]
        record.latency_s = time.perf_counter() - start
        return record
    record.latency_s = time.perf_counter() - start
    return classify(record, item, summary)


def run_load(url: str, inputs: list[Input], *, requests: int, clients: int, timeout: float,
             download_dir: Path, deadline_s: float = 300) -> list[Record]:
    """`requests` requests over `clients` concurrent clients (one thread each), input i % len(inputs) for request
    i, every 4th through the batch input. Bounded: each request by `timeout`, the whole by `deadline_s`."""
    work: queue.Queue = queue.Queue()
    records = [Record(i, -1, inputs[i % len(inputs)].name, batch=(i % 4 == 3)) for i in range(requests)]
    for record in records:
        work.put(record)
    by_name = {item.name: item for item in inputs}
    stop_at = time.monotonic() + deadline_s

    def worker(number: int) -> None:
        try:
            client = make_client(url, download_dir / f"client{number}", timeout)
        except Exception as error:  # noqa: BLE001
            client, failure = None, f"client {number} could not connect: {type(error).__name__}: {error}"
        try:
            while time.monotonic() < stop_at:
                try:
                    record = work.get_nowait()
                except queue.Empty:
                    return
                record.client = number
                if client is None:
                    record.outcome, record.detail = "exception", failure
                    continue
                send(client, by_name[record.input], batch=record.batch, timeout=timeout, record=record)
        finally:
            if client is not None:
                try:
                    client.close()
                except Exception:  # noqa: BLE001
                    pass

    threads = [threading.Thread(target=worker, args=(n,), daemon=True, name=f"load-client-{n}") for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, stop_at - time.monotonic()) + timeout + 5)
    return records


class RssSampler(threading.Thread):
    """Samples the server's RSS every `interval` s until stopped; `peak` is the largest sample."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except Exception:  # noqa: BLE001 - the process may have died; the caller checks that
                return
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(timeout=5)
        return self.peak


def steady_rss(server: DemoServer, samples: int = 5, interval: float = 0.2) -> int:
    values = []
    for _ in range(samples):
        values.append(server.rss())
        time.sleep(interval)
    return int(statistics.median(values))


def settle_rss(server: DemoServer, target: int, timeout: float = 20, interval: float = 0.5) -> tuple[int, float]:
    """Poll the RSS until it is ≤ target or `timeout` s passed; returns (last RSS, seconds waited)."""
    start = time.monotonic()
    time.sleep(min(2.0, timeout))
    rss = server.rss()
    while rss > target and time.monotonic() - start < timeout:
        time.sleep(interval)
        rss = server.rss()
    return rss, time.monotonic() - start


def percentile(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v == v)
    if not values:
        return None
    return float(np.percentile(values, q))


@dataclass
class LoadReport:
    requests: int
    clients: int
    ok: int = 0
    error_messages: int = 0
    wrong: int = 0
    exceptions: int = 0
    unanswered: int = 0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    latency_max_s: float | None = None
    wall_s: float = 0.0
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_after_mib: float = 0.0
    rss_after_ratio: float = 0.0
    rss_settle_s: float = 0.0
    server_alive: bool = False
    answers_after_load: bool = False
    warmup_ok: bool = True  # the warm-up round (each input once, one client) was answered as expected
    listen: list = field(default_factory=list)
    traceback_in_server_log: bool = False
    problems: list = field(default_factory=list)  # the first few wrong / exception / unanswered records


def load_session(server: DemoServer, inputs: list[Input], work: Path, *, requests: int = 50, clients: int = 5,
                 timeout: float = 30, settle: float = 20) -> tuple[LoadReport, list[Record]]:
    """Warm up (each input once), measure RSS, run the load, check health and memory afterwards."""
    report = LoadReport(requests=requests, clients=clients, listen=server.listen_addresses())
    warm_client = make_client(server.url, work / "client_warmup", timeout)
    try:
        for item in inputs:  # every code path (and its lazy imports) once before the baseline
            warm = send(warm_client, item, batch=False, timeout=timeout, record=Record(-1, -1, item.name, False))
            report.warmup_ok &= warm.outcome in ("ok", "message")
    finally:
        warm_client.close()
    time.sleep(3)  # the same idle wait as after the load (the app releases freed memory 2 s after a run)
    before = steady_rss(server)
    hwm_reset = reset_peak_rss(server.pid)
    sampler = RssSampler(server.pid)
    sampler.start()
    start = time.perf_counter()
    records = run_load(server.url, inputs, requests=requests, clients=clients, timeout=timeout, download_dir=work)
    report.wall_s = round(time.perf_counter() - start, 2)
    peak = sampler.stop()
    if hwm_reset and server.alive():
        peak = max(peak, _proc_status_kib(server.pid, "VmHWM") * 1024)
    after, waited = settle_rss(server, int(before * 1.10), timeout=settle) if server.alive() else (0, 0.0)

    for record in records:
        key = {"ok": "ok", "message": "error_messages"}.get(record.outcome, record.outcome)
        setattr(report, key, getattr(report, key) + 1)
    latencies = [r.latency_s for r in records if r.outcome != "unanswered"]
    report.latency_p50_s = _round(percentile(latencies, 50))
    report.latency_p95_s = _round(percentile(latencies, 95))
    report.latency_max_s = _round(max(latencies) if latencies else None)
    report.rss_before_mib = round(before / MIB, 1)
    report.rss_peak_mib = round(peak / MIB, 1)
    report.rss_after_mib = round(after / MIB, 1)
    report.rss_after_ratio = round(after / before, 3) if before else 0.0
    report.rss_settle_s = round(waited, 1)

    report.server_alive = server.alive()
    if report.server_alive:
        check = make_client(server.url, work / "client_after", timeout)
        try:
            good = next(item for item in inputs if item.good)
            last = send(check, good, batch=False, timeout=timeout, record=Record(-1, -1, good.name, False))
            report.answers_after_load = last.outcome == "ok"
        finally:
            check.close()
    report.server_alive = server.alive()
    report.traceback_in_server_log = "Traceback" in server.output()
    report.problems = [asdict(r) for r in records if r.outcome not in ("ok", "message")][:5]
    return report, records


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------------------------- main
def save_tiny_model(directory: Path) -> Path:
    """The tests' tiny random ViP²-CLIP with non-degenerate heads (`modeling_vip2clip.testing_utils`)."""
    from modeling_vip2clip.testing_utils import save_tiny_vip2clip

    return save_tiny_vip2clip(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model folder (or Hub id, cached) for demo/app.py --model")
    source.add_argument("--tiny-model", action="store_true", help="build the tests' tiny random model first")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=30, help="seconds per request")
    parser.add_argument("--settle", type=float, default=20, help="seconds to wait for the RSS to come back")
    parser.add_argument("--boot-timeout", type=float, default=120)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="vip2clip_load_"))
    server = None
    try:
        model = args.model or save_tiny_model(work / "tiny_model")
        inputs = make_inputs(work / "inputs")
        server = DemoServer(model, work / "server").wait(args.boot_timeout)
        report, _ = load_session(server, inputs, work / "clients", requests=args.requests, clients=args.clients,
                                 timeout=args.timeout, settle=args.settle)
        result = {"model": "tiny random (modeling_vip2clip.testing_utils)" if args.tiny_model else str(args.model), **asdict(report)}
        print(json.dumps(result), flush=True)
        healthy = (report.server_alive and report.answers_after_load and report.warmup_ok
                   and report.ok + report.error_messages == args.requests and report.rss_after_ratio <= 1.10)
        return 0 if healthy else 1
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
