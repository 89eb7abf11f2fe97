"""Gradio's file cache made safe for identical concurrent results (the demo, issue 19).

Why the demo broke when five clients sent the *same* image: Gradio writes every image output to
`<cache>/<sha256 of its bytes>/image.png` with `Path.write_bytes` (`processing_utils.save_pil_to_cache`, 6.x).
Identical inputs give identical outputs, so a second request rewrites — truncates, then fills — the very file
that the first request's client is downloading; the server had already sent a `Content-Length` from the file's
size, and h11 aborts with `LocalProtocolError: Too little data for declared Content-Length` ("peer closed
connection" on the client). Distinct images never share a path, which is why only identical uploads failed.

The fix keeps Gradio's content addressing and removes the rewrite: a file already at its content-hash path holds
those very bytes, so it is left alone (touched, so `delete_cache` ages it from this use); a new one is written
under a temporary name and renamed into place, so no reader ever sees half of it (Gradio's own
`save_file_to_cache` already works this way). tests/test_demo_load.py sends identical images from 5 clients.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .files import user_mode

__all__ = ["make_gradio_cache_writes_atomic"]


def make_gradio_cache_writes_atomic() -> None:
    """Replace `gradio.processing_utils.save_pil_to_cache` (used by Image, AnnotatedImage and Gallery outputs,
    and by `save_img_array_to_cache`) with the write-once, renamed-into-place version. Idempotent."""
    from gradio import processing_utils

    if getattr(processing_utils.save_pil_to_cache, "_vip2clip_atomic", False):
        return

    def save_pil_to_cache(img, cache_dir: str, name: str = "image", format: str = "webp") -> str:
        data = processing_utils.encode_pil_to_bytes(img, format)
        folder = Path(cache_dir) / processing_utils.hash_bytes(data)
        folder.mkdir(exist_ok=True, parents=True)
        target = (folder / f"{name}.{format}").resolve()
        if target.is_file() and target.stat().st_size == len(data):
            try:
                os.utime(target)
            except OSError:
                pass
            return str(target)
        handle, staging = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            os.chmod(staging, user_mode())  # mkstemp creates 0600
            os.replace(staging, target)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
        return str(target)

    save_pil_to_cache._vip2clip_atomic = True
    processing_utils.save_pil_to_cache = save_pil_to_cache
