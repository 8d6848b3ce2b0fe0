"""The review page's server at corpus scale: load, a drag, the page, memory.

    python bench/review_bench.py [--rows 1000000] [--keep-dir DIR]

Fabricates a committed, compacted OUT_DIR of about `--rows` clip rows (bench/scale_bench.py's
format: real score columns, units of 4 sources; kept with --keep-dir and reused), applies its
rules once (as a run's end would), then in this process: loads it for `curate review`,
starts the server, and prints
- the load: wall and the process's RSS after it;
- a drag: the server time of /api/evaluate over 40 thresholds swept across a score's range,
  absolute and percentile rules, median and worst (the goal: under 200 ms at 10^6 rows);
- the page: the time until /api/state has answered (what the page waits for), its bytes;
- a gallery: the clips just kept and dropped at 10 thresholds, round trip;
- the peak RSS of the process (the goal: under 1 GB at 10^6 rows); the output is made in a
  child process, so this is the server's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from scale_bench import fabricate  # noqa: E402

from curation.refilter import refilter  # noqa: E402
from curation.review import Review, ReviewServer  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post(url: str, token: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "X-Review-Token": token})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--keep-dir", type=Path, default=None)
    p.add_argument("--fabricate-into", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.fabricate_into:  # the child process that makes the output (its memory is not the server's)
        started = time.monotonic()
        fabricate(args.fabricate_into / "out", args.rows, args.fabricate_into / "sources")
        refilter(args.fabricate_into / "out", ["filter.rules.duration_s.min=2.0"])
        print(f"fabricated and filtered {args.rows:,} rows in {time.monotonic() - started:.0f}s", flush=True)
        return
    work = (args.keep_dir / f"review{args.rows}") if args.keep_dir else Path(tempfile.mkdtemp(prefix="review-"))
    out = work / "out"
    if not (out / "run.json").exists():
        subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--fabricate-into", str(work)], check=True)
    started = time.monotonic()
    review = Review(out)
    print(f"load: {review.data.rows:,} rows, {review.data.clips:,} clips, {len(review.data.values)} columns in "
          f"{time.monotonic() - started:.1f}s; RSS {rss_mb():.0f} MB", flush=True)
    server = ReviewServer(review).start()
    try:
        started = time.monotonic()
        with urllib.request.urlopen(server.url, timeout=60) as r:
            page_bytes = len(r.read())
        with urllib.request.urlopen(f"{server.base}/api/state?token={server.token}", timeout=60) as r:
            state_bytes = len(r.read())
        print(f"page: {time.monotonic() - started:.2f}s until the state answered "
              f"({page_bytes:,} bytes of page, {state_bytes:,} of state)", flush=True)
        h = review.data.histogram("motion_score")
        lo, hi = h["edges"][0], h["edges"][-1]
        for kind in ("absolute", "percentile"):
            times = []
            for i in range(40):
                rules = {"duration_s": {"min": 2.0}, "text_area_ratio": {"max": 0.07}}
                if kind == "absolute":
                    rules["motion_score"] = {"min": lo + (hi - lo) * i / 39}
                else:
                    rules["motion_score"] = {"drop_bottom": 0.01 + 0.9 * i / 39}
                started = time.perf_counter()
                answer = post(f"{server.base}/api/evaluate", server.token, {"rules": {"filter": rules}})
                times.append((answer["server_ms"], 1000 * (time.perf_counter() - started)))
            server_ms = [t[0] for t in times]
            round_ms = [t[1] for t in times]
            print(f"drag ({kind} rule, 40 thresholds): server {statistics.median(server_ms):.0f} ms median, "
                  f"{max(server_ms):.0f} ms worst; round trip {statistics.median(round_ms):.0f} ms median",
                  flush=True)
        times = []
        for i in range(10):
            rules = {"duration_s": {"min": 2.0}, "text_area_ratio": {"max": 0.07},
                     "motion_score": {"min": lo + (hi - lo) * i / 9}}
            started = time.perf_counter()
            post(f"{server.base}/api/gallery", server.token,
                 {"rules": {"filter": rules}, "step": "filter", "column": "motion_score", "n": 8})
            times.append(1000 * (time.perf_counter() - started))
        print(f"gallery (8 kept and 8 dropped clips at 10 thresholds): {statistics.median(times):.0f} ms median, "
              f"{max(times):.0f} ms worst, round trip", flush=True)
    finally:
        server.close()
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if not args.keep_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
