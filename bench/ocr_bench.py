"""The OCR step on CPU: what text detection costs per keyframe, in what memory, on which path.

    .venv/bin/python bench/ocr_bench.py [--keyframes 48] [--threads 2] [--web-footage 6]
        [--baseline-repo PATH] [--skip-pipeline] [--max-isa AVX2] [--force-bf16]

Prints, each figure from a fresh child process (so a peak is that path's alone):
1. per detector path -- easyocr's own (every keyframe of one size in one batch, float32, the
   stage before stages/text_detector.py), float32 channels-last one frame a pass, bfloat16
   (where this CPU computes it natively, or with --force-bf16) -- ms per keyframe, keyframes/s
   per core, peak RSS, and on the calibration and held-out text cases of tests/test_ocr.py the
   largest |text_area_ratio difference| from easyocr's own path, and which path "auto" takes;
2. peak RSS of the default path over keyframes of 3 frame sizes against 20;
3. the default pipeline.yaml in-process (the steps whose weights are here: split, motion, ocr,
   filter) next to the spine (configs/spine.yaml) and decode-only, on the same generated
   web-like files; with --baseline-repo, the default pipeline with that checkout's code too
   (the before/after ratio in one run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from spine_bench import _peak_rss_mb, decode_only, in_child  # noqa: E402


def _setup_path(repo: str) -> None:
    for p in (repo, str(Path(repo) / "tests")):
        if p not in sys.path:
            sys.path.insert(0, p)


def keyframes(n: int, sizes: list[tuple[int, int]]) -> list:
    """n keyframes (JPEG decoded to the stage's working size), cycling through `sizes`, every
    other one with a line of text."""
    from curation import synth
    from stages.ocr import decode_working
    import model_fixtures as mf

    frames = []
    for i in range(n):
        frame = synth.background(i, sizes[i % len(sizes)])
        if i % 2 == 0:
            frame = synth.draw_text(frame.copy(), f"subtitle number {i}", 0.1)
        frames.append(decode_working(mf.jpeg(frame), 320))
    return frames


def text_cases() -> tuple[list, list[float]]:
    """The 44 calibration and held-out frames of tests/test_ocr.py (decoded) and their true ratios."""
    import test_ocr as t
    from stages.ocr import decode_working
    import model_fixtures as mf

    frames, truths = [], []
    for texts, sizes, lines, seed, font in ((t.CALIBRATION_TEXTS, (12, 18, 28, 44, 70), (1, 2), 100, None),
                                            (t.HELD_OUT_TEXTS, (14, 22, 35, 55), (1, 2, 3), 300, t.HELD_OUT_FONT)):
        cases = [(px, style, k) for px in sizes for style in ("box", "subtitle") for k in lines]
        for i, (px, style, k) in enumerate(cases):
            frame, truth = t.drawn_text(seed + i, texts[i % len(texts)], px, style, k, font=font)
            frames.append(decode_working(mf.jpeg(frame), 320))
            truths.append(truth)
    return frames, truths


def detector_run(repo: str, path: str, threads: int, n: int, sizes: list, with_cases: bool) -> dict:
    """One detector path in this (child) process: timing on n keyframes, then the text cases."""
    _setup_path(repo)
    import stages  # noqa: F401  (torchvision shim)
    from stages.ocr import OcrStage, union_area_ratio
    from test_ocr import easyocr_reference_boxes  # before the stage sets its threads (test_ocr sets 1)

    stage = OcrStage(device="cpu", torch_threads=threads, working_short_side_px=320,
                     precision="fp32" if path == "easyocr" else path)
    stage.setup()
    boxes = (lambda fs: easyocr_reference_boxes(stage, fs)) if path == "easyocr" else stage.boxes
    frames = keyframes(n, sizes)
    boxes(frames[:2])  # one warm-up pass outside the clock (kernels, first allocations)
    started, cpu0 = time.perf_counter(), time.process_time()
    boxes(frames)
    wall = time.perf_counter() - started
    out = {"path": stage.precision_used if path != "easyocr" else "easyocr fp32 (batched)",
           "ms_per_keyframe": 1000 * wall / n, "cpu_s": time.process_time() - cpu0,
           "keyframes_per_s_per_core": n / wall / threads, "peak_rss_mb": _peak_rss_mb(),
           "shapes": len({f.shape for f in frames}), "torch_threads": stage.threads,
           "padded_shapes": len({tuple(-(-d // stage.pad_multiple_px) for d in f.shape[:2]) for f in frames})}
    if with_cases:
        cases, truths = text_cases()
        out["ratios"] = [union_area_ratio(f.shape[:2], p) for f, p in zip(cases, boxes(cases))]
        out["truths"] = truths
    return out


def auto_path(repo: str) -> str:
    _setup_path(repo)
    from stages.text_detector import resolve_precision

    return resolve_precision("auto", "cpu")


def pipeline_run(repo: str, paths: list[str], out_dir: str, config_name: str, threads: int) -> dict:
    """The in-process runner on `repo`'s config (model steps without weights here skipped, as
    --skip-unavailable-models does), with `repo`'s code."""
    _setup_path(repo)
    import scenedetect  # noqa: F401  (imports are a one-off cost, as `import av` is for the decode pass)

    from curation.config import load_config
    from curation.preflight import preflight
    from curation.runner import run_local, run_pipeline

    config = preflight(load_config(Path(repo) / config_name), skip_unavailable=True).config
    started, cpu0 = time.perf_counter(), time.process_time()
    record = run_pipeline(config, paths, out_dir, lambda c, u, s: run_local(c, u, s, workers=threads),
                          overwrite=True)
    return {"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu0,
            "clips": record["clips"], "peak_rss_mb": _peak_rss_mb(), "busy": record["stage_busy_seconds"],
            "steps": [s.name for s in config.steps]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keyframes", type=int, default=48, help="keyframes timed per detector path")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--force-bf16", action="store_true", help="time bf16 on a CPU without native bf16 too")
    parser.add_argument("--web-footage", type=int, default=6, metavar="N", help="files for the pipeline rows")
    parser.add_argument("--baseline-repo", default=None, help="another checkout: its default pipeline too")
    parser.add_argument("--max-isa", default=None, metavar="AVX2",
                        help="run the children as on a CPU without AVX-512 (ONEDNN_MAX_CPU_ISA and "
                             "ATEN_CPU_CAPABILITY; bf16 then only with --force-bf16)")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    repo = str(REPO)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ocr-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.max_isa:
        os.environ.update(ONEDNN_MAX_CPU_ISA=args.max_isa.upper(), ATEN_CPU_CAPABILITY=args.max_isa.lower())
    auto = "fp32" if args.max_isa else in_child(auto_path, repo)
    print(f"cores: {os.cpu_count()}, torch threads: {args.threads}; precision 'auto' here: {auto}"
          + (f" (as on a CPU whose best instructions are {args.max_isa})" if args.max_isa else ""))

    # 1. Detector paths.
    paths = ["easyocr", "fp32"] + (["bf16"] if auto == "bf16" or args.force_bf16 else [])
    sizes3 = [(568, 320), (426, 320), (320, 568)]
    runs = {p: in_child(detector_run, repo, p, args.threads, args.keyframes, sizes3, True) for p in paths}
    ref = runs["easyocr"]["ratios"]
    print(f"\n== text detection, {args.keyframes} keyframes of 3 sizes (320 px short side), "
          f"{runs['easyocr']['torch_threads']} torch threads")
    print(f"{'path':28s} {'ms/keyframe':>11s} {'kf/s/core':>9s} {'peak RSS':>9s} {'speed-up':>8s} "
          f"{'max |d ratio|':>13s} {'mean |err| vs truth':>19s}")
    for p, r in runs.items():
        d = max(abs(a - b) for a, b in zip(r["ratios"], ref))
        err = sum(abs(a / t - 1) for a, t in zip(r["ratios"], r["truths"])) / len(ref)
        print(f"{r['path']:28s} {r['ms_per_keyframe']:11.0f} {r['keyframes_per_s_per_core']:9.2f} "
              f"{r['peak_rss_mb']:7.0f}MB {runs['easyocr']['ms_per_keyframe'] / r['ms_per_keyframe']:7.2f}x "
              f"{d:13.4f} {err:19.3f}")

    # 2. Memory over frame sizes.
    # 20 source sizes in the same range as the 3 (4:3 to 16:9, landscape and portrait), so
    # that only the number of sizes differs, not the largest frame.
    sizes20 = [(426 + 15 * i, 320) for i in range(10)] + [(320, 426 + 15 * i) for i in range(10)]
    flat = {k: in_child(detector_run, repo, auto, args.threads, 60, s, False) for k, s in
            (("3 sizes", sizes3), ("20 sizes", sizes20))}
    print(f"\n== peak RSS of the default path ({auto}) over 60 keyframes")
    for k, r in flat.items():
        print(f"{k:9s} ({r['shapes']:2d} working shapes, {r['padded_shapes']} after padding): "
              f"{r['peak_rss_mb']:6.0f} MB, {r['ms_per_keyframe']:.0f} ms/keyframe")

    if args.skip_pipeline:
        return
    # 3. End to end, in one run.
    from web_footage import make_footage

    files = [str(p) for p in make_footage(work / "web", args.web_footage)]
    rows = [("decode only", in_child(decode_only, files))]
    rows.append(("spine", in_child(pipeline_run, repo, files, str(work / "spine"), "configs/spine.yaml", args.threads)))
    rows.append(("default pipeline", in_child(pipeline_run, repo, files, str(work / "default"), "pipeline.yaml",
                                              args.threads)))
    if args.baseline_repo:
        rows.append(("default pipeline, baseline", in_child(pipeline_run, str(Path(args.baseline_repo).resolve()),
                                                            files, str(work / "base"), "pipeline.yaml", args.threads)))
    print(f"\n== {len(files)} web-like files, in-process, {args.threads} threads")
    for name, r in rows:
        busy = ", ".join(f"{k} {v:.0f}s" for k, v in r.get("busy", {}).items())
        print(f"{name:28s} {r['wall_s']:7.1f} s   CPU {r['cpu_s']:6.1f} s   peak RSS {r['peak_rss_mb']:6.0f} MB   {busy}")
    if args.baseline_repo:
        print(f"default pipeline speed-up over the baseline: {rows[3][1]['wall_s'] / rows[2][1]['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
