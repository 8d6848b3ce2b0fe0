"""`curate review`'s web server: a small HTTP server in this package (the standard library's
ThreadingHTTPServer), bound to 127.0.0.1 by default, that serves the page and answers its
questions from the run's score columns held in memory (curation/review/data.py).

Every request must carry the server's token (a random string made at start, in the address
printed, as Jupyter does: the page can change files), as `?token=` or the `X-Review-Token`
header; anything else is refused with 403. Nothing is fetched from outside the machine: the
page has no external script, style or font.

Routes:
  GET  /                 the page
  GET  /api/state        the run, its rules, every ruled or scored column's histogram, and
                         the evaluation of the rules as they stand
  POST /api/evaluate     {"rules": {step: {column: bounds}}} -> the funnel, each rule's
                         rejects (all, alone), the overlaps, the kept total; a rule that is
                         not valid (a threshold typed as text) -> 400 with the reason
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from curation.config import load_config
from curation.review.data import ReviewData, rules_of
from curation.schema import NUMERIC_COLUMNS
from curation.writer import OutputStore
from stages.rules import Rules, validate_rules

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page.html")
MAX_BODY_BYTES = 1 << 20


class ReviewError(ValueError):
    """OUT_DIR cannot be reviewed (not a run, no committed scores)."""


class Review:
    """What the server knows: the run, the rules it started with, the held columns."""

    def __init__(self, out_dir: str | Path, config_path: str | Path | None = None):
        self.store = OutputStore(out_dir)
        run = self.store.read_run()
        if not run or "config" not in run:
            raise ReviewError(f"{self.store.root} is not a curation output (no run.json with a config): "
                              "run `curate run` first")
        self.run = run
        config = load_config(config_path).to_dict() if config_path else run["config"]
        self.steps = rules_of(config)
        if not self.steps:
            raise ReviewError("the config has no filter step: there are no rules to review")
        self.data = ReviewData.load(self.store)
        if not self.data.rows:
            raise ReviewError(f"{self.store.root} has no committed clips yet")

    def parse_rules(self, payload: Any) -> list[tuple[str, Rules]]:
        """The page's rules, checked as a config's are (ValueError says what is wrong)."""
        if not isinstance(payload, dict) or not isinstance(payload.get("rules"), dict):
            raise ValueError('expected {"rules": {step: {column: {min|max|drop_bottom|drop_top: number}}}}')
        names = [name for name, _ in self.steps]
        unknown = sorted(set(payload["rules"]) - set(names))
        if unknown:
            raise ValueError(f"unknown filter step(s) {unknown}; the config's: {names}")
        out = []
        for name in names:
            try:
                out.append((name, validate_rules(payload["rules"].get(name) or {}, NUMERIC_COLUMNS)))
            except ValueError as exc:
                raise ValueError(f"{name}.{exc}") from None
        return out

    def state(self) -> dict[str, Any]:
        ruled = [c for _, rules in self.steps for c in rules]
        shown = list(dict.fromkeys(ruled + sorted(self.data.values)))
        return {
            "out_dir": str(self.store.root), "status": self.run.get("status"),
            "rows": self.data.rows, "clips": self.data.clips, "sources": len(self.data.source_ids),
            "rules": {name: rules for name, rules in self.steps},
            "histograms": {c: self.data.histogram(c) for c in shown if c in self.data.values},
            "evaluation": self.data.evaluate(self.steps).as_json(),
        }


def make_handler(review: Review, token: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "curate-review"

        def _authorized(self) -> bool:
            given = parse_qs(urlsplit(self.path).query).get("token", [""])[0] or \
                self.headers.get("X-Review-Token", "")
            return secrets.compare_digest(given.encode(), token.encode())

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if not self._authorized():
                return self._json(HTTPStatus.FORBIDDEN, {"error": "a valid token is required"})
            path = urlsplit(self.path).path
            if path == "/":
                return self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            if path == "/api/state":
                return self._json(HTTPStatus.OK, review.state())
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorized():
                return self._json(HTTPStatus.FORBIDDEN, {"error": "a valid token is required"})
            path = urlsplit(self.path).path
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "request too large"})
            try:
                payload = json.loads(self.rfile.read(length) or b"null")
            except json.JSONDecodeError as exc:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": f"not JSON: {exc}"})
            if path == "/api/evaluate":
                try:
                    steps = review.parse_rules(payload)
                except ValueError as exc:
                    return self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                return self._json(HTTPStatus.OK, review.data.evaluate(steps).as_json())
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such action: {path}"})

        def do_PUT(self) -> None:  # noqa: N802
            self._json(HTTPStatus.FORBIDDEN if not self._authorized() else HTTPStatus.METHOD_NOT_ALLOWED,
                       {"error": "not allowed"})

        do_DELETE = do_PATCH = do_PUT

        def log_message(self, fmt: str, *args: Any) -> None:  # the token is in every path: never log it
            log.debug("review: %s", (fmt % args).replace(token, "<token>"))

    return Handler


class ReviewServer:
    """The server on a thread: `url` holds the token; `close` stops it."""

    def __init__(self, review: Review, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        self.token = token or secrets.token_urlsafe(24)
        self.httpd = ThreadingHTTPServer((host, port), make_handler(review, self.token))
        self.httpd.daemon_threads = True
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
        self.base = f"http://{shown}:{self.httpd.server_address[1]}"
        self.url = f"{self.base}/?token={self.token}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="review-server", daemon=True)

    def start(self) -> ReviewServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
