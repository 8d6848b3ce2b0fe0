"""Soak benchmark: a large mixed corpus, driver and workers killed, every clip exactly once.

    python bench/soak_bench.py [--sources 300] [--config pipeline.yaml] [--work bench_out/soak]
    python bench/soak_bench.py --store s3 [--fault-share 0.02]   # the sources in a local S3 endpoint

1. Generates a corpus of --sources files (cached in WORK/corpus), at least 15% of them bad
   or odd: every kind of source that gives no clip (shorter than min_duration_s, fast cuts,
   one frame, a video stream with no decodable frame, audio only, a 1 fps slideshow),
   zero-byte, truncated, garbage in the middle, not a video, 4K, 120 fps, 10-bit, rotated
   90/180/270, non-square pixels; the rest ordinary short clips of 1 to 4 shots.
2. Runs `curate run CONFIG --skip-unavailable-models` on the embedded cluster, uninterrupted.
3. Runs the same command again into another folder and SIGKILLs the driver at 3 random
   moments (`--kill-window`; resuming with the same command after each), and SIGKILLs 2 unit workers
   (`ray::unit_task` processes) while it runs.
4. Prints: sources accounted / total; clips exactly once (duplicates, missing and extra
   against the uninterrupted run); work lost at each kill (units in flight); wall time of
   the interrupted run against the uninterrupted one. Also written to WORK/soak.json.

With --store s3 the corpus is uploaded to a local S3 API server (moto, started here) and both
runs read it by `--input s3://soak/corpus/` through a fault-injecting proxy (tests/s3_server.py)
that answers `--fault-share` of the requests 503 SlowDown (three quarters of them) or drops the
connection (a quarter), and both runs write their OUT_DIR there too (s3://soak/clean/,
s3://soak/soak/), through the same proxy: the commit protocol of object stores (unique names,
the ledger entry last) under kills and faults. The failed requests run.json counted are printed;
the checks read the store directly.

Run by hand (it takes minutes), not in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation import synth  # noqa: E402
from curation.reaper import descendants  # noqa: E402


def ordinary(path: Path, rng: random.Random, **options) -> None:
    shots = []
    for _ in range(rng.randint(1, 4)):
        motion = rng.choice(["static", "pan", "square"])
        shots.append({"frames": rng.randint(50, 110), "seed": rng.randint(0, 10**6), "motion": motion,
                      "speed_px_per_frame": 0.0 if motion == "static" else rng.uniform(0.5, 6)})
    fps = options.pop("fps", rng.choice([24, 25, 30, 29.97]))
    size = options.pop("size", rng.choice([(320, 180), (256, 144), (240, 320)]))
    for attempt in range(20):
        try:
            synth.make_video(path, shots, fps, size, **options)
            return
        except ValueError:  # two neighbouring looks too alike for a sure cut: new seeds
            for s in shots:
                s["seed"] = rng.randint(0, 10**6)
    raise RuntimeError(f"could not make {path}")


def make_corpus(root: Path, n: int, seed: int = 0) -> dict[str, str]:
    """name -> kind; at least 15% of the files are bad or odd."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, str] = {}
    good = root / "good_000.mp4"
    ordinary(good, rng, size=(320, 180))
    kinds[good.name] = "ordinary"
    for name, (status, _) in synth.write_no_clip_sources(root / "no_clips").items():
        kinds[f"no_clips/{name}"] = status
    odd = {
        "zero_byte.mp4": lambda p: synth.write_zero_byte(p),
        "truncated.mp4": lambda p: synth.write_corrupt_video(p, good, mode="truncate"),
        "garbage_middle.mp4": lambda p: synth.write_corrupt_video(p, good, mode="garbage"),
        "not_a_video.mp4": lambda p: synth.write_not_a_video(p),
        "uhd_4k.mp4": lambda p: synth.make_video(p, [{"frames": 60, "seed": 5, "motion": "pan", "speed_px_per_frame": 20.0}], 24, (3840, 2160)),
        "fps_120.mp4": lambda p: ordinary(p, rng, fps=120),
        "ten_bit.mp4": lambda p: ordinary(p, rng, pix_fmt="yuv420p10le"),
        "rotated_90.mp4": lambda p: ordinary(p, rng, rotation=90),
        "rotated_180.mp4": lambda p: ordinary(p, rng, rotation=180),
        "rotated_270.mp4": lambda p: ordinary(p, rng, rotation=270),
        "non_square_pixels.mp4": lambda p: ordinary(p, rng, sample_aspect_ratio=Fraction(4, 3)),
    }
    bad_target = max(int(0.16 * n), len(odd) + len(kinds))
    k = 0
    while len(kinds) < bad_target:  # the odd kinds, repeated with new content
        for name, make in odd.items():
            if len(kinds) >= bad_target:
                break
            path = root / f"{Path(name).stem}_{k:03d}.mp4"
            make(path)
            kinds[path.name] = Path(name).stem
        k += 1
    i = 1
    while len(kinds) < n:
        path = root / f"good_{i:03d}.mp4"
        ordinary(path, rng)
        kinds[path.name] = "ordinary"
        i += 1
    (root / "kinds.json").write_text(json.dumps(kinds, indent=1))
    return kinds


def command(config: str, corpus: Path | str, out: Path) -> list[str]:
    return [sys.executable, "-m", "curation.cli", "run", config, "--input", str(corpus), "--output", str(out),
            "--skip-unavailable-models"]


def storage_counts(out: Path | str) -> dict:
    """run.json's object-store counts over every attempt of a run."""
    from curation.writer import OutputStore

    return OutputStore(out).read_run().get("storage") or {}


def ledger_count(out: Path | str) -> int:
    from curation.writer import OutputStore

    return len(list(OutputStore(out).ledger_dir.glob("u*.json")))


def inflight_count(out: Path | str) -> int:
    from curation.writer import OutputStore

    return len(list(OutputStore(out).inflight_dir.glob("*.json")))


def remove(out: Path | str) -> None:
    from curation import outdir

    outdir.rmtree(outdir.out_path(out))


def unit_workers(driver: int) -> list[int]:
    pids = []
    for pid in descendants(driver):
        try:
            if b"ray::unit_task" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _kind(pid: int) -> str:
    """What a process is: a Ray worker's title (ray::unit_task, ray::IDLE, an actor class), or its program."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split()[0][:40]
    prog = os.path.basename(first)
    if prog.startswith("python") and len(argv) > 1:
        rest = [a.decode(errors="replace") for a in argv[1:] if a]
        for a in rest:
            if a.endswith(".py") or a in ("curation.cli",):
                return os.path.basename(a)
        return "python " + (rest[0] if rest else "")[:30]
    return prog[:40]


def tree_memory_mb(root: int) -> dict[str, tuple[float, float]]:
    """{kind: (RSS, PSS)} in MB over a process and all its descendants. PSS shares every page
    among the processes that map it (Ray's object store is mapped by every worker), so its sum
    is the memory the run really holds; RSS counts shared pages once per process."""
    out: dict[str, list[float]] = {}
    for pid in [root, *descendants(root)]:
        rss = pss = 0
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
        except OSError:
            continue
        acc = out.setdefault(_kind(pid), [0.0, 0.0])
        acc[0] += rss / 1024
        acc[1] += pss / 1024
    return {k: (v[0], v[1]) for k, v in out.items()}


def run_watched(cmd: list[str], env: dict[str, str], log_path: Path) -> dict:
    """Run to the end, sampling CPU use (busy cores, mean) and the process tree's memory (RSS and
    PSS, in all and by kind of process)."""
    busy0, total0 = cpu_times()
    started = time.monotonic()
    samples: list[dict[str, tuple[float, float]]] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            samples.append(tree_memory_mb(proc.pid))
            time.sleep(1.0)
    busy1, total1 = cpu_times()
    cores = os.cpu_count() or 1
    third = max(1, len(samples) // 3)
    rss = [sum(v[0] for v in s.values()) for s in samples] or [0.0]
    pss = [sum(v[1] for v in s.values()) for s in samples] or [0.0]

    def mean(values: list[float]) -> float:
        return sum(values) / max(1, len(values))

    kinds = sorted({k for s in samples for k in s})
    by_kind = {k: {"pss_mb_first_third": mean([s.get(k, (0, 0))[1] for s in samples[:third]]),
                   "pss_mb_last_third": mean([s.get(k, (0, 0))[1] for s in samples[-third:]]),
                   "rss_mb_first_third": mean([s.get(k, (0, 0))[0] for s in samples[:third]]),
                   "rss_mb_last_third": mean([s.get(k, (0, 0))[0] for s in samples[-third:]])}
               for k in kinds}
    return {"returncode": proc.returncode, "wall_s": time.monotonic() - started,
            "busy_cores_mean": cores * (busy1 - busy0) / max(total1 - total0, 1.0),
            "peak_rss_mb": max(rss), "peak_pss_mb": max(pss),
            "rss_mb_first_third_mean": mean(rss[:third]), "rss_mb_last_third_mean": mean(rss[-third:]),
            "pss_mb_first_third_mean": mean(pss[:third]), "pss_mb_last_third_mean": mean(pss[-third:]),
            "by_kind": by_kind,
            # Summed PSS once a second, and by kind at the ends of the middle and last thirds (past
            # start-up, when workers and actors have their titles and models): growth there is a leak.
            "pss_mb_series": [round(v, 1) for v in pss],
            "pss_mb_by_kind_at": {name: {k: round(v[1], 1) for k, v in samples[i].items()}
                                  for name, i in (("two_thirds", min(len(samples) - 1, 2 * third)),
                                                  ("end", len(samples) - 1))} if samples else {}}


def clip_counts(out: Path | str) -> Counter:
    from curation import outdir
    from curation.writer import OutputStore

    counts: Counter = Counter()
    for path in OutputStore(out).committed_files("scores"):
        counts.update(outdir.read_table(path, columns=["clip_id"]).column("clip_id").to_pylist())
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", type=int, default=300)
    p.add_argument("--config", default=str(REPO / "pipeline.yaml"))
    p.add_argument("--work", default=str(REPO / "bench_out" / "soak"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", choices=["local", "s3"], default="local")
    p.add_argument("--fault-share", type=float, default=0.02, help="--store s3: requests the proxy fails")
    p.add_argument("--clean-only", action="store_true",
                   help="only the uninterrupted run (its CPU use and memory by kind of process)")
    p.add_argument("--kill-window", type=lambda t: tuple(float(v) for v in t.split(",")), default=(0.15, 0.45),
                   metavar="FROM,TO", help="each driver kill at a random moment of an attempt, as shares of "
                                           "the uninterrupted run's wall time (default 0.15,0.45)")
    args = p.parse_args()
    if args.store == "s3":
        sys.path.insert(0, str(REPO / "tests"))
        from s3_server import FaultProxy, moto_endpoint

        Path(args.work).mkdir(parents=True, exist_ok=True)
        with moto_endpoint(Path(args.work) / "moto.log") as url:
            for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                               "AWS_REGION": "us-east-1"}.items():
                os.environ.setdefault(key, value)
            proxy = FaultProxy(url, error_share=0.75 * args.fault_share, drop_share=0.25 * args.fault_share,
                               seed=args.seed)
            with proxy as proxied:
                run(args, upload_to=url, endpoint=proxied)
            print(f"{'requests the proxy failed':<40}{proxy.counts['errors']} answered 503, "
                  f"{proxy.counts['dropped']} dropped, of {sum(proxy.counts.values())}")
        return
    run(args)


def run(args: argparse.Namespace, upload_to: str | None = None, endpoint: str | None = None) -> None:
    work = Path(args.work)
    corpus = work / "corpus"
    kinds_file = corpus / "kinds.json"
    if kinds_file.exists() and len(json.loads(kinds_file.read_text())) == args.sources:
        kinds = json.loads(kinds_file.read_text())
    else:
        shutil.rmtree(corpus, ignore_errors=True)
        t0 = time.perf_counter()
        kinds = make_corpus(corpus, args.sources, args.seed)
        print(f"corpus: {len(kinds)} files in {time.perf_counter() - t0:.0f}s", flush=True)
    bad = sum(1 for k in kinds.values() if k != "ordinary")
    print(f"corpus: {len(kinds)} sources, {bad} bad or odd ({100 * bad / len(kinds):.0f}%): "
          f"{dict(Counter(kinds.values()))}", flush=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    inputs: Path | str = corpus
    clean: Path | str = work / "clean"
    soak: Path | str = work / "soak"
    if upload_to is not None:  # the corpus in the local endpoint; the runs go through the proxy
        import fsspec

        fs = fsspec.filesystem("s3", endpoint_url=upload_to, skip_instance_cache=True)
        if not fs.exists("soak"):
            fs.mkdir("soak")
        t0 = time.perf_counter()
        for path in sorted(corpus.rglob("*")):
            if path.is_file() and path.name != "kinds.json":
                fs.put_file(str(path), f"soak/corpus/{path.relative_to(corpus).as_posix()}")
        print(f"uploaded to s3://soak/corpus/ in {time.perf_counter() - t0:.0f}s", flush=True)
        inputs, env["AWS_ENDPOINT_URL"] = "s3://soak/corpus/", endpoint
        clean, soak = "s3://soak/clean/", "s3://soak/soak/"
        os.environ["AWS_ENDPOINT_URL"] = upload_to  # this process checks the store directly

    # Uninterrupted.
    remove(clean)
    watched = run_watched(command(args.config, inputs, clean), env, work / "clean.log")
    clean_wall = watched["wall_s"]
    if watched["returncode"] != 0:
        sys.exit(f"uninterrupted run failed ({watched['returncode']}); see {work / 'clean.log'}")
    print(f"uninterrupted: {clean_wall:.0f}s, exit 0, {watched['busy_cores_mean']:.2f} of {os.cpu_count()} "
          f"cores busy on average, memory of the run's processes peak {watched['peak_rss_mb']:.0f} MB "
          f"(mean {watched['rss_mb_first_third_mean']:.0f} MB in the first third, "
          f"{watched['rss_mb_last_third_mean']:.0f} MB in the last); summed PSS (shared pages counted once) "
          f"peak {watched['peak_pss_mb']:.0f} MB, mean {watched['pss_mb_first_third_mean']:.0f} MB in the first "
          f"third, {watched['pss_mb_last_third_mean']:.0f} MB in the last", flush=True)
    series = watched["pss_mb_series"]
    print("    summed PSS at each tenth of the run: " + " ".join(
        f"{series[min(len(series) - 1, k * len(series) // 10)]:.0f}" for k in range(1, 11)) + " MB", flush=True)
    for kind, m in sorted(watched["by_kind"].items(), key=lambda kv: -kv[1]["pss_mb_last_third"]):
        print(f"    {kind:<42} PSS {m['pss_mb_first_third']:7.0f} -> {m['pss_mb_last_third']:7.0f} MB   "
              f"RSS {m['rss_mb_first_third']:7.0f} -> {m['rss_mb_last_third']:7.0f} MB", flush=True)

    if args.clean_only:
        (work / "clean.json").write_text(json.dumps(watched, indent=2))
        return

    # Interrupted: the driver killed 3 times, 2 unit workers killed.
    rng = random.Random(args.seed + 1)
    remove(soak)
    kills = []
    worker_kills = sorted(rng.uniform(0.1, 0.8) * clean_wall for _ in range(2))
    total_wall, attempt = 0.0, 0
    while True:
        kill_at = rng.uniform(*args.kill_window) * clean_wall if attempt < 3 else None
        log = open(work / f"soak-attempt{attempt}.log", "w")
        started = time.monotonic()
        proc = subprocess.Popen(command(args.config, inputs, soak), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            now = time.monotonic() - started
            if worker_kills and total_wall + now >= worker_kills[0]:
                victims = unit_workers(proc.pid)
                if victims:
                    os.kill(victims[0], signal.SIGKILL)
                    worker_kills.pop(0)
                    print(f"  killed unit worker {victims[0]} at {total_wall + now:.0f}s", flush=True)
            if kill_at is not None and now >= kill_at:
                in_flight = inflight_count(soak)
                committed = ledger_count(soak)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills.append({"attempt": attempt, "at_s": round(now, 1), "units_committed": committed,
                              "units_in_flight_lost": in_flight})
                print(f"  killed the driver at {now:.0f}s of attempt {attempt}: {committed} units committed, "
                      f"{in_flight} in flight lost", flush=True)
                time.sleep(5)  # the reaper ends the embedded cluster
                break
            time.sleep(0.2)
        total_wall += time.monotonic() - started
        log.close()
        if proc.returncode == 0:
            break
        if kill_at is None:
            sys.exit(f"the last attempt exited {proc.returncode}; see {work}/soak-attempt{attempt}.log")
        attempt += 1

    # Check.
    from curation.writer import OutputStore

    scores = OutputStore(soak).read_scores()
    accounted = len(set(scores.column("source_id").to_pylist()))
    a, b = clip_counts(soak), clip_counts(clean)
    duplicates = sum(n - 1 for n in a.values() if n > 1)
    missing = len(set(b) - set(a))
    extra = len(set(a) - set(b))
    outcomes = Counter(s for s in scores.column("source_status").to_pylist() if s)
    result = {
        "sources_total": len(kinds), "sources_bad_or_odd": bad, "sources_accounted": accounted,
        "clips": sum(a.values()), "clips_uninterrupted": sum(b.values()), "duplicates": duplicates,
        "missing_vs_uninterrupted": missing, "extra_vs_uninterrupted": extra,
        "outcomes": dict(outcomes), "driver_kills": kills, "attempts": attempt + 1,
        "wall_uninterrupted_s": round(clean_wall, 1), "wall_interrupted_s": round(total_wall, 1),
        "wall_ratio": round(total_wall / clean_wall, 2),
        "units_retried": OutputStore(soak).read_run().get("units_retried"),
        "uninterrupted_run": watched,
        "worker_kills": 2 - len(worker_kills),
    }
    (work / "soak.json").write_text(json.dumps(result, indent=2))
    print()
    print(f"{'sources accounted / total':<40}{accounted} / {len(kinds)}")
    print(f"{'scores rows (interrupted / uninterrupted)':<40}{result['clips']} / {result['clips_uninterrupted']}")
    print(f"{'duplicates / missing / extra':<40}{duplicates} / {missing} / {extra}")
    print(f"{'rows that are not clips, by status':<40}{dict(outcomes)}")
    for k in kills:
        print(f"{'driver kill, attempt ' + str(k['attempt']):<40}at {k['at_s']}s: "
              f"{k['units_committed']} units committed, {k['units_in_flight_lost']} in flight lost")
    print(f"{'unit workers killed':<40}{result['worker_kills']} (units committed after a retry: "
          f"{result['units_retried']}; a retried unit lost to a later driver kill counts as not retried)")
    print(f"{'wall: interrupted / uninterrupted':<40}{total_wall:.0f}s / {clean_wall:.0f}s "
          f"= {result['wall_ratio']}x")
    if upload_to is not None:
        for name, out in (("uninterrupted", clean), ("interrupted", soak)):
            c = storage_counts(out)
            print(f"{'object store, ' + name:<40}{c.get('objects', 0):.0f} objects fetched, "
                  f"{c.get('bytes', 0) / 2**20:.0f} MB, {c.get('failed_requests', 0):.0f} failed requests retried")


if __name__ == "__main__":
    main()
