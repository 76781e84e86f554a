"""Helpers for the data_prep tests: tiny images, a local HTTP server, reading shards back."""
import contextlib
import io
import json
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image


def jpeg(width=40, height=30, colour=(200, 30, 30), noise=False) -> bytes:
    """A small JPEG; ``noise=True`` makes it large enough to truncate meaningfully."""
    im = Image.effect_noise((width, height), 80).convert("RGB") if noise else Image.new("RGB", (width, height), colour)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    data = jpeg(160, 120, noise=True)
    return data[: len(data) // 2]


HTML = b"<!doctype html><html><body>Sorry, this photo is no longer available</body></html>"


def read_shards(out_dir, prefix=None) -> dict:
    """``{key: {"txt": str, "json": dict, "jpg": bytes, "shard": name}}`` of all shards in ``out_dir``."""
    samples = {}
    pattern = f"{prefix}-*.tar" if prefix else "*.tar"
    for shard in sorted(Path(out_dir).glob(pattern)):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                data = tar.extractfile(m).read()
                value = json.loads(data) if ext == "json" else data.decode() if ext == "txt" else data
                samples.setdefault(key, {"shard": shard.name})[ext] = value
    return samples


class _Handler(BaseHTTPRequestHandler):
    server_version = "TestServer"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server naming
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if srv.delay:
            time.sleep(srv.delay)
        path = self.path.split("?", 1)[0]
        body = srv.files.get(path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.ranges and rng.startswith("bytes="):
            start = int(rng[6:].split("-", 1)[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        ctype = "text/html" if body.startswith(b"<!doctype") else "application/octet-stream"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        cut = srv.cut_once.pop(path, None)
        if cut is not None:  # send part of the body, then drop the connection
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # a client killed mid-download (the resume tests do that) is expected, not an error
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def http_server(files: dict, delay: float = 0.0, ranges: bool = True):
    """Serve ``{"/path": bytes}`` on 127.0.0.1 (random port) from a thread; yields the server,
    with ``.url`` (base URL), ``.requests``, and settable ``.delay`` (seconds per request),
    ``.cut_once`` (``{path: n_bytes}``: drop the first response for ``path`` after n bytes)."""
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.delay, srv.ranges, srv.requests, srv.cut_once = dict(files), delay, ranges, [], {}
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
