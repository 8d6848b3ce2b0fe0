"""caption stage: CoCa on a tiny saved checkpoint, and the endpoint backend against a real
local HTTP server (ThreadingHTTPServer on 127.0.0.1) that answers as a script says."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import model_fixtures as mf
from stages.caption import CaptionStage, decode_tokens

torch.set_num_threads(1)


# ---- a scripted chat-completions server ----------------------------------------------------

class ChatServer:
    """Serves /v1/chat/completions; `answer(request, n_seen)` -> (status, body bytes, delay_s)."""

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.connections: set[tuple[str, int]] = set()  # the client's (host, port) of each connection
        self.times: list[float] = []  # when each request arrived
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers: a client may reuse its connections

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    server.connections.add(self.client_address)
                    server.times.append(time.monotonic())
                    seen = sum(1 for r in server.requests if key_of(r) == key_of(body))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, payload, delay, *extra = server.answer(body, seen)
                    time.sleep(delay)
                finally:
                    # Out of flight before answering: once the client has the answer it may
                    # start its next request while this thread is still finishing up.
                    with server.lock:
                        server.in_flight -= 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in (extra[0] if extra else {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away: expected in the timeout test

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def key_of(request: dict) -> str:
    """What a request is about: its images (data URLs) or, for text-only calls, its text."""
    parts = request["messages"][0]["content"]
    images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    return "|".join(images) if images else parts[-1]["text"]


def images_of(request: dict) -> list[bytes]:
    parts = request["messages"][0]["content"]
    return [base64.b64decode(p["image_url"]["url"].split(",", 1)[1]) for p in parts if p["type"] == "image_url"]


def ok(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


def endpoint_stage(url: str, **kw) -> CaptionStage:
    args = dict(backend="endpoint", endpoint_url=url, endpoint_model="test-vlm", timeout_s=2.0,
                retries=2, backoff_s=0.01, max_concurrency=4)
    args.update(kw)
    stage = CaptionStage(**args)
    stage.setup()
    return stage


# ---- endpoint backend ---------------------------------------------------------------------

def test_endpoint_sends_the_middle_keyframe_and_reads_the_answer(monkeypatch):
    looks = [mf.keyframes(seed) for seed in (1, 2, 3)]
    middles = {looks[i][1]: f"caption {i}" for i in range(3)}
    # Distinct first/middle/last frames so the test sees which one was sent.
    clips = [[mf.keyframes(9)[0], looks[i][1], mf.keyframes(8)[0]] for i in range(3)]

    def answer(request, seen):
        (image,) = images_of(request)
        return 200, ok(middles[image]), 0.0

    monkeypatch.setenv("TEST_CAPTION_KEY", "sekret")
    with ChatServer(answer) as server:
        out = endpoint_stage(server.url, api_key_env="TEST_CAPTION_KEY")(mf.clip_batch(clips))
    assert out["caption"] == ["caption 0", "caption 1", "caption 2"]
    assert out["caption_source"] == ["endpoint:test-vlm"] * 3
    assert out["caption_error"] == [None] * 3
    assert {r["model"] for r in server.requests} == {"test-vlm"}
    assert {h["Authorization"] for h in server.headers} == {"Bearer sekret"}
    assert server.requests[0]["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_500_is_retried_and_timeouts_and_malformed_answers_are_recorded_per_clip():
    looks = {name: mf.keyframes(seed) for name, seed in
             [("fine", 1), ("flaky", 2), ("slow", 3), ("garbled", 4), ("empty", 5)]}
    by_image = {frames[1]: name for name, frames in looks.items()}

    def answer(request, seen):
        name = by_image[images_of(request)[0]]
        if name == "flaky" and seen == 1:
            return 500, b'{"error": "overloaded"}', 0.0
        if name == "slow":
            return 200, ok("too late"), 1.0  # beyond the 0.3 s timeout, every time
        if name == "garbled":
            return 200, b"<html>not json</html>", 0.0
        if name == "empty":
            return 200, json.dumps({"choices": []}).encode(), 0.0
        return 200, ok(f"a {name} clip"), 0.0

    with ChatServer(answer) as server:
        stage = endpoint_stage(server.url, timeout_s=0.3, retries=1)
        out = stage(mf.clip_batch(list(looks.values())))
    fine, flaky, slow, garbled, empty = range(5)
    assert out["caption"][fine] == "a fine clip" and out["caption_error"][fine] is None
    assert out["caption"][flaky] == "a flaky clip" and out["caption_error"][flaky] is None  # retried after 500
    for i, expected in [(slow, "timed out"), (garbled, "malformed"), (empty, "malformed")]:
        assert out["caption"][i] is None and out["caption_source"][i] is None
        assert expected in out["caption_error"][i] and "2 attempts" in out["caption_error"][i]
    attempts = {name: sum(1 for r in server.requests if images_of(r)[0] == looks[name][1]) for name in looks}
    assert attempts == {"fine": 1, "flaky": 2, "slow": 2, "garbled": 2, "empty": 2}


def test_client_errors_are_not_retried():
    with ChatServer(lambda request, seen: (400, b'{"error": "bad model"}', 0.0)) as server:
        out = endpoint_stage(server.url, retries=3)(mf.clip_batch([mf.keyframes(1)]))
    assert "HTTP 400" in out["caption_error"][0]
    assert len(server.requests) == 1


def test_concurrency_is_bounded_and_connections_are_reused():
    with ChatServer(lambda request, seen: (200, ok("x"), 0.1)) as server:
        stage = endpoint_stage(server.url, max_concurrency=3)
        out = stage(mf.clip_batch([mf.keyframes(s) for s in range(9)]))
        again = stage(mf.clip_batch([mf.keyframes(s) for s in range(9, 15)]))
    assert out["caption"] == ["x"] * 9 and again["caption"] == ["x"] * 6
    assert 1 < server.max_in_flight <= 3
    # 15 requests over at most 3 kept-alive connections (a connection per request: 15).
    assert len(server.requests) == 15 and len(server.connections) <= 3


def test_429_is_retried_after_the_servers_retry_after():
    """A 429 with Retry-After: 0.5 is retried once half a second has passed, though the
    backoff alone (0.01 s) would have retried at once; the answer then comes through."""
    def answer(request, seen):
        if seen == 1:
            return 429, b'{"error": "rate limited"}', 0.0, {"Retry-After": "0.5"}
        return 200, ok("a calm sea"), 0.0

    with ChatServer(answer) as server:
        out = endpoint_stage(server.url, retries=2, backoff_s=0.01)(mf.clip_batch([mf.keyframes(1)]))
    assert out["caption"] == ["a calm sea"] and out["caption_error"] == [None]
    assert len(server.times) == 2 and server.times[1] - server.times[0] >= 0.5


def test_merge_combines_a_frame_caption_and_a_multi_frame_caption():
    clip = [mf.keyframes(1)[0], mf.keyframes(2)[0], mf.keyframes(3)[0]]

    def answer(request, seen):
        images = images_of(request)
        if len(images) == 1:
            return 200, ok("a red car"), 0.0
        if len(images) == 3:
            assert images == clip  # first, middle, last in order
            return 200, ok("a car drives left"), 0.0
        text = request["messages"][0]["content"][-1]["text"]
        assert "a red car" in text and "a car drives left" in text
        return 200, ok("a red car drives left"), 0.0

    with ChatServer(answer) as server:
        out = endpoint_stage(server.url, merge=True)(mf.clip_batch([clip]))
    assert out["caption"] == ["a red car drives left"]
    assert out["caption_source"] == ["merged:endpoint:test-vlm+test-vlm"]
    assert [len(images_of(r)) for r in server.requests] == [1, 3, 0]


def test_failed_merge_keeps_the_frame_caption_and_says_so():
    def answer(request, seen):
        return (200, ok("a red car"), 0.0) if len(images_of(request)) == 1 else (503, b"{}", 0.0)

    with ChatServer(answer) as server:
        out = endpoint_stage(server.url, merge=True, retries=0)(mf.clip_batch([mf.keyframes(1)]))
    assert out["caption"] == ["a red car"] and out["caption_source"] == ["endpoint:test-vlm"]
    assert out["caption_error"][0].startswith("merge failed: HTTP 503")


def test_rejected_clips_are_never_sent():
    kept, rejected = mf.keyframes(1), mf.keyframes(2)
    with ChatServer(lambda request, seen: (200, ok("kept clip"), 0.0)) as server:
        out = endpoint_stage(server.url)(mf.clip_batch([rejected, kept, None], keep=[False, True, False]))
    assert out["caption"] == [None, "kept clip", None]
    assert out["caption_error"] == [None, None, None]
    assert [images_of(r)[0] for r in server.requests] == [kept[1]]


def test_unreachable_server_fails_per_clip_not_the_batch():
    out = endpoint_stage("http://127.0.0.1:9/v1", retries=1, timeout_s=0.5)(mf.clip_batch([mf.keyframes(1)]))
    assert out["caption"] == [None] and "2 attempts" in out["caption_error"][0]


def test_endpoint_weights_and_api_key(monkeypatch):
    monkeypatch.delenv("ABSENT_KEY_FOR_TEST", raising=False)
    stage = CaptionStage(backend="endpoint", endpoint_url="http://x:8000/v1", endpoint_model="m",
                         api_key_env="ABSENT_KEY_FOR_TEST")
    reqs = {r.key: r for r in stage.weights()}
    assert reqs["caption.endpoint_url"].available and reqs["caption.endpoint_url"].location.endswith("/chat/completions")
    assert not reqs["caption.api_key_env"].available
    with pytest.raises(RuntimeError, match="ABSENT_KEY_FOR_TEST"):
        stage.setup()


# ---- CoCa backend -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coca(tmp_path_factory):
    root = tmp_path_factory.mktemp("coca")
    config, checkpoint = mf.write_open_clip_checkpoint(root, mf.TINY_COCA, mf.TINY_COCA_CONFIG)
    stage = CaptionStage(model=mf.TINY_COCA, pretrained=str(checkpoint), model_config=str(config),
                         device="cpu", torch_threads=1, seq_len=12)
    stage.setup()
    return stage


def test_coca_captions_kept_clips_in_one_batch(coca):
    looks = [mf.keyframes(seed) for seed in (1, 2, 3, 4)]
    before = dict(coca.stats)
    out = coca(mf.clip_batch(looks + [None], keep=[True, False, True, True, True]))
    assert coca.stats["images"] - before.get("images", 0) == 3  # the rejected clip was not captioned
    assert out["caption"][1] is None and out["caption"][4] is None
    assert out["caption_source"] == ["coca:tiny-coca-test", None, "coca:tiny-coca-test", "coca:tiny-coca-test", None]
    for i in (0, 2, 3):
        assert isinstance(out["caption"][i], str) and out["caption"][i].strip()
        assert "<" not in out["caption"][i]  # special tokens are stripped
    # Batched decoding gives each clip what it gets alone.
    (alone,) = coca(mf.clip_batch([looks[2]]))["caption"]
    assert alone == out["caption"][2]


def test_coca_bad_keyframe_fails_that_clip_only(coca):
    out = coca(mf.clip_batch([[b"x", b"not a jpeg", b"y"], mf.keyframes(1)]))
    assert out["caption"][0] is None and "undecodable" in out["caption_error"][0]
    assert out["caption"][1] and out["caption_error"][1] is None


def test_coca_then_endpoint_merge(coca):
    def answer(request, seen):
        images = images_of(request)
        if images:
            return 200, ok("the clip moves"), 0.0
        return 200, ok("merged: " + request["messages"][0]["content"][-1]["text"].split("\n")[1]), 0.0

    with ChatServer(answer) as server:
        stage = CaptionStage(model=coca.clip.model, pretrained=coca.clip.pretrained, model_config=coca.clip.model_config,
                             device="cpu", torch_threads=1, seq_len=12, merge=True, endpoint_url=server.url,
                             endpoint_model="llm", retries=0)
        stage.setup()
        out = stage(mf.clip_batch([mf.keyframes(1)]))
    (frame_caption,) = coca(mf.clip_batch([mf.keyframes(1)]))["caption"]
    assert out["caption"][0].startswith("merged: ") and frame_caption in out["caption"][0]
    assert out["caption_source"] == ["merged:coca:tiny-coca-test+llm"]
    assert [len(images_of(r)) for r in server.requests] == [3, 0]  # CoCa made the frame caption


def test_decode_tokens_round_trips_real_text(coca):
    ids = coca._tokenizer("a dog runs on the beach")[0].tolist()
    body = [t for t in ids if t not in (0, 49406, 49407)]
    assert decode_tokens(coca._tokenizer, body) == "a dog runs on the beach"


def test_a_clip_model_is_not_a_captioner(tmp_path):
    config, checkpoint = mf.write_open_clip_checkpoint(tmp_path, mf.TINY_CLIP, mf.TINY_CLIP_CONFIG)
    stage = CaptionStage(model=mf.TINY_CLIP, pretrained=str(checkpoint), model_config=str(config), device="cpu")
    with pytest.raises(ValueError, match="not a CoCa model"):
        stage.setup()


def test_coca_weights_name_the_key(tmp_path):
    reqs = CaptionStage(pretrained=str(tmp_path / "coca.pt")).weights("captions")
    assert [(r.key, r.available) for r in reqs] == [("captions.pretrained", False)]
    (tag,) = CaptionStage().weights()
    assert tag.key == "caption.pretrained" and not tag.available and "mscoco_finetuned" in tag.what


def test_constructor_validates_arguments():
    for kwargs, name in [({"backend": "blip"}, "backend"), ({"backend": "endpoint"}, "endpoint_url"),
                         ({"backend": "endpoint", "endpoint_url": "http://h/v1"}, "endpoint_model"),
                         ({"merge": True, "endpoint_url": "http://h", "endpoint_model": "m",
                           "merge_prompt": "no placeholders"}, "merge_prompt"),
                         ({"max_concurrency": 0}, "max_concurrency"), ({"retries": -1}, "retries"),
                         ({"timeout_s": 0.0}, "timeout_s"), ({"pretrained": None}, "pretrained")]:
        with pytest.raises(ValueError, match=name):
            CaptionStage(**kwargs)
