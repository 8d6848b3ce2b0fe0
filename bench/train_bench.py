"""Training throughput of the built-in trainer next to the machine's matmul FLOP/s.

    python bench/train_bench.py [--stage image|video] [--preset-size small|tiny] [--steps 20]
                                [--threads N] [--data-workers K] [--device cpu|cuda]

Prints, for the stage's preset on synthetic shards (written with the shards schema):
- samples/s of the training step (data wait included), after a few warm-up steps;
- FLOP per step of forward + backward, counted by torch.utils.flop_counter.FlopCounterMode
  (matmuls, convolutions, attention), and the achieved FLOP/s = FLOP per step / step time;
- measured fp32 matmul FLOP/s of the same device and thread count, and the ratio;
- the time each step waited for data (mean and share of the step).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import curation  # noqa: E402,F401  (torchvision shim first)
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from training import diffusion  # noqa: E402
from training.config import apply_overrides, preset  # noqa: E402
from training.data import shard_paths  # noqa: E402
from training.loop import model_from_config, train  # noqa: E402
from training.synthetic import write_synthetic_shards  # noqa: E402


def matmul_flops_per_s(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Best-of fp32 n x n matmul FLOP/s (2 n^3 per product)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def step_flops(cfg, in_channels: int = 3) -> int:
    """FLOP of one training step's forward + backward (optimizer and EMA excluded: they are O(params))."""
    torch.manual_seed(0)
    model = model_from_config(cfg, in_channels)
    s = cfg.resolution_px
    shape = (cfg.batch_size, in_channels, cfg.num_frames, s, s) if cfg.is_video else (cfg.batch_size, in_channels, s, s)
    x, noise = torch.randn(shape), torch.randn(shape)
    sigma = torch.ones(cfg.batch_size)
    with FlopCounterMode(display=False) as counter:
        loss = diffusion.edm_loss(model, x, sigma, noise, cfg.sigma_data,
                                  caption=torch.randn(cfg.batch_size, cfg.caption_dim)).mean()
        loss.backward()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["image", "video"], default="image")
    parser.add_argument("--preset-size", choices=["small", "tiny"], default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-steps", type=int, default=3, help="warm-up steps left out of the timing")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--data-workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        # Clips a bit larger than the training size, so decode + resize + crop are all exercised.
        cfg = apply_overrides(preset(args.stage, args.preset_size),
                              [f"total_steps={args.steps}", f"data_workers={args.data_workers}",
                               f"device={args.device}", "init_from=none", "log_every_steps=1000",
                               "checkpoint_every_steps=100000", *args.overrides])
        write_synthetic_shards(tmp, num_clips=16, num_frames=max(24, 2 * cfg.num_frames * cfg.frame_stride),
                               size_px=cfg.resolution_px * 3 // 2, caption_dim=512)
        paths = shard_paths(tmp)
        cfg = apply_overrides(cfg, ["caption_dim=512"])
        flop = step_flops(cfg)
        peak = matmul_flops_per_s(device)
        t0 = time.perf_counter()
        train(cfg, paths, os.path.join(tmp, "run"))
        wall = time.perf_counter() - t0
        with open(os.path.join(tmp, "run", "metrics.csv")) as f:
            rows = list(csv.DictReader(f))[args.skip_steps:]

    step_s = sum(float(r["step_s"]) for r in rows) / len(rows)
    median_step_s = sorted(float(r["step_s"]) for r in rows)[len(rows) // 2]
    wait_s = sum(float(r["data_wait_s"]) for r in rows) / len(rows)
    achieved = flop / step_s
    print(f"device: {device} threads: {torch.get_num_threads()} data workers: {args.data_workers}")
    print(f"config: {args.stage} / {args.preset_size}: batch {cfg.batch_size}, {cfg.num_frames} frame(s) of "
          f"{cfg.resolution_px}px, model_channels {cfg.model_channels}, channel_mult {cfg.channel_mult}")
    print(f"steps timed: {len(rows)} (after {args.skip_steps} warm-up), wall {wall:.1f}s for {args.steps} steps")
    print(f"samples/s: {cfg.batch_size / step_s:.2f}   step: {step_s * 1e3:.1f} ms")
    print(f"FLOP/step (fwd+bwd): {flop / 1e9:.3f} GFLOP   achieved: {achieved / 1e9:.2f} GFLOP/s")
    print(f"median step: {median_step_s * 1e3:.1f} ms -> {flop / median_step_s / 1e9:.2f} GFLOP/s "
          f"({100 * flop / median_step_s / peak:.1f}% of matmul; the mean counts steps slowed by other processes)")
    print(f"matmul fp32 2048^2: {peak / 1e9:.2f} GFLOP/s   achieved / matmul: {100 * achieved / peak:.1f}%")
    print(f"data wait per step: {wait_s * 1e3:.1f} ms ({100 * wait_s / step_s:.1f}% of the step)")


if __name__ == "__main__":
    main()
