"""Benchmark: the spine on the same sources from a local folder and from an S3 endpoint.

    python bench/storage_bench.py                    # 12 generated web-like sources, local moto S3
    python bench/storage_bench.py --count 24 --workers 2
    python bench/storage_bench.py --endpoint http://127.0.0.1:9000 --bucket footage   # your MinIO
    python bench/storage_bench.py --listing 100000   # discovery of 100k objects: streamed vs listed first

Writes `--count` sources (bench/web_footage.py: web-video bitrates, 640x360-1280x720), uploads
them to a bucket of a local S3 API server (moto in server mode, started here; or `--endpoint`
with the usual AWS variables), then runs the spine in-process (`run_local`, `--workers`
threads) three times in fresh outputs: on the folder, on s3://BUCKET/bench/, and on
s3://BUCKET/bench/ with OUT_DIR s3://BUCKET/out/ (nothing local). Prints for each the wall time
and clips/s, the ratio to local (goal: S3 within 15% of local), and for the S3-input run the
bytes fetched per source byte (1.00: every source read once) and the fetch throughput.

--listing N puts N/10 and N empty .mp4 objects under two prefixes and plans units of 4 from
each twice: streamed (UnitFeed over iter_sources, as `curate run` does, units finished as they
come, as commits do) and listed first (`discover`, a sorted list, then `plan_units`). Prints
the time to the first unit, the total time and the peak Python memory allocated while
planning (tracemalloc; after a warm-up listing, so botocore's models are not counted).
The local run goes first and the S3 run second, so the page cache favours neither: the
local files stay cached, and S3 reads go through the server's own files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from curation.config import load_config  # noqa: E402
from curation.runner import run_local, run_pipeline  # noqa: E402
from stages import storage  # noqa: E402

log = logging.getLogger("bench")


def spine(inputs: list[str], out: Path | str, workers: int, overrides: list[str]) -> tuple[float, dict]:
    config = load_config(REPO / "configs" / "spine.yaml", overrides)
    started = time.monotonic()
    record = run_pipeline(config, inputs, out, lambda c, u, s: run_local(c, u, s, workers=workers))
    return time.monotonic() - started, record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=12)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--endpoint", default=None, help="an S3 endpoint of your own (default: moto, started here)")
    p.add_argument("--bucket", default="storage-bench")
    p.add_argument("--set", action="append", default=[], help="config overrides of the spine")
    p.add_argument("--listing", type=int, default=0, help="the discovery benchmark over N objects instead")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    if args.listing:
        from s3_server import moto_endpoint

        with tempfile.TemporaryDirectory(prefix="storage_bench_") as tmp, moto_endpoint(Path(tmp) / "moto.log") as url:
            for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                               "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}.items():
                os.environ.setdefault(key, value)
            os.environ["AWS_ENDPOINT_URL"] = url
            listing_bench(args)
        return

    from web_footage import make_footage

    with tempfile.TemporaryDirectory(prefix="storage_bench_") as tmp:
        root = Path(tmp)
        started = time.monotonic()
        files = make_footage(root / "footage", args.count)
        total = sum(f.stat().st_size for f in files)
        log.info("%d sources, %.1f MB, generated in %.0fs", len(files), total / 2**20, time.monotonic() - started)
        if args.endpoint:
            os.environ["AWS_ENDPOINT_URL"] = args.endpoint
            run_bench(args, root, files, total)
            return
        from s3_server import moto_endpoint

        with moto_endpoint(root / "moto.log") as url:
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
            os.environ.setdefault("AWS_REGION", "us-east-1")
            os.environ["AWS_ENDPOINT_URL"] = url
            run_bench(args, root, files, total)


def listing_bench(args: argparse.Namespace) -> None:
    import tracemalloc

    import fsspec

    from curation.sources import UnitFeed, discover, iter_sources, plan_units

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(args.bucket)
    started = time.monotonic()
    sizes = {"small": max(1, args.listing // 10), "large": args.listing}
    for name, count in sizes.items():
        for s in range(0, count, 5000):
            fs.pipe({f"{args.bucket}/{name}/{k:08d}.mp4": b"" for k in range(s, min(count, s + 5000))})
    log.info("put %d objects in %.0fs", sum(sizes.values()), time.monotonic() - started)
    list(iter_sources([f"s3://{args.bucket}/small/"]))  # warm up: the client, botocore's models

    def measure(plan) -> tuple[float, float, float, int]:
        tracemalloc.start()
        started = time.monotonic()
        feed = plan()
        units = iter(feed)
        done = getattr(feed, "finished", lambda unit_id: None)  # as units commit in a run
        done(next(units).unit_id)
        first = time.monotonic() - started
        n = 1
        for unit in units:
            done(unit.unit_id)
            n += 1
        total = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return first, total, peak / 2**20, n

    print("objects under one prefix, units of 4")
    for size, count in sizes.items():
        prefix = f"s3://{args.bucket}/{size}/"
        for name, plan in (("streamed (curate run)", lambda: UnitFeed(iter_sources([prefix]), 4)),
                           ("listed first", lambda: plan_units(discover([prefix]), 4))):
            first, total, peak, n = measure(plan)
            print(f"{count:8,} objects, {name:22s}: first unit after {first:6.2f} s, all {n:,} units after "
                  f"{total:6.1f} s, peak memory while planning {peak:7.1f} MB")


def run_bench(args: argparse.Namespace, root: Path, files: list[Path], total: int) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists(args.bucket):
        fs.mkdir(args.bucket)
    started = time.monotonic()
    for f in files:
        fs.put_file(str(f), f"{args.bucket}/bench/{f.name}")
    log.info("uploaded in %.1fs", time.monotonic() - started)
    overrides = ["run.sources_per_unit=4", *args.set]
    local_s, local = spine([str(root / "footage")], root / "out_local", args.workers, overrides)
    before = dict(storage.FETCHED)
    s3_s, remote = spine([f"s3://{args.bucket}/bench/"], root / "out_s3", args.workers, overrides)
    fetched = storage.FETCHED["bytes"] - before["bytes"]
    fetch_s = storage.FETCHED["seconds"] - before["seconds"]
    both_s, both = spine([f"s3://{args.bucket}/bench/"], f"s3://{args.bucket}/out/", args.workers, overrides)
    assert remote["clips"] == local["clips"] == both["clips"], (remote["clips"], local["clips"], both["clips"])
    print(f"sources {len(files)}  ({total / 2**20:.1f} MB)  workers {args.workers}  clips {local['clips']}")
    print(f"local folder : {local_s:6.1f} s  {local['clips'] / local_s:6.2f} clips/s")
    print(f"s3 endpoint  : {s3_s:6.1f} s  {remote['clips'] / s3_s:6.2f} clips/s  "
          f"({s3_s / local_s - 1:+.1%} wall against local; goal within +15%)")
    print(f"s3 in and out: {both_s:6.1f} s  {both['clips'] / both_s:6.2f} clips/s  "
          f"({both_s / local_s - 1:+.1%} wall against local; OUT_DIR s3://{args.bucket}/out/)")
    print(f"fetched      : {fetched / total:.2f} bytes per source byte, {fetched / 2**20:.1f} MB in "
          f"{fetch_s:.1f} s of fetching ({fetched / 2**20 / max(fetch_s, 1e-9):.0f} MB/s a fetch, "
          f"overlapped with decoding)")


if __name__ == "__main__":
    main()
