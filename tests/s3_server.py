"""A real S3 API server on localhost for tests and benchmarks: moto in server mode, on a free
port, stopped (and waited for) on exit."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_endpoint(log: Path, timeout_s: float = 30.0) -> Iterator[str]:
    """Start `python -m moto.server` on a free port; yield its URL (for AWS_ENDPOINT_URL)."""
    port = free_port()
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto server did not start: {Path(log).read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def s3_environment(work: Path, secret: str, buckets: tuple[str, ...] = (), tempdir: Path | None = None):
    """A moto server (its log in `work`), the standard AWS variables pointing at it with
    `secret` as the secret key, `tempdir` as this process's temporary folder (when given) and
    the `buckets` made; yields an fsspec S3 filesystem of its own. All undone on exit."""
    import os
    import tempfile

    import fsspec

    with moto_endpoint(Path(work) / "moto.log") as url:
        saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
        saved_tmp = tempfile.tempdir
        os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"})
        if tempdir is not None:
            tempfile.tempdir = str(tempdir)
        fsspec.filesystem("s3").clear_instance_cache()
        try:
            fs = fsspec.filesystem("s3", skip_instance_cache=True)
            for bucket in buckets:
                fs.mkdir(bucket)
            yield fs
        finally:
            fsspec.filesystem("s3").clear_instance_cache()
            tempfile.tempdir = saved_tmp
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class FaultProxy:
    """An HTTP proxy in front of an S3 endpoint that fails a share of requests, chosen by a
    seeded generator: answered 503 SlowDown (`error_share`), dropped before they reach the
    store (`drop_share`), or carried out by the store with the answer lost (`lost_reply_share`:
    a write happened and its client does not know). `error_share = 1` makes the store look
    down. `faulty(method, path)` picks the requests these apply to (default: all); requests
    for which `always_fail(method, path)` is true get 503 while `always_fail_budget` lasts
    (None: forever). A request for which `hold(method, path)` is true waits in the proxy until
    `release` is set and is then dropped unseen by the store (a client stuck on it can be
    killed there). Counts what it did, and keeps (method, path, fate) of every request."""

    SLOWDOWN = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                b"<Message>Please reduce your request rate.</Message></Error>")

    def __init__(self, target: str, error_share: float = 0.0, drop_share: float = 0.0, seed: int = 0,
                 lost_reply_share: float = 0.0, faulty=None, always_fail=None, always_fail_budget=None,
                 hold=None):
        import random
        import threading

        self.target = target.split("://", 1)[1]
        self.error_share, self.drop_share, self.lost_reply_share = error_share, drop_share, lost_reply_share
        self.faulty = faulty or (lambda method, path: True)
        self.always_fail = always_fail or (lambda method, path: False)
        self.always_fail_budget = always_fail_budget
        self.hold = hold or (lambda method, path: False)
        self.release = threading.Event()
        self.held: list[str] = []
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"forwarded": 0, "errors": 0, "dropped": 0, "lost_replies": 0}
        self.requests: list[tuple[str, str, str]] = []
        self.server = None

    def _fate(self, method: str, path: str) -> str:
        with self.lock:
            held = self.hold(method, path)
            if held:
                self.held.append(path)
        if held:
            self.release.wait()
            with self.lock:
                self.counts["dropped"] += 1
                self.requests.append((method, path, "held"))
            return "dropped"
        with self.lock:
            if self.always_fail(method, path) and (self.always_fail_budget is None or self.always_fail_budget > 0):
                if self.always_fail_budget is not None:
                    self.always_fail_budget -= 1
                fate = "errors"
            elif self.faulty(method, path):
                x = self.rng.random()
                fate = ("errors" if x < self.error_share else
                        "dropped" if x < self.error_share + self.drop_share else
                        "lost_replies" if x < self.error_share + self.drop_share + self.lost_reply_share
                        else "forwarded")
            else:
                fate = "forwarded"
            self.counts[fate] += 1
            self.requests.append((method, path, fate))
            return fate

    def failed(self, keep=None) -> int:
        """Requests this proxy failed (503, dropped, reply lost), of those `keep(method, path)` keeps."""
        with self.lock:
            return sum(1 for m, p, fate in self.requests if fate != "forwarded" and (keep is None or keep(m, p)))

    def __enter__(self) -> str:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fate = proxy._fate(self.command, self.path)
                if fate == "dropped":
                    self.close_connection = True
                    return
                if fate == "errors":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(proxy.SLOWDOWN)
                    return
                conn = http.client.HTTPConnection(proxy.target, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if fate == "lost_replies":  # done by the store; the client never hears of it
                    self.close_connection = True
                    return
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD's answer has no body but the object's length (its size, to the client).
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
