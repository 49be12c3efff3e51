"""A store for tests and benchmarks: moto's S3 server on 127.0.0.1, behind a proxy that adds
latency, injects faults and counts what passes; or a plain HTTP server of a directory with range
requests (an ``https://``-style location).

Run as a process (``python -m fastload.testing.store_proxy --upstream http://127.0.0.1:PORT``) so that the
client under test shares no interpreter with it. Control, over HTTP on the proxy itself:
- ``POST /__control__/faults`` with ``[{"match": "<substring of the path>", "method": "GET",
  "kind": "500" | "reset" | "truncate" | "stall" | "flip", "count": n}]``: the next n matching
  requests fail that way (a reset or truncation mid-body, a stall of 60 s before the body, one
  byte inverted in the middle of every 256 KiB of the body, its length and status unchanged);
- ``POST /__control__/latency`` with ``{"ms": 20}``;
- ``GET /__control__/log``: every request so far, ``[method, path, range, status, body bytes]``;
  ``DELETE /__control__/log`` clears it.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

PIECE = 256 * 1024  # bytes relayed per write: a fault lands mid-body of anything larger
# without a fault, larger writes: the relay's per-piece cost had made the proxy, not the server
# behind it, what a benchmark's loader waited for (s3rver: 550-640 MB/s direct, 330-390 relayed)
CLEAN_PIECE = 1 << 20


class _State:
    def __init__(self, latency_ms: float):
        self.lock = threading.Lock()
        self.latency = latency_ms / 1000
        self.faults: list[dict] = []
        self.log: list[list] = []

    def take_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            for f in self.faults:
                if f["count"] > 0 and f.get("method", method) == method and f.get("match", "") in path:
                    f["count"] -= 1
                    return f["kind"]
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _State
    upstream: tuple[str, int] | None = None
    root: Path | None = None

    def log_message(self, *args):  # quiet
        pass

    def _control(self) -> bool:
        if not self.path.startswith("/__control__/"):
            return False
        what = self.path[len("/__control__/"):]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.state.lock:
            if what == "faults" and self.command == "POST":
                self.state.faults = json.loads(body)
            elif what == "latency" and self.command == "POST":
                self.state.latency = json.loads(body)["ms"] / 1000
            elif what == "log" and self.command == "DELETE":
                self.state.log.clear()
            out = json.dumps(self.state.log if what == "log" else {"ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
        return True

    def _handle(self):
        if self._control():
            return
        if self.state.latency:
            time.sleep(self.state.latency)
        fault = self.state.take_fault(self.command, self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command in ("PUT", "POST") else b""
        if fault == "500":
            self._record(500, 0)
            msg = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
            self.send_response(500)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        piece_size = PIECE if fault else CLEAN_PIECE
        status, headers, stream, length = (self._from_upstream(body, piece_size) if self.upstream
                                           else self._from_directory(piece_size))
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        sent = 0
        try:
            for piece in stream:
                if fault in ("reset", "truncate") and sent + len(piece) > length // 2 and length > 1:
                    piece = piece[:max(0, length // 2 - sent)]
                    self.wfile.write(piece)
                    sent += len(piece)
                    if fault == "reset":  # an RST, not a FIN: the client sees a connection reset
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    self.close_connection = True
                    break
                if fault == "stall" and sent == 0:
                    time.sleep(60)
                if fault == "flip" and piece:  # damage no length or status shows: only a checksum does
                    mid = len(piece) // 2
                    piece = piece[:mid] + bytes([piece[mid] ^ 0xFF]) + piece[mid + 1:]
                self.wfile.write(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        self._record(status, sent)

    def _record(self, status, sent):
        with self.state.lock:
            self.state.log.append([self.command, self.path, self.headers.get("Range"), status, sent])

    def _from_upstream(self, body: bytes, piece_size: int):
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        if resp.getheader("Content-Length") is None and self.command != "HEAD":  # chunked: relay it whole
            data = resp.read()
            conn.close()
            return resp.status, resp.getheaders(), iter([data]), len(data)
        length = int(resp.getheader("Content-Length") or 0)

        def stream():
            try:
                while piece := resp.read(piece_size):
                    yield piece
            finally:
                conn.close()
        if self.command == "HEAD":
            conn.close()
            return resp.status, resp.getheaders(), iter(()), length
        return resp.status, resp.getheaders(), stream(), length

    def _from_directory(self, piece_size: int):
        rel = urlsplit(self.path).path.lstrip("/")
        path = (self.root / rel).resolve()
        if not path.is_file() or self.root.resolve() not in path.parents:
            return 404, [], iter([b""]), 0
        size = path.stat().st_size
        start, end, status = 0, size, 200
        rng = self.headers.get("Range")
        headers = [("Accept-Ranges", "bytes"), ("Content-Type", "application/octet-stream")]
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a or 0), min(size, int(b) + 1 if b else size)
            status = 206
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))

        def stream():
            with open(path, "rb") as f:
                f.seek(start)
                left = end - start
                while left > 0:
                    piece = f.read(min(piece_size, left))
                    left -= len(piece)
                    yield piece
        return status, headers, (stream() if self.command != "HEAD" else iter(())), end - start

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


def serve(port: int, upstream: str | None, root: str | None, latency_ms: float) -> None:
    _Handler.state = _State(latency_ms)
    if upstream:
        u = urlsplit(upstream)
        _Handler.upstream = (u.hostname, u.port)
    _Handler.root = Path(root) if root else None
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    server.daemon_threads = True
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


# --------------------------------------------------------------------------- for tests and scripts
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, what: str) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


S3RVER = Path(__file__).resolve().parents[1] / ".cache" / "s3rver" / "node_modules" / ".bin" / "s3rver"


class StoreServers:
    """moto's S3 server and this proxy in front of it, as processes; ``endpoint`` is the proxy's."""

    def __init__(self, latency_ms: float = 0, directory: str | None = None, moto_port: int | None = None,
                 server: str = "moto"):
        """``moto_port``: another proxy in front of a running moto server (a second node's view,
        with its own log). ``server="s3rver"``: the npm s3rver server instead of moto, for
        benchmarks (it answers a range request from the file's range; moto copies the whole object
        per request); ``scripts/setup_streaming_peers.sh`` installs it."""
        self.procs = []
        self.credentials = ("testing", "testing")
        self._s3rver_dir = None
        if server == "s3rver":
            import tempfile
            if not S3RVER.exists():
                raise RuntimeError(f"{S3RVER} is missing: run scripts/setup_streaming_peers.sh")
            self.moto_port = free_port()
            self._s3rver_dir = tempfile.TemporaryDirectory(prefix="s3rver-")
            proc = subprocess.Popen([str(S3RVER), "-d", self._s3rver_dir.name, "-a", "127.0.0.1", "-p",
                                     str(self.moto_port), "--silent"], stdout=subprocess.DEVNULL)
            self.procs.append(proc)
            _wait_listening(self.moto_port, proc, "s3rver")
            self.credentials = ("S3RVER", "S3RVER")
        elif moto_port is not None:
            self.moto_port = moto_port
        elif directory is None:
            self.moto_port = free_port()
            moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append(moto)
            _wait_listening(self.moto_port, moto, "moto server")
        self.port = free_port()
        args = [sys.executable, "-m", "fastload.testing.store_proxy", "--port", str(self.port), "--latency-ms",
                str(latency_ms)]
        args += ["--root", directory] if directory else ["--upstream", f"http://127.0.0.1:{self.moto_port}"]
        proxy = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        self.procs.append(proxy)
        _wait_listening(self.port, proxy, "store proxy")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        """What a client needs to reach the S3 server (the standard variables)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.credentials[0],
                "AWS_SECRET_ACCESS_KEY": self.credentials[1], "AWS_DEFAULT_REGION": "us-east-1"}

    def _call(self, method: str, what: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.endpoint}/__control__/{what}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def faults(self, faults: list[dict]) -> None:
        self._call("POST", "faults", faults)

    def latency(self, ms: float) -> None:
        self._call("POST", "latency", {"ms": ms})

    only: str | None = None  # a path substring (a test's bucket): log() leaves out other requests

    def log(self) -> list[list]:
        entries = self._call("GET", "log")
        return [e for e in entries if self.only is None or self.only in e[1]]

    def clear_log(self) -> None:
        self._call("DELETE", "log")

    def bytes_read(self, match: str = "") -> int:
        return sum(entry[4] for entry in self.log() if entry[0] == "GET" and match in entry[1])

    def close(self) -> None:
        for p in reversed(self.procs):
            p.kill()
            p.wait()
        if self._s3rver_dir is not None:
            self._s3rver_dir.cleanup()


def store_bytes(endpoint: str, clear: bool = False) -> int:
    """Body bytes of the GETs the proxy at ``endpoint`` relayed since its log was last cleared
    (then cleared, with ``clear``): for a process that holds no StoreServers (a benchmark's child)."""
    with urllib.request.urlopen(f"{endpoint}/__control__/log", timeout=30) as r:
        n = sum(e[4] for e in json.loads(r.read()) if e[0] == "GET")
    if clear:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/__control__/log", method="DELETE"), timeout=30)
    return n


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream")
    ap.add_argument("--root")
    ap.add_argument("--latency-ms", type=float, default=0)
    a = ap.parse_args()
    os.environ.pop("AWS_ENDPOINT_URL", None)
    serve(a.port, a.upstream, a.root, a.latency_ms)
