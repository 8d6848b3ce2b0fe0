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
  POST /api/gallery      {"rules": ..., "step": S, "column": C, "n": 12} -> the clips just kept
                         and just dropped at that rule's thresholds, each with its source,
                         time span, scores, caption and every rejection reason
  POST /api/sources      {"rules": ..., "n": 20} -> the sources' outcomes under the rules (with
                         kept clips, every clip rejected, no clip: unreadable, ...) and the n
                         sources that lose the most clips
  POST /api/source       {"rules": ..., "source_id": S (or "clip_id": C)} -> every row of one
                         source in order: its clips (trimmed frames, duplicate links), errors
  POST /api/label        {"clip_id": ID, "label": "keep" | "drop" | null}: saved in
                         OUT_DIR/review/labels.json (curation/review/labels.py)
  POST /api/agreement    {"rules": ..., "propose": bool} -> the labels against the rules, each
                         rule's share of the disagreement; with propose, per ruled score the
                         threshold that agrees best with the labels and the clips it keeps
  POST /api/save         {"rules": ..., "write": bool} -> the config with only its rules changed
                         (curation/review/save.py), as a diff; written when "write"
  POST /api/apply        {"rules": ...}: `curate refilter` with them, then the output reloaded
  GET  /clip/ID.mp4      a clip's own mp4 from the output, with HTTP range requests
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from curation import templates
from curation.config import load_config
import numpy as np

from curation.review.data import ReviewData, rules_of
from curation.review.labels import Labels
from curation.review.save import config_text, overrides, save
from curation.refilter import refilter
from curation.review.payload import Payloads
from curation.schema import NUMERIC_COLUMNS
from curation.writer import OutputStore
from stages.rules import Rules, validate_rules

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20


@lru_cache(maxsize=1)
def page() -> bytes:
    """The page (curation/templates/review.html, in the report's frame and style)."""
    return templates.render("review.html").encode()


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
        # Save writes the rules into the config the review started from, else beside the output.
        self.save_path = Path(config_path) if config_path else self.store.root / "review" / "pipeline.yaml"
        self.base_text = Path(config_path).read_text() if config_path else config_text(run["config"])
        if not self.steps:
            raise ReviewError("the config has no filter step: there are no rules to review")
        self.data = ReviewData.load(self.store)
        if not self.data.rows:
            raise ReviewError(f"{self.store.root} has no committed clips yet")
        self.payloads = Payloads(self.store)
        self.labels = Labels(self.store, self.data)
        self._applying = threading.Lock()

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

    def clip(self, row: int, evaluation: Any) -> dict[str, Any]:
        """What a gallery card shows of one clip."""
        d = self.data
        clip_id = d.clip_ids[row].as_py()
        payload = self.payloads.row(int(d.clip_rank[row]), clip_id) or {}
        scores = {c: float(v[row]) for c, v in d.values.items() if not np.isnan(v[row])}
        return {"clip_id": clip_id, "source": d.source_paths[d.source[row]] if d.source_paths else None,
                "source_id": d.source_ids[d.source[row]], "start_s": scores.get("start_s"),
                "duration_s": scores.get("duration_s"), "scores": scores, "caption": payload.get("caption"),
                "reasons": evaluation.reasons(row, bool(d.duplicate[row])), "video": self.payloads.available,
                "label": self.labels.label_of(clip_id)}

    def gallery(self, payload: Any) -> dict[str, Any]:
        """The clips just kept and just dropped at one rule's thresholds under these rules."""
        steps = self.parse_rules(payload)
        evaluation = self.data.evaluate(steps)
        target = [r for r in evaluation.rules if r.step == payload.get("step") and r.column == payload.get("column")]
        if not target:
            raise ValueError(f"no rule {payload.get('step')}.{payload.get('column')} among the rules sent")
        n = max(1, min(48, int(payload.get("n") or 12)))
        rows = self.data.near_threshold(evaluation, target[0], n)
        return {"step": target[0].step, "column": target[0].column, "effective": target[0].effective,
                **{side: [self.clip(r, evaluation) for r in rows[side]] for side in ("kept", "dropped")}}

    def source(self, payload: Any) -> dict[str, Any]:
        """Every row of one source in order (its clips and why it has no more), under these rules:
        each clip as a gallery card shows it, with the frames trimmed at its ends (fades,
        dissolves) and the clip it duplicates; the gaps between clips are the cuts."""
        steps = self.parse_rules(payload)
        source_id = payload.get("source_id")
        if not source_id and payload.get("clip_id"):
            row = self.data.row_of(str(payload["clip_id"]))
            source_id = self.data.source_ids[self.data.source[row]] if row is not None else None
        rows = self.data.source_rows(str(source_id or ""))
        if not rows.size:
            raise ValueError(f"no source {source_id!r} in this output")
        evaluation = self.data.evaluate(steps)
        out = []
        for row in rows.tolist():
            if not self.data.is_clip[row]:
                out.append({"error": self.data.split_errors.get(row, ("", ""))[1]})
                continue
            card = self.clip(row, evaluation)
            card["kept"] = bool(evaluation.keep[row])
            target = self.data.duplicate_of(row)
            if target:
                at = self.data.row_of(target)
                card["duplicate_of"] = {"clip_id": target,
                                        "source_id": self.data.source_ids[self.data.source[at]] if at is not None else None}
            out.append(card)
        d = self.data
        code = d.source[rows[0]]
        return {"source_id": d.source_ids[code], "source": d.source_paths[code] if d.source_paths else None,
                "rows": out}

    def agreement(self, payload: Any) -> dict[str, Any]:
        """The labels against these rules; with "propose": true, the thresholds that agree best."""
        steps = self.parse_rules(payload)
        evaluation = self.data.evaluate(steps)
        out = self.labels.agreement(evaluation)
        if payload.get("propose"):
            out["proposals"] = self.labels.propose(steps, evaluation)
        return out

    def save(self, payload: Any) -> dict[str, Any]:
        """The config with the page's rules: the diff, and with "write": true, written."""
        return save(self.save_path, self.base_text, self.parse_rules(payload), bool(payload.get("write")))

    def apply(self, payload: Any) -> dict[str, Any]:
        """The page's rules applied to the output as `curate refilter` does, then reloaded."""
        steps = self.parse_rules(payload)
        with self._applying:
            changes = overrides(rules_of(self.store.read_run()["config"]), steps)
            result = refilter(self.store.root, changes)
            self.run = self.store.read_run()
            self.steps = steps  # the rules as they now stand
            self.data = ReviewData.load(self.store)
            self.payloads = Payloads(self.store)
            self.labels.data = self.data
        return {"kept": result["kept"], "kept_before": result["kept_before"], "clips": result["clips"],
                "overrides": changes}

    def video(self, clip_id: str) -> bytes | None:
        row = self.data.row_of(clip_id)
        if row is None or not self.data.is_clip[row]:
            return None
        found = self.payloads.row(int(self.data.clip_rank[row]), clip_id, ("video",))
        return found.get("video") if found else None

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

    def sources(self, payload: Any) -> dict[str, Any]:
        """The sources with their outcomes under these rules (ReviewData.sources)."""
        return self.data.sources(self.data.evaluate(self.parse_rules(payload)), int(payload.get("n") or 20))


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

        def _ranged(self, body: bytes, kind: str) -> None:
            """`body`, or the byte range a `Range: bytes=a-b` header asks for (206), as a
            video element seeks."""
            wanted = self.headers.get("Range", "")
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
            if not match or not (match.group(1) or match.group(2)):
                self.send_response(HTTPStatus.OK)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            size = len(body)
            if match.group(1):
                start, end = int(match.group(1)), min(size - 1, int(match.group(2) or size - 1))
            else:  # the last N bytes
                start, end = max(0, size - int(match.group(2))), size - 1
            if start >= size or start > end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", kind)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            self.wfile.write(body[start:end + 1])

        def _json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if not self._authorized():
                return self._json(HTTPStatus.FORBIDDEN, {"error": "a valid token is required"})
            path = urlsplit(self.path).path
            if path == "/":
                return self._send(HTTPStatus.OK, page(), "text/html; charset=utf-8")
            if path == "/api/state":
                return self._json(HTTPStatus.OK, review.state())
            if path.startswith("/clip/") and path.endswith(".mp4"):
                video = review.video(unquote(path[len("/clip/"):-len(".mp4")]))
                if not video:
                    return self._json(HTTPStatus.NOT_FOUND, {"error": "no stored video for this clip"})
                return self._ranged(video, "video/mp4")
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
            actions = {"/api/gallery": review.gallery, "/api/agreement": review.agreement,
                       "/api/save": review.save, "/api/apply": review.apply, "/api/source": review.source,
                       "/api/sources": review.sources,
                       "/api/label": lambda p: {"labelled": review.labels.set(p.get("clip_id"), p.get("label"))}}
            if path in actions:
                try:
                    if not isinstance(payload, dict):
                        raise ValueError("expected a JSON object")
                    return self._json(HTTPStatus.OK, actions[path](payload))
                except ValueError as exc:  # the request (a rule, a label): the page says why
                    return self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                except Exception as exc:  # noqa: BLE001 - the output or the disk: logged, said
                    log.exception("review: %s failed", path)
                    return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
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
