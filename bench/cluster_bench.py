"""Cluster-use benchmark: is every core busy, does a second CPU pay, does the driver stay small?

    python bench/cluster_bench.py [--sources 12] [--config pipeline.yaml] [--work bench_out/cluster]

1. The default pipeline (`--skip-unavailable-models`: split, motion, the real easyocr, the
   filters) on generated 360p-720p footage, on the embedded cluster with --num-cpus 2 and
   then 1. Prints the cores kept busy (sampled from /proc/stat, over the whole run and over
   the processing phase, from the first unit submitted to the end) and clips/s, and the
   ratio of the two runs' clips/s, and each model actor's RSS over its life (flat after the load?).
2. The spine (configs/spine.yaml) over 50 and then 500 small generated sources: the
   driver's peak RSS (VmHWM) for both, and the throughput.

Run by hand (minutes), not in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from soak_bench import cpu_times, ordinary  # noqa: E402  (bench/ is on sys.path)

from curation import synth  # noqa: E402
from curation.reaper import descendants  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class RoleCPU:
    """CPU seconds of a process tree, by role: the Ray task or actor method a process runs
    (its title, e.g. ray::unit_task, ray::StageActor.run), the driver, Ray's own daemons."""

    def __init__(self, root: int):
        self.root = root
        self.last: dict[int, float] = {}
        self.by_role: dict[str, float] = {}
        self.actor_rss: dict[int, list[float]] = {}  # model actor pid -> its RSS (MB) at each sample

    def sample(self) -> None:
        for pid in [self.root, *descendants(self.root)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
            role = "driver" if pid == self.root else title.split()[0] if title.startswith("ray::") \
                else Path(title.split()[0]).name if title else "?"
            self.by_role[role] = self.by_role.get(role, 0.0) + cpu - self.last.get(pid, 0.0)
            self.last[pid] = cpu
            if role.startswith("ray::StageActor"):
                self.actor_rss.setdefault(pid, []).append(int(fields[21]) * PAGE_BYTES / 2**20)  # rss pages

    def total(self) -> float:
        return sum(self.by_role.values())

    def actor_memory(self) -> str:
        """Each model actor's RSS at a quarter, half, three quarters and the end of its life, and its peak:
        flat when the figures level off after the model's load."""
        rows = []
        for pid, rss in sorted(self.actor_rss.items()):
            at = [rss[min(len(rss) - 1, len(rss) * k // 4)] for k in (1, 2, 3)] + [rss[-1]]
            rows.append(f"pid {pid}: {' / '.join(f'{v:.0f}' for v in at)} MB (peak {max(rss):.0f} MB)")
        return "; ".join(rows) or "no model actors"

    def table(self, wall_s: float) -> str:
        rows = sorted(self.by_role.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{role} {sec:.0f}s ({sec / max(wall_s, 1e-9):.2f} cores)" for role, sec in rows if sec >= 1)


def footage(root: Path, n: int, sizes: list[tuple[int, int]], seed: int) -> list[Path]:
    if root.is_dir() and len(list(root.glob("*.mp4"))) == n:
        return sorted(root.glob("*.mp4"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(n):
        ordinary(root / f"src_{i:04d}.mp4", rng, size=sizes[i % len(sizes)])
    return sorted(root.glob("*.mp4"))


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(config: str, inputs: Path, out: Path, num_cpus: int, log_path: Path, pin: bool = False) -> dict:
    """One `curate run`, watched: CPU over the run and the processing phase, driver peak RSS.
    With `pin`, the run (Ray's processes included) is confined to its first num_cpus cores."""
    shutil.rmtree(out, ignore_errors=True)
    pinned = ["taskset", "-c", ",".join(str(c) for c in range(num_cpus))] if pin else []
    cmd = [*pinned, sys.executable, "-m", "curation.cli", "run", config, "--input", str(inputs), "--output", str(out),
           "--skip-unavailable-models", "--num-cpus", str(num_cpus)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    t_start, (b_start, tot_start) = time.monotonic(), cpu_times()
    phase = None  # (time, cpu) when the first unit was submitted
    hwm = 0.0
    tree_at_phase = 0.0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        roles = RoleCPU(proc.pid)
        while proc.poll() is None:
            hwm = max(hwm, vm_hwm_mb(proc.pid) or 0.0)
            roles.sample()
            if phase is None and "running " in log_path.read_text():
                phase = (time.monotonic(), cpu_times())
                tree_at_phase = roles.total()
            time.sleep(0.25)
    t_end, (b_end, tot_end) = time.monotonic(), cpu_times()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}; see {log_path}")
    cores = os.cpu_count() or 1
    record = json.loads((out / "run.json").read_text())
    t_phase, (b_phase, tot_phase) = phase or (t_start, (b_start, tot_start))
    return {
        "num_cpus": num_cpus, "clips": record["clips"], "sources": record["sources"]["total"],
        "wall_s": t_end - t_start, "processing_s": t_end - t_phase,
        "busy_cores_run": cores * (b_end - b_start) / max(tot_end - tot_start, 1.0),
        "busy_cores_processing": cores * (b_end - b_phase) / max(tot_end - tot_phase, 1.0),
        "clips_per_s": record["clips"] / max(t_end - t_phase, 1e-9),
        "driver_peak_rss_mb": hwm,
        "cpu_by_role": roles.table(t_end - t_phase),
        "model_actor_rss": roles.actor_memory(),
        # The run's own processes only (other load on the machine left out).
        "busy_cores_run_tree": (roles.total() - tree_at_phase) / max(t_end - t_phase, 1e-9),
        "model_sent_bytes_per_clip": record.get("model_sent_bytes_per_clip", {}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", type=int, default=12)
    p.add_argument("--config", default=str(REPO / "pipeline.yaml"))
    p.add_argument("--work", default=str(REPO / "bench_out" / "cluster"))
    p.add_argument("--skip-driver-memory", action="store_true")
    p.add_argument("--cpus", default="2,1", help="the --num-cpus of the default-pipeline runs (\"\" for none)")
    p.add_argument("--pin", action="store_true",
                   help="also confine each run to that many cores (taskset): --num-cpus only limits Ray's "
                        "scheduling, and on a 2-core machine a 1-CPU run still spreads over both cores")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mixed = footage(work / "mixed", args.sources, [(640, 360), (960, 540), (1280, 720)], seed=1)
    print(f"footage: {len(mixed)} sources, 360p to 720p", flush=True)
    results = {}
    for cpus in [int(c) for c in args.cpus.split(",") if c]:
        r = run(args.config, work / "mixed", work / f"out-{cpus}cpu", cpus, work / f"run-{cpus}cpu.log",
                pin=args.pin and cpus < (os.cpu_count() or 1))
        results[f"{cpus}cpu"] = r
        print(f"--num-cpus {cpus}: {r['clips']} clips, wall {r['wall_s']:.0f}s (processing {r['processing_s']:.0f}s), "
              f"cores busy {r['busy_cores_run']:.2f} over the run, {r['busy_cores_processing']:.2f} while "
              f"processing ({r['busy_cores_run_tree']:.2f} by the run's own processes), "
              f"{r['clips_per_s']:.3f} clips/s", flush=True)
        print(f"  CPU by role over the processing phase: {r['cpu_by_role']}", flush=True)
        print(f"  model actors' RSS: {r['model_actor_rss']}", flush=True)
        sent = ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in r["model_sent_bytes_per_clip"].items())
        print(f"  object-store bytes per clip after motion (rows sent to model actors): {sent or '-'}", flush=True)
    if "2cpu" in results and "1cpu" in results:
        ratio = results["2cpu"]["clips_per_s"] / results["1cpu"]["clips_per_s"]
        results["clips_per_s_ratio_2_over_1"] = ratio
        print(f"clips/s with 2 CPUs / with 1: {ratio:.2f}x", flush=True)

    if not args.skip_driver_memory:
        spine = str(REPO / "configs" / "spine.yaml")
        for n in (50, 500):
            small = footage(work / f"small{n}", n, [(160, 90)], seed=2)
            r = run(spine, work / f"small{n}", work / f"out-small{n}", 2, work / f"run-small{n}.log")
            results[f"spine_{n}"] = r
            print(f"spine, {len(small)} small sources: driver peak RSS {r['driver_peak_rss_mb']:.0f} MB, "
                  f"{r['sources'] / r['processing_s']:.2f} sources/s, {r['clips_per_s']:.2f} clips/s", flush=True)
        a, b = results["spine_50"]["driver_peak_rss_mb"], results["spine_500"]["driver_peak_rss_mb"]
        print(f"driver peak RSS 500 / 50 sources: {b / a:.2f}x", flush=True)
    (work / "cluster.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
