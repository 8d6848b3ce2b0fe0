"""The streaming trainer at two corpus sizes: memory must not grow with the corpus, data must not stall the step.

    python bench/train_stream_bench.py [--clips 5000 50000] [--steps 200] [--stage image|video]
                                       [--data-workers 1] [--size-px 64] [--frames 12]

For each size it writes a shard set in a child process (curation's layout: ledger, run.json,
row groups of 64 rows, 500 clips per unit; `distinct` clips encoded once and repeated under
distinct ids, so generating 50k clips takes seconds), then trains the tiny preset of the stage
for --steps steps in a fresh child process and prints:
- peak RSS of the training process (VmHWM) and of its largest DataLoader worker (RUSAGE_CHILDREN);
- samples/s over the steps after a few warm-up steps (data wait included);
- the data-wait share of the step (time blocked on the loader / step time).
It ends with the ratio of the peak RSS of the largest corpus to the smallest (target: within 20%).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def generate(out_dir: str, num_clips: int, size_px: int, frames: int) -> None:
    from training.synthetic import synthetic_corpus, write_units

    parts = synthetic_corpus(num_clips, clips_per_unit=500, distinct_clips=64, num_frames=frames,
                             size_px=size_px, caption_dim=512)
    write_units(out_dir, parts, row_group_rows=64)


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def train_child(out_dir: str, stage: str, steps: int, data_workers: int, skip: int) -> dict:
    import curation  # noqa: F401  (torchvision shim first)
    import torch

    from training.config import apply_overrides, preset
    from training.data import shard_paths
    from training.loop import train

    torch.set_num_threads(1)
    cfg = apply_overrides(preset(stage, "tiny"), [f"total_steps={steps}", f"data_workers={data_workers}",
                                                  "init_from=none", "device=cpu", "log_every_steps=100000",
                                                  "checkpoint_every_steps=100000"])
    run_dir = os.path.join(out_dir, "train", stage)
    t0 = time.perf_counter()
    paths = shard_paths(out_dir)
    train(cfg, paths, run_dir)
    wall_s = time.perf_counter() - t0
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))[skip:]
    step_s = sum(float(r["step_s"]) for r in rows)
    wait_s = sum(float(r["data_wait_s"]) for r in rows)
    return {"files": len(paths), "shard_mb": sum(os.path.getsize(p) for p in paths) / 2 ** 20,
            "wall_s": wall_s, "samples_per_s": cfg.batch_size * len(rows) / step_s,
            "data_wait_share": wait_s / step_s, "rss_mb": vm_hwm_mb(),
            "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "batch": cfg.batch_size, "resolution_px": cfg.resolution_px, "num_frames": cfg.num_frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip-steps", type=int, default=5, help="warm-up steps left out of the rates")
    parser.add_argument("--stage", choices=["image", "video"], default="image")
    parser.add_argument("--data-workers", type=int, default=1)
    parser.add_argument("--size-px", type=int, default=64)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, out_dir = args.child
        if mode == "generate":
            generate(out_dir, args.n, args.size_px, args.frames)
        else:
            print(json.dumps(train_child(out_dir, args.stage, args.steps, args.data_workers, args.skip_steps)))
        return

    results = {}
    common = [f"--stage={args.stage}", f"--steps={args.steps}", f"--data-workers={args.data_workers}",
              f"--size-px={args.size_px}", f"--frames={args.frames}", f"--skip-steps={args.skip_steps}"]
    for n in args.clips:
        with tempfile.TemporaryDirectory(prefix="stream-bench") as tmp:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child", "generate", tmp, f"--n={n}", *common], check=True)
            gen_s = time.perf_counter() - t0
            out = subprocess.run([sys.executable, __file__, "--child", "train", tmp, *common], check=True,
                                 capture_output=True, text=True).stdout
            r = results[n] = json.loads(out.strip().splitlines()[-1])
        print(f"{n:>7} clips ({r['files']} files, {r['shard_mb']:.0f} MB, generated in {gen_s:.0f}s): "
              f"{args.stage} tiny, batch {r['batch']} of {r['resolution_px']} px, {args.steps} steps in "
              f"{r['wall_s']:.1f}s | peak RSS {r['rss_mb']:.0f} MB (loader worker {r['worker_rss_mb']:.0f} MB) | "
              f"{r['samples_per_s']:.1f} samples/s | data wait {100 * r['data_wait_share']:.1f}% of the step",
              flush=True)
    if len(results) > 1:
        small, large = results[min(results)], results[max(results)]
        print(f"peak RSS {max(results)} vs {min(results)} clips: x{large['rss_mb'] / small['rss_mb']:.3f} "
              f"(training process), x{large['worker_rss_mb'] / small['worker_rss_mb']:.3f} (loader worker)")


if __name__ == "__main__":
    main()
