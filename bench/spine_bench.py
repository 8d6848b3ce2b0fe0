"""Benchmark of the curation spine (split + encode + motion + filter + write) against decoding.

    python bench/spine_bench.py                      # demo footage + a generated 1080p source
    python bench/spine_bench.py --input DIR_OR_FILE  # your footage (repeatable)
    python bench/spine_bench.py --long-seconds 0     # skip the generated 1080p source
    python bench/spine_bench.py --set split.preset=ultrafast   # the spine with config overrides
    python bench/spine_bench.py --web-footage 8      # also 8 generated sources at web video bitrates
    python bench/spine_bench.py --threads 1          # the in-process spine on one thread

Prints, per footage set:
- wall time of a PyAV decode-only pass over the files (every frame decoded, nothing else);
- wall time of the spine on the same files, in-process (one process, like the decode pass);
- their ratio (target: spine <= 3x decode-only), decodes per source (target: exactly 1);
- the CPU time of each (all threads): on a machine whose cores decoding alone keeps busy, the
  spine's CPU over the decode pass's bounds the ratio from below;
- peak RSS of the process doing each (target: bounded regardless of video length; the
  generated long 1080p source is run at two lengths to show it does not grow).
Optionally (--ray) the same spine on the embedded Ray cluster, wall time including start-up.
Each measurement runs in a fresh child process, so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench")


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM).

    Not getrusage's ru_maxrss: Linux keeps that across exec, so a spawned child would report
    its parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def decode_only(paths: list[str]) -> dict:
    import av

    started, cpu0 = time.perf_counter(), time.process_time()
    frames = 0
    for path in paths:
        try:
            with av.open(path) as c:
                stream = c.streams.video[0]
                stream.thread_type = "AUTO"
                for _ in c.decode(stream):
                    frames += 1
        except Exception:  # noqa: BLE001 - unreadable files count as decoded (the spine records them)
            pass
    return {"wall_s": time.perf_counter() - started, "frames": frames, "peak_rss_mb": _peak_rss_mb(),
            "cpu_s": time.process_time() - cpu0}


def spine(paths: list[str], out_dir: str, executor_name: str = "local", overrides: list[str] | None = None,
          workers: int | None = None) -> dict:
    from curation.config import load_config
    from curation.runner import run_local, run_pipeline
    from stages import instrument

    config = load_config(REPO / "configs" / "spine.yaml", overrides or [])
    import scenedetect  # noqa: F401  (imports are a one-off cost per process, as `import av` is for the decode pass)
    if executor_name == "ray":
        from curation.pipeline import run_ray

        def executor(cfg, units, store):
            return run_ray(cfg, units, store, num_cpus=2, object_store_mb=500)
    else:
        def executor(cfg, units, store):
            return run_local(cfg, units, store, workers=workers)
    started, cpu0 = time.perf_counter(), time.process_time()
    record = run_pipeline(config, paths, out_dir, executor, overwrite=True)
    wall = time.perf_counter() - started
    passes = list(instrument.counts("decode_pass").values())
    return {"wall_s": wall, "clips": record["clips"], "kept": record["kept"],
            "decodes_per_source": (sum(passes) / len(passes)) if passes else None,
            "max_decodes_of_a_source": max(passes) if passes else None,
            "stage_busy_s": record["stage_busy_seconds"], "peak_rss_mb": _peak_rss_mb(),
            "cpu_s": time.process_time() - cpu0}


def _child(fn, args, queue):
    logging.basicConfig(level=logging.WARNING)
    queue.put(fn(*args))


def in_child(fn, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def make_long_source(path: Path, seconds: float) -> dict:
    from curation import synth

    fps = 30
    frames = int(seconds * fps)
    # One long panning shot at 1080p: a worst case for memory if frames were ever buffered.
    return synth.make_video(path, [{"frames": frames, "seed": 7, "motion": "pan",
                                    "speed_px_per_frame": 2.0}], fps, (1920, 1080))


def measure(name: str, paths: list[str], work: Path, with_ray: bool, overrides: list[str],
            workers: int | None = None) -> None:
    dec = in_child(decode_only, paths)
    sp = in_child(spine, paths, str(work / f"out-{name}"), "local", overrides, workers)
    print(f"\n== {name}: {len(paths)} files, {dec['frames']} frames decoded")
    print(f"decode-only        {dec['wall_s']:8.2f} s   peak RSS {dec['peak_rss_mb']:7.0f} MB")
    print(f"spine (in-process, {workers or os.cpu_count()} threads) {sp['wall_s']:.2f} s   peak RSS {sp['peak_rss_mb']:7.0f} MB   "
          f"clips {sp['clips']} kept {sp['kept']}")
    print(f"ratio spine/decode {sp['wall_s'] / dec['wall_s']:8.2f} x   (target <= 3)")
    print(f"CPU decode / spine {dec['cpu_s']:8.2f} s / {sp['cpu_s']:.2f} s = {sp['cpu_s'] / dec['cpu_s']:.2f}x "
          f"(all threads; overrides: {' '.join(overrides) or 'none'})")
    print(f"decodes per source {sp['decodes_per_source']:8.2f}     (max {sp['max_decodes_of_a_source']}, target 1)")
    busy = ", ".join(f"{k} {v:.1f}s" for k, v in sp["stage_busy_s"].items())
    print(f"stage busy time    {busy}")
    if with_ray:
        ray_run = in_child(spine, paths, str(work / f"out-{name}-ray"), "ray", overrides)
        print(f"spine on Ray (2 CPUs, incl. start-up) {ray_run['wall_s']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", help="footage to measure (default: demo footage)")
    parser.add_argument("--long-seconds", type=float, default=60.0,
                        help="length of the generated 1080p source; also run at a third of it (0: skip)")
    parser.add_argument("--ray", action="store_true", help="also time the spine on the embedded Ray cluster")
    parser.add_argument("--work-dir", default=None, help="where footage and outputs go (default: a temp dir)")
    parser.add_argument("--skip-demo", action="store_true", help="only the generated 1080p source")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of the in-process spine (default: one per core, as `curate run --runner local`)")
    parser.add_argument("--web-footage", type=int, default=0, metavar="N",
                        help="also measure N generated sources with web video's bitrates (bench/web_footage.py)")
    parser.add_argument("--set", action="append", default=[], metavar="STEP.ARG=VALUE",
                        help="config override for the spine (repeatable), as for curate run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="spine-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"cores: {os.cpu_count()}, work dir: {work}")

    if args.skip_demo:
        pass
    elif args.input:
        from curation.sources import discover

        measure("your footage", [s.path for s in discover(args.input)], work, args.ray, args.set, args.threads)
    else:
        from curation import synth
        from curation.sources import discover

        demo = work / "demo"
        if not demo.is_dir():
            synth.make_demo_footage(demo)
        measure("demo footage", [s.path for s in discover([str(demo)])], work, args.ray, args.set, args.threads)
    if args.web_footage:
        from web_footage import bitrate_kbps, make_footage

        paths = make_footage(work / "web", args.web_footage)
        rates = sorted(bitrate_kbps(p) for p in paths)
        measure(f"web-like footage (360p-720p, {rates[0]:.0f}-{rates[-1]:.0f} kbit/s)", [str(p) for p in paths],
                work, args.ray, args.set, args.threads)
    if args.long_seconds > 0:
        for seconds in (args.long_seconds / 3, args.long_seconds):
            path = work / f"long_1080p_{seconds:.0f}s.mp4"
            if not path.exists():
                log.info("generating %s ...", path.name)
                # In a child, so this process stays small (and writes the file whole or not at all).
                tmp = path.with_name(f".tmp-{path.name}")
                in_child(make_long_source, tmp, seconds)
                tmp.rename(path)
            measure(f"1080p single shot, {seconds:.0f} s", [str(path)], work, False, args.set, args.threads)


if __name__ == "__main__":
    main()
