"""Test helpers for the authors' release: a real HTTP file server on 127.0.0.1 (Range support, and ways to
misbehave: cut connections, HTTP errors, ignoring Range, slow bodies), and a checkpoint in the authors' layout.

Used by tests/test_authors_checkpoint.py and tests/test_demo.py; no network beyond loopback.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from reference_vip2clip import RefCLIP, RefFGP, RefICA
from modeling_vip2clip.testing_utils import tiny_tokenizer
from transformers import CLIPModel

__all__ = ["FILE_PATH", "ServerState", "FileServer", "write_authors_checkpoint", "blob_id"]

FILE_PATH = "/kim0806/ViP2-CLIP/raw/pinned/models/mvtec_train_epoch_10.pth"


@dataclass
class ServerState:
    files: dict[str, bytes]
    honour_range: bool = True
    drop_after: int | None = None  # the next GET sends this many body bytes, then the connection is cut
    fail_status: int | None = None  # GETs answer this status (set after a drop: "server error mid-way")
    fail_after_drop: int | None = None
    body_delay: float = 0.0  # seconds before a GET's body (the concurrency test)
    stall_after: int | None = None  # GETs send this many body bytes, then nothing (connection held open)
    stall_seconds: float = 30.0
    cut_after_drop: bool = False  # after the drop, every GET sends its headers and no body: the link is gone
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    body_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self, path: str = FILE_PATH) -> list[str | None]:
        """The Range header of each GET of `path` (None: a plain GET)."""
        return [rng for method, got, rng in self.requests if method == "GET" and got == path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        state: ServerState = self.server.state
        range_header = self.headers.get("Range")
        with state.lock:
            state.requests.append((self.command, self.path, range_header))
        data = state.files.get(self.path)
        if data is None or (body and state.fail_status):
            self.send_response(404 if data is None else state.fail_status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        if range_header and state.honour_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):  # as GitHub and every RFC 7233 server: nothing left to send is an error
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes" if state.honour_range else "none")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if not body:
            return
        time.sleep(state.body_delay)
        payload = data[start:]
        if state.stall_after is not None:  # a network that stops delivering without closing the connection
            self.wfile.write(payload[: state.stall_after])
            self.wfile.flush()
            time.sleep(state.stall_seconds)
            self.close_connection = True
            return
        if state.drop_after is not None:  # cut the connection mid-way, once
            payload = payload[: state.drop_after]
            state.drop_after = 0 if state.cut_after_drop else None
            state.fail_status = state.fail_after_drop
            self.close_connection = True
        self.wfile.write(payload)
        self.wfile.flush()
        with state.lock:
            state.body_bytes += len(payload)


class FileServer:
    """A real ThreadingHTTPServer on 127.0.0.1 with Range support that can misbehave on request."""

    def __init__(self, files: dict[str, bytes]):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.state = self.httpd.state = ServerState(files=dict(files))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = FILE_PATH) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_authors_checkpoint(clip_dir: Path, path: Path, seed: int = 321) -> Path:
    """A `.pth` in the authors' layout ({"prompt_learner": ICA.state_dict(), "Zero_try": FGP.state_dict()}) from
    the independent re-implementation of their modules (tests/reference_vip2clip.py), heads drawn large."""
    torch.manual_seed(seed)
    ref_clip = RefCLIP(CLIPModel.from_pretrained(clip_dir).eval()).eval()
    ica = RefICA(ref_clip, tiny_tokenizer(), 3, 2, embed_dim=32, hidden=16).eval()
    fgp = RefFGP(32).eval()
    with torch.no_grad():
        for parameter in (ica.ctx_pos, ica.ctx_neg, ica.cls_ctx, ica.cls_prompter.bias):
            parameter.normal_(0, 0.5)
        for conv in (fgp.q_proj_pre, fgp.k_proj_pre_1, fgp.v_proj_pre_1, fgp.proj_post_t):
            conv.weight.normal_(0, 0.5)
    torch.save({"prompt_learner": ica.state_dict(), "Zero_try": fgp.state_dict()}, path)
    return path


def blob_id(data: bytes) -> str:
    """git's blob id, written out independently of the package."""
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()
