"""A rehearsal at corpus scale on this machine (issue 33): every command on committed outputs of
10^5 to 10^7 clip rows, and the run's control plane over 10^5 sources.

    python bench/scale_bench.py readers --rows 100000 [--rows 1000000 ...] [--only report,refilter]
    python bench/scale_bench.py control --sources 100000 [--runner ray|local] [--kills 2]
    python bench/scale_bench.py control --sources 1000000 --payload small --no-compact-at-end
    python bench/scale_bench.py readers --rows 100000 --store s3     # OUT_DIR in a local S3 endpoint
    python bench/scale_bench.py runners --sources 100               # Ray against --runner local

readers: an OUT_DIR is fabricated in the exact format `curate run` leaves (a compacted
checkpoint: the units' table, scores/clips/shards files, run.json), from stages/standin.py's
rows of the real schema: 10 clips a source on average (Poisson), 3% unreadable sources, units
of 4 sources, so 10^7 rows are about 250,000 units of 1,000,000 sources, whose (empty) files
are made too, for the resume. The score columns, their types and the units are real; the
payload shrinks with the size (keyframes, signatures and embeddings at real size up to 10^5
rows; 1 kB keyframes and 64-dim embeddings above; videos are 256 bytes, their nominal size
1 MB) and the compacted files' target shrinks with it, so the number of files is that of the
nominal bytes (`files`). Then each command runs in a process of its own: finalize with a
percentile rule (`curate refilter` with one: the same pass), refilter, dedup (on the image
embeddings), report, export to webdataset, train to its first optimizer step, ablate's corpus
step (training.study.load_corpus), and a resume (`curate run` over the committed sources:
the listing, the checkpoint, the sweep). Printed per command and size: wall, peak RSS, the
driver's CPU, objects read/written (curation/outdir.py's counts) and time per row.

control: N empty source files through `curate run` with the stand-in split (rows without
decoding) and the filter, units of 4: the driver, the Ray tasks, in-flight markers, commits,
ledger checkpoints and the final compaction. With --kills K the driver is SIGKILLed K times
at spread moments and the same command resumes. Printed: wall, driver CPU per unit, driver
peak RSS, units, a check that every source gave its rows once, and where a unit's time went,
part by part (run.json's unit_seconds: the task's start, setup and return, the in-flight
marker, the steps, the write; the driver's commits, submissions and checks). `--payload small`
gives the stand-in the readers' payload above 10^5 rows (10^6 sources at real size would
fill this disk); `--no-compact-at-end` leaves the per-unit files (`compact_at_end: false`) and
the check reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation import compact, outdir, schema  # noqa: E402
from curation.ledger import UNITS_SCHEMA, fold  # noqa: E402
from curation.sources import make_unit  # noqa: E402
from curation.writer import OutputStore, add_derived_columns, write_json  # noqa: E402
from stages.base import source_id_for  # noqa: E402
from stages.standin import table_for  # noqa: E402

SOURCES_PER_UNIT = 4
CLIPS_PER_SOURCE = 10.0
NOMINAL_CLIP_BYTES = 1_000_000  # a 10 s clip at 320p, with its keyframes: what the files' count follows
TARGET_MB = 256.0

CONFIG = {
    "run": {"sources_per_unit": SOURCES_PER_UNIT, "shard_target_mb": TARGET_MB, "store_all_clips": True},
    "steps": [
        {"stage": "split_standin", "args": {}, "ray": {"num_cpus": 1}},
        {"stage": "filter", "ray": {"num_cpus": 0.25, "batch_size": 64},
         "args": {"rules": {"duration_s": {"min": 2.0}, "motion_score": {"min": 1.0},
                            "text_area_ratio": {"max": 0.07}}}},
    ],
}


def payload_sizes(rows: int) -> dict[str, int]:
    """Real keyframes, signatures and embeddings up to 10^5 rows; smaller above (disk)."""
    if rows <= 100_000:
        return {"keyframe_bytes": 15_000, "embedding_dims": 512, "video_bytes": 256}
    return {"keyframe_bytes": 1_000, "embedding_dims": 64, "video_bytes": 256}


# ---- fabricating a committed output -------------------------------------------------------------

def fabricate(out: Path, rows: int, sources_dir: Path) -> dict:
    """A committed, compacted OUT_DIR of about `rows` clip rows (module docstring); returns facts."""
    started = time.monotonic()
    n_sources = int(math.ceil(rows / CLIPS_PER_SOURCE))
    sizes = payload_sizes(rows)
    per_clip = 3 * sizes["keyframe_bytes"] + sizes["video_bytes"] + 4 * sizes["embedding_dims"] + 2000
    scale = stored_bytes_per_clip(sizes) / NOMINAL_CLIP_BYTES  # the files' target, as the payload shrank
    store = OutputStore(out)
    for d in (store.scores_dir, store.clips_dir, store.shards_dir, store.ledger_dir, store.logs_dir,
              store.inflight_dir, sources_dir):
        d.mkdir(parents=True, exist_ok=True)
    lock = compact.Lock(store)
    lock.acquire()
    writers = {
        "scores": compact.RollingWriter(store.scores_dir, lock.prefix, "scores", TARGET_MB * 2**20),
        "clips": compact.RollingWriter(store.clips_dir, lock.prefix, "clips", TARGET_MB * 2**20 * scale),
        "shards": compact.RollingWriter(store.shards_dir, lock.prefix, "shards", TARGET_MB * 2**20 * scale),
    }
    units_rows, entries = [], []
    # Whole units, and at most about 400 MB of payload at once (Arrow binary offsets are 32-bit).
    chunk = SOURCES_PER_UNIT * max(1, min(2000, int(400e6 / (CLIPS_PER_SOURCE * per_clip * SOURCES_PER_UNIT))))
    totals_rows = totals_clips = 0
    for first in range(0, n_sources, chunk):
        paths = [str(sources_dir / f"src{i:08d}.mp4") for i in range(first, min(n_sources, first + chunk))]
        for p in paths:
            Path(p).touch()
        ids = [source_id_for(p) for p in paths]
        table = table_for(ids, paths, seed=first, clips_per_source=CLIPS_PER_SOURCE, **sizes)
        is_clip = pa.array([e is None for e in table.column("split_error").to_pylist()])
        table = table.append_column("keep", is_clip).append_column(
            "reject_reasons", pa.array([[] if c else ["split_error"] for c in is_clip.to_pylist()],
                                       pa.list_(pa.string())))
        table = add_derived_columns(table)
        writers["scores"].add(table)
        writers["scores"].end_unit()
        counts = np.bincount(pc.index_in(table.column("source_id"), pa.array(ids)).to_numpy(),
                             minlength=len(ids))
        clip_rows = table.filter(is_clip)
        clips = np.bincount(pc.index_in(clip_rows.column("source_id"), pa.array(ids)).to_numpy(),
                            minlength=len(ids))
        # Unit by unit: a compacted file of clips or shards ends only between units.
        ends = np.cumsum(clips)[SOURCES_PER_UNIT - 1::SOURCES_PER_UNIT].tolist()
        if len(ids) % SOURCES_PER_UNIT:
            ends.append(int(clips.sum()))
        start = 0
        for end in ends:
            for kind in ("clips", "shards"):
                writers[kind].add(clip_rows.slice(start, end - start))
                writers[kind].end_unit()
            start = end
        for u in range(0, len(ids), SOURCES_PER_UNIT):
            unit = make_unit(tuple(_Src(p, s) for p, s in zip(paths[u:u + SOURCES_PER_UNIT],
                                                             ids[u:u + SOURCES_PER_UNIT])))
            n_rows, n_clips = int(counts[u:u + SOURCES_PER_UNIT].sum()), int(clips[u:u + SOURCES_PER_UNIT].sum())
            units_rows.append({"unit_id": unit.unit_id, "source_ids": ids[u:u + SOURCES_PER_UNIT],
                               "first_source": paths[u], "rows": n_rows, "clips": n_clips, "kept": n_clips,
                               "source_errors": n_rows - n_clips, "attempts": 1, "committed_at": time.time(),
                               "node_id": None, "scores_file": None, "clips_file": None, "shard_files": None})
            entries.append({"rows": n_rows, "clips": n_clips, "kept": n_clips, "source_errors": n_rows - n_clips,
                            "source_ids": ids[u:u + SOURCES_PER_UNIT],
                            "source_outcomes": {"unreadable": n_rows - n_clips} if n_rows > n_clips else {},
                            "stage_seconds": {"split_standin": 0.01 * n_rows}})
        totals_rows += table.num_rows
        totals_clips += int(pc.sum(is_clip.cast(pa.int64())).as_py())
        print(f"  fabricated {min(n_sources, first + chunk):,}/{n_sources:,} sources, {totals_rows:,} rows, "
              f"{time.monotonic() - started:.0f}s", flush=True)
    files = {kind: w.close() for kind, w in writers.items()}
    units_file = f"units-{lock.seq:08d}-{lock.token}.parquet"
    from curation import outdir
    outdir.write_table(store.ledger_dir / units_file, pa.Table.from_pylist(units_rows, UNITS_SCHEMA))
    totals = fold(entries)
    compact.commit(store, lock.seq, units_file, len(units_rows), files, totals, "bench/scale_bench.py")
    lock.release()
    config = json.loads(json.dumps(CONFIG))
    config["run"]["shard_target_mb"] = TARGET_MB * scale  # refilter's shards: as many files as nominal
    from curation.config import parse_config
    parsed = parse_config(config)
    write_json(store.run_json, {"status": "complete", "config": parsed.to_dict(),
                                "config_fingerprint": parsed.fingerprint(), "kept": totals["kept"],
                                "clips": totals["clips"], "attempts": [], "inputs": [str(sources_dir)]})
    (out.parent / "config.yaml").write_text(json.dumps(config))
    return {"rows": totals_rows, "clips": totals_clips, "sources": n_sources, "units": len(units_rows),
            "files": {k: len(v) for k, v in files.items()}, "seconds": time.monotonic() - started,
            "payload_bytes_per_clip": per_clip}


def stored_bytes_per_clip(sizes: dict[str, int]) -> float:
    """Bytes a fabricated clip takes in a compressed clips file (written once, on 100 sources)."""
    ids = [f"{i:016x}" for i in range(100)]
    table = table_for(ids, [f"/calibration/{i}.mp4" for i in ids], seed=1, clips_per_source=CLIPS_PER_SOURCE,
                      **sizes)
    clips = table.filter(pc.is_null(table.column("split_error")))
    with tempfile.TemporaryDirectory() as tmp:
        import pyarrow.parquet as pq

        pq.write_table(schema.conform(clips, schema.CLIPS_SCHEMA), f"{tmp}/c.parquet", compression="zstd",
                       row_group_size=64)
        return os.path.getsize(f"{tmp}/c.parquet") / clips.num_rows


class _Src:
    def __init__(self, path: str, source_id: str):
        self.path, self.source_id, self.size_bytes = path, source_id, 0


# ---- measuring one command ------------------------------------------------------------------

def measure(argv: list[str], env: dict[str, str] | None = None, timeout_s: float = 3600) -> dict:
    """Run a command in a process of its own: wall, peak RSS, CPU of the command (it and the
    children it waited for), objects it read and wrote, exit status."""
    stats = tempfile.mktemp(prefix="io-", suffix=".json")
    wrapper = ("import json, resource, subprocess, sys, time\n"
               "t = time.monotonic()\n"
               "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
               "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
               "print(json.dumps({'rc': p.returncode, 'wall_s': time.monotonic() - t, 'peak_mb': u.ru_maxrss / 1024,"
               " 'cpu_s': u.ru_utime + u.ru_stime, 'err': p.stderr.decode(errors='replace')[-3000:]}))\n")
    run_env = {**os.environ, **(env or {}), "CURATE_IO_STATS": stats, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, env=run_env,
                          timeout=timeout_s)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    try:
        result["objects"] = json.loads(Path(stats).read_text())
        os.unlink(stats)
    except (OSError, ValueError):
        result["objects"] = {}
    return result


def curate(*args: str) -> list[str]:
    return [sys.executable, "-m", "curation.cli", *args]


def reader_commands(out: Path | str, work: Path, sources: Path) -> dict[str, list[str]]:
    config = work / "config.yaml"
    return {
        "resume": curate("run", str(config), "--input", str(sources), "--output", str(out), "--runner", "local"),
        "finalize (percentile)": curate("refilter", str(out), "--set", "filter.rules.aesthetic_score={drop_bottom: 0.5}"),
        "refilter": curate("refilter", str(out), "--set", "filter.rules.motion_score.min=2"),
        "dedup": curate("dedup", str(out), "--embedding", "image_embedding"),
        "report": curate("report", str(out)),
        "export webdataset": curate("export", str(out), "--format", "webdataset", "--to", str(work / "export"),
                                    "--overwrite", "--target-mb", str(_shard_target_mb(work))),
        "train (first step)": curate("train", str(out), "--stage", "image", "--preset-size", "tiny",
                                     "--work-dir", str(work / "train"), "--set", "total_steps=1",
                                     "--set", "batch_size=4", "--threads", "1"),
        "ablate corpus": [sys.executable, "-c", "import sys; from training.study import StudySpec, load_corpus; "
                          "c = load_corpus(sys.argv[1], StudySpec().max_clips); print(c.clips.num_rows)", str(out)],
    }


def _shard_target_mb(work: Path) -> float:
    """The fabricated run's shard target (scaled with its payload): export's pieces alike."""
    return float(json.loads((work / "config.yaml").read_text())["run"]["shard_target_mb"])


def run_readers(sizes: list[int], only: set[str] | None, keep: Path | None, store: str = "local") -> None:
    results = []
    for rows in sizes:
        work = keep / f"scale{rows}" if keep else Path(tempfile.mkdtemp(prefix=f"scale{rows}-"))
        out, sources, made = work / "out", work / "sources", work / "fabricated.json"
        if made.exists():  # kept by an earlier --keep-dir run (the commands may have refiltered it)
            facts = json.loads(made.read_text())
            print(f"reusing the {rows:,} rows fabricated in {out}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            print(f"fabricating {rows:,} rows in {out}", flush=True)
            facts = fabricate(out, rows, sources)
            made.write_text(json.dumps(facts))
        print(f"  {facts}", flush=True)
        if only == {"fabricate"}:
            continue
        with remote_copy(out, work) if store == "s3" else _as_is(out) as (target, env):
            for name, argv in reader_commands(target, work, sources).items():
                if only and name.split()[0] not in only:
                    continue
                r = measure(argv, env)
                r.update({"command": f"{name} ({store})", "rows": facts["rows"], "units": facts["units"]})
                results.append(r)
                status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']}: {r['err'][-400:]}"
                if name == "resume":  # its log lines say when planning ended and the listing did
                    print("    " + "\n    ".join(r["err"].strip().splitlines()[-12:]), flush=True)
                print(f"  {name:<22} {r['wall_s']:8.1f} s {r['peak_mb']:8.0f} MB peak {r['cpu_s']:8.1f} s CPU "
                      f"{1e6 * r['wall_s'] / facts['rows']:8.1f} us/row  objects r/w "
                      f"{r['objects'].get('read', '?')}/{r['objects'].get('written', '?')}  {status}", flush=True)
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    _table(results)


@contextlib.contextmanager
def _as_is(out: Path):
    yield out, {}


@contextlib.contextmanager
def remote_copy(out: Path, work: Path):
    """OUT_DIR uploaded to a local S3 endpoint (moto, started here): (its URI, the environment
    that reaches it)."""
    sys.path.insert(0, str(REPO / "tests"))
    from s3_server import moto_endpoint

    import fsspec

    with moto_endpoint(work / "moto.log") as url:
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
               "AWS_REGION": "us-east-1"}
        fs = fsspec.filesystem("s3", endpoint_url=url, key="bench", secret="bench-secret", skip_instance_cache=True)
        fs.mkdir("scale")
        started = time.monotonic()
        fs.put(str(out), "scale/out", recursive=True)
        print(f"  uploaded to s3://scale/out/ in {time.monotonic() - started:.0f}s", flush=True)
        yield "s3://scale/out/", env


def _table(results: list[dict]) -> None:
    print("\n| command | rows | wall s | peak RSS MB | CPU s | us/row | objects read/written |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['command']} | {r['rows']:,} | {r['wall_s']:.1f} | {r['peak_mb']:.0f} | {r['cpu_s']:.1f} | "
              f"{1e6 * r['wall_s'] / r['rows']:.1f} | {r['objects'].get('read', '?')}/{r['objects'].get('written', '?')}"
              f"{'' if r['rc'] == 0 else ' (failed)'} |")


# ---- the control plane ------------------------------------------------------------------------

def proc_stat(pid: int) -> tuple[float, float] | None:
    """(CPU seconds, peak RSS MB) of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        hwm = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmHWM"))
        return cpu, hwm / 1024
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def control_config(payload: str, compact_at_end: bool) -> dict:
    """The control plane's config: the stand-in at real payload sizes or the readers' small ones."""
    config = json.loads(json.dumps(CONFIG))
    if payload == "small":
        sizes = payload_sizes(10 * 100_000)
        config["steps"][0]["args"] = {k: sizes[k] for k in ("keyframe_bytes", "embedding_dims")}
    config["run"]["compact_at_end"] = compact_at_end
    return config


def run_control(n_sources: int, runner: str, kills: int, keep: Path | None, payload: str = "real",
                compact_at_end: bool = True) -> None:
    work = Path(tempfile.mkdtemp(prefix="control-", dir=keep or None))
    sources, out = work / "sources", work / "out"
    sources.mkdir()
    for i in range(n_sources):
        (sources / f"src{i:08d}.mp4").write_bytes(b"x")
    config = work / "config.yaml"
    config.write_text(json.dumps(control_config(payload, compact_at_end)))
    argv = curate("run", str(config), "--input", str(sources), "--output", str(out), "--runner", runner,
                  "--num-cpus", "2") + (["--object-store-mb", "200"] if runner == "ray" else [])
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    attempts, started = [], time.monotonic()
    units = math.ceil(n_sources / SOURCES_PER_UNIT)
    kill_at = [int(units * (k + 1) / (kills + 1)) for k in range(kills)]
    while True:
        log = open(work / "run.log", "ab")
        p = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
        last, t0, killed = None, time.monotonic(), False
        while p.poll() is None:
            last = proc_stat(p.pid) or last
            if kill_at and _committed(out) >= kill_at[0]:
                os.killpg(p.pid, signal.SIGKILL)
                kill_at.pop(0)
                killed = True
                break
            time.sleep(0.5)
        p.wait()
        attempts.append({"wall_s": time.monotonic() - t0, "driver_cpu_s": last[0] if last else None,
                         "driver_peak_mb": last[1] if last else None, "killed": killed, "rc": p.returncode})
        print(f"  attempt {len(attempts)}: {attempts[-1]}", flush=True)
        if not killed:
            break
    run = json.loads((out / "run.json").read_text())
    store = OutputStore(out)
    scores = pa.concat_tables([outdir.read_table(f, columns=["source_id", "clip_id"])
                               for f in store.committed_files("scores")])
    ids = scores.column("source_id")
    with_rows = pc.count_distinct(ids).as_py()
    print(f"sources {n_sources:,} ({runner}, {kills} kills): wall {time.monotonic() - started:.0f} s, "
          f"status {run['status']}, units {run['units']:,}, rows {len(ids):,}, "
          f"sources with rows {with_rows:,}")
    final = attempts[-1]
    cpu_total = sum(a["driver_cpu_s"] or 0 for a in attempts)
    print(f"driver CPU {cpu_total:.1f} s = {1000 * cpu_total / run['units']:.2f} ms a unit; driver peak RSS "
          f"{max(a['driver_peak_mb'] or 0 for a in attempts):.0f} MB; last attempt {final['wall_s']:.0f} s")
    for a in run["attempts"]:
        cpu = a.get("driver_cpu_s")
        if cpu and a.get("units"):
            print(f"  attempt of {a['units']:,} units: driver CPU planning {cpu['planning']:.1f} s, units "
                  f"{cpu['units']:.1f} s = {1000 * cpu['units'] / a['units']:.2f} ms a unit, end {cpu['end']:.1f} s")
    print_unit_costs(run)
    clip_ids = scores.column("clip_id")
    assert pc.count_distinct(clip_ids).as_py() == len(clip_ids), "a clip twice"
    assert with_rows == n_sources, "a source without rows"
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)


def print_unit_costs(run: dict) -> None:
    """Where a unit's time went, part by part (run.json's unit_seconds over its units), and the
    driver's own seconds a unit (each attempt's driver_seconds and scheduler_seconds)."""
    units = max(1, int(run.get("units", 0)))
    parts = run.get("unit_seconds") or {}
    print(f"a unit's time by part (ms, mean over {units:,} units; task_queued is waiting for a slot):")
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<14} {1000 * seconds / units:9.2f}")
    driver: dict[str, float] = {}
    for a in run.get("attempts", []):
        for key in ("driver_seconds", "scheduler_seconds"):
            for name, seconds in (a.get(key) or {}).items():
                driver[name] = driver.get(name, 0.0) + seconds
    print("the driver's seconds a unit (ms): " + ", ".join(
        f"{name} {1000 * seconds / units:.2f}" for name, seconds in sorted(driver.items(), key=lambda kv: -kv[1])))


# ---- the Ray runner's fixed costs ----------------------------------------------------------------

def cpu_jiffies() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def run_runners(n_sources: int, config: Path, keep: Path | None, runners: list[str]) -> None:
    """The same pipeline over `n_sources` web-like generated sources (bench/web_footage.py) with
    each runner on 2 CPUs, start-up included: wall, cores busy, clips; run.json's per-unit
    figures on Ray (unit wall, waits on model actors) and the driver's CPU."""
    sys.path.insert(0, str(REPO / "bench"))
    from web_footage import make_footage

    work = Path(tempfile.mkdtemp(prefix="runners-", dir=keep or None))
    footage = (keep / "footage") if keep else work / "footage"  # with --keep-dir, made once and reused
    started = time.monotonic()
    make_footage(footage, n_sources)
    print(f"{n_sources} web-like sources in {footage} ({time.monotonic() - started:.0f}s)", flush=True)
    results = {}
    for runner in runners:
        out = work / f"out-{runner}"
        argv = curate("run", str(config), "--input", str(footage), "--output", str(out), "--runner", runner,
                      "--num-cpus", "2", "--skip-unavailable-models", "--overwrite")
        busy0, total0 = cpu_jiffies()
        t0 = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        wall = time.monotonic() - t0
        busy1, total1 = cpu_jiffies()
        cores = (busy1 - busy0) / max(1.0, total1 - total0) * (os.cpu_count() or 1)
        if done.returncode:
            print(f"  {runner}: FAILED {done.stderr[-2000:]}")
            continue
        run = json.loads((out / "run.json").read_text())
        attempt = run["attempts"][-1]
        results[runner] = wall
        print(f"  {runner:<6} wall {wall:6.1f} s  cores busy {cores:.2f} of {os.cpu_count()}  clips {run['clips']}  "
              f"kept {run['kept']}  driver CPU {attempt.get('driver_cpu_s')}", flush=True)
        if runner == "ray":
            units = OutputStore(out).ledger().units
            print(f"    units {units.num_rows}; pools {json.dumps(attempt.get('model_pools', {}))}")
        print_unit_costs(run)
    if len(results) == 2:
        print(f"ray / local wall: {results['ray'] / results['local']:.2f}")
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)


def _committed(out: Path) -> int:
    try:
        ledger = OutputStore(out).ledger()
        return ledger.unit_count()
    except (OSError, ValueError):
        return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("readers")
    r.add_argument("--rows", type=int, action="append", default=[])
    r.add_argument("--only", default="", help="comma list of command names' first words ('fabricate': none)")
    r.add_argument("--keep-dir", type=Path, default=None, help="keep the outputs under this folder (KEEP/scaleROWS);"
                                                                " a later run with it reuses them")
    r.add_argument("--store", choices=["local", "s3"], default="local",
                   help="s3: OUT_DIR uploaded to a local S3 endpoint (moto, started here) and read there")
    c = sub.add_parser("control")
    c.add_argument("--sources", type=int, default=100_000)
    c.add_argument("--runner", choices=["ray", "local"], default="ray")
    c.add_argument("--kills", type=int, default=0)
    c.add_argument("--keep-dir", type=Path, default=None)
    c.add_argument("--payload", choices=["real", "small"], default="real",
                   help="small: 1 kB keyframes and 64-dim embeddings (the readers' sizes above 10^5 rows)")
    c.add_argument("--no-compact-at-end", dest="compact_at_end", action="store_false",
                   help="leave the per-unit files (compact_at_end: false)")
    rr = sub.add_parser("runners", help="the Ray runner against --runner local on web-like sources")
    rr.add_argument("--sources", type=int, default=100)
    rr.add_argument("--config", type=Path, default=REPO / "pipeline.yaml")
    rr.add_argument("--runner", action="append", default=[], choices=["ray", "local"])
    rr.add_argument("--keep-dir", type=Path, default=None)
    args = p.parse_args()
    if args.what == "runners":
        run_runners(args.sources, args.config, args.keep_dir, args.runner or ["local", "ray"])
        return
    if args.what == "readers":
        run_readers(args.rows or [100_000], set(filter(None, args.only.split(","))) or None, args.keep_dir,
                    args.store)
    else:
        run_control(args.sources, args.runner, args.kills, args.keep_dir, args.payload, args.compact_at_end)


if __name__ == "__main__":
    main()
