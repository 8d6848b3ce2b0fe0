"""Weight requirements, `curate models check|download`, and open_clip weight resolution
(stages/weights.py, curation/weights_command.py, stages/torch_setup.py and the shared loader
stages/open_clip_loader.py)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

import model_fixtures as mf
from curation.config import load_config
from curation.weights_command import config_weights, models_command
from stages.open_clip_loader import OpenClipWeights
from stages.torch_setup import resolve_device, set_torch_threads, validate_device_args
from stages.weights import WeightRequirement, check_reachable, download_url, missing_weights_message


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    config, checkpoint = mf.write_open_clip_checkpoint(root, mf.TINY_CLIP, mf.TINY_CLIP_CONFIG)
    return {"root": root, "config": str(config), "checkpoint": str(checkpoint),
            "head": str(mf.write_linear_head(root / "head.pth"))}


def write_pipeline(path: Path, tiny: dict, head: str | None = None) -> Path:
    clip = {"model": mf.TINY_CLIP, "pretrained": tiny["checkpoint"], "model_config": tiny["config"]}
    steps = [
        {"stage": "split"},
        {"stage": "ocr", "args": {"min_confidence": 0.0}},
        {"stage": "aesthetics", "args": {**clip, "head_path": head or tiny["head"]}},
        {"stage": "filter", "name": "cheap", "args": {"rules": {"text_area_ratio": {"max": 0.07}}}},
        {"stage": "caption", "args": {"backend": "endpoint", "endpoint_url": "http://127.0.0.1:8000/v1",
                                      "endpoint_model": "vlm"}},
        {"stage": "clip_similarity", "name": "similarity", "args": clip},
    ]
    path.write_text(yaml.safe_dump({"steps": steps}))
    return path


def test_config_weights_list_every_model_with_its_step_key(tiny, tmp_path):
    config = load_config(write_pipeline(tmp_path / "p.yaml", tiny))
    keys = [(step.name, req.key, req.available) for step, req in config_weights(config)]
    assert keys == [
        ("ocr", "ocr.model_dir", True),
        ("aesthetics", "aesthetics.model_config", True), ("aesthetics", "aesthetics.pretrained", True),
        ("aesthetics", "aesthetics.head_path", True),
        ("caption", "caption.endpoint_url", True),
        ("similarity", "similarity.model_config", True), ("similarity", "similarity.pretrained", True),
    ]


def test_check_exits_0_when_all_present_and_1_naming_the_missing_file(tiny, tmp_path, capsys):
    good = write_pipeline(tmp_path / "good.yaml", tiny)
    assert models_command(["check", str(good)]) == 0
    assert "MISSING" not in capsys.readouterr().out
    absent = tmp_path / "absent_head.pth"
    bad = write_pipeline(tmp_path / "bad.yaml", tiny, head=str(absent))
    assert models_command(["check", str(bad)]) == 1
    captured = capsys.readouterr()
    assert f"MISSING: {absent}" in captured.out
    assert "aesthetics.head_path" in captured.err and str(absent) in captured.err
    # --set overrides apply as for `curate run`.
    assert models_command(["check", str(bad), "--set", f"aesthetics.head_path={tiny['head']}"]) == 0


def test_check_on_a_bad_config_is_a_usage_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"steps": [{"stage": "split"}, {"stage": "aesthetics", "args": {"bogus": 1}}]}))
    assert models_command(["check", str(path)]) == 2


def test_missing_message_names_key_and_file():
    text = missing_weights_message([WeightRequirement("aes.head_path", "aesthetic head",
                                                      "/nowhere/h.pth", False)])
    assert "aes.head_path" in text and "/nowhere/h.pth" in text and "curate models download" in text


def test_a_tag_is_available_once_its_file_is_in_the_hugging_face_cache(tmp_path):
    weights = OpenClipWeights("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path))
    (before,) = weights.requirements("aesthetics", "CLIP")
    assert not before.available and "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in before.location
    # The layout huggingface_hub (and so open_clip's downloader) writes.
    repo = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    (after,) = weights.requirements("aesthetics", "CLIP")
    assert after.available and after.location == str(snapshot / "open_clip_pytorch_model.bin")


def test_unknown_tag_lists_the_known_ones():
    (req,) = OpenClipWeights("ViT-B-32", "laion9b").requirements("x", "CLIP")
    assert not req.available and "unknown pretrained tag" in req.location and "laion2b_s34b_b79k" in req.note


def test_loader_applies_the_tag_settings_to_a_file_it_resolves(tiny):
    # A bare checkpoint path loads with open_clip's defaults, through the same call a tag uses.
    model, preprocess, tokenizer = OpenClipWeights(mf.TINY_CLIP, tiny["checkpoint"], tiny["config"]).load("cpu", "x")
    assert not model.training
    assert tokenizer(["a cat"]).shape[-1] == 77
    with pytest.raises(FileNotFoundError, match="x.pretrained"):
        OpenClipWeights("ViT-B-32", "openai", cache_dir="/nonexistent").load("cpu", "x")


class _Slow(BaseHTTPRequestHandler):
    delay_s = 0.0

    def do_GET(self):  # noqa: N802
        time.sleep(self.delay_s)
        try:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"head!")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("delay_s", [0.0, 2.0])
def test_download_url_is_atomic_and_times_out(tmp_path, delay_s):
    handler = type("Handler", (_Slow,), {"delay_s": delay_s})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/head.pth"
    target = tmp_path / "aesthetic" / "head.pth"
    try:
        if delay_s:
            started = time.monotonic()
            with pytest.raises(OSError):  # TimeoutError / URLError: never a hang
                download_url(url, target, timeout_s=0.3)
            assert time.monotonic() - started < 1.5
            assert not target.exists() and not list(target.parent.glob("*.part"))
        else:
            assert download_url(url, target, timeout_s=5).read_bytes() == b"head!"
    finally:
        server.shutdown()
        server.server_close()


def test_download_with_nothing_to_fetch_succeeds(tiny, tmp_path):
    assert models_command(["download", str(write_pipeline(tmp_path / "p.yaml", tiny))]) == 0


def test_device_and_threads_helpers():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    import torch

    before = torch.get_num_threads()
    try:
        assert set_torch_threads(1) == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="device"):
        validate_device_args("gpu", None)


def test_unreachable_host_fails_fast_not_after_minutes_of_retries(monkeypatch):
    import socket

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a port nobody listens on
    port = sock.getsockname()[1]
    sock.close()
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="needs a machine with internet access"):
        check_reachable(f"https://127.0.0.1:{port}/x.pth", timeout_s=2)
    assert time.monotonic() - started < 2.5
