"""Training throughput of the built-in trainer against the device's measured matmul peak.

    python bench/train_bench.py [--stage image|video|hq] [--preset-size tiny|small|base|large]
                                [--steps 20] [--threads N] [--data-workers K] [--device cpu|cuda]
                                [--workers N] [--set key=value ...]

Prints, for the stage's preset on synthetic shards (written with the shards schema):
- samples/s of the training step (data wait included), after a few warm-up steps;
- FLOP per step of forward + backward, counted by torch.utils.flop_counter.FlopCounterMode on
  PyTorch's meta device (shapes only: the same count for any device, in seconds even for the
  1.6B model), and the achieved FLOP/s = FLOP per step / median step time;
- the device's measured matmul peak in the precision the run computes in (bf16 when autocast is
  on, as on CUDA by default; float32 otherwise) and the achieved share of it;
- peak memory (CUDA: the allocator's peak; CPU: the process's peak RSS);
- the time each step waited for data (mean and share of the step).
With --workers N it also trains the same steps on N Ray Train workers and prints both timings.

The GPU presets (base, large) train in latent space. Without --set latent_autoencoder=PATH the
bench runs their U-Net at the latent shape (14 x 32 x 48 for video) on pixels standing in for
latents (3 channels instead of 4): the model's work is the same to within the first convolution,
and no autoencoder is needed.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import curation  # noqa: E402,F401  (torchvision shim first)
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from training import diffusion  # noqa: E402
from training.config import LATENT_SIZES, SIZES, apply_overrides, preset  # noqa: E402
from training.data import shard_paths  # noqa: E402
from training.loop import model_from_config, train, uses_bf16  # noqa: E402
from training.synthetic import write_synthetic_shards  # noqa: E402


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Best-of n x n matmul FLOP/s in `dtype` (2 n^3 per product)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
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
    """FLOP of one training step's forward + backward (optimizer and EMA excluded: they are
    O(params)), counted on the meta device."""
    h, w = cfg.resolution_px, cfg.frame_width
    shape = (cfg.batch_size, in_channels, cfg.num_frames, h, w) if cfg.is_video else (cfg.batch_size, in_channels, h, w)
    with torch.device("meta"):
        model = model_from_config(cfg, in_channels)
        x, noise = torch.empty(shape), torch.empty(shape)
        with FlopCounterMode(display=False) as counter:
            loss = diffusion.edm_loss(model, x, torch.ones(cfg.batch_size), noise, cfg.sigma_data,
                                      caption=torch.empty(cfg.batch_size, cfg.caption_dim)).mean()
            loss.backward()
    return counter.get_total_flops()


def timed_steps(rows: list[dict], skip: int) -> list[dict]:
    kept = rows[skip:]
    if not kept:
        raise SystemExit(f"no step left to time: --steps must exceed --skip-steps ({skip})")
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["image", "video", "hq"], default="image")
    parser.add_argument("--preset-size", choices=list(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-steps", type=int, default=3, help="warm-up steps left out of the timing")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--data-workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="also time the same steps on N Ray Train workers")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    cfg = apply_overrides(preset(args.stage, args.preset_size),
                          [f"total_steps={args.steps}", f"data_workers={args.data_workers}",
                           f"device={args.device}", "init_from=none", "log_every_steps=1000",
                           "checkpoint_every_steps=100000", "caption_dim=512", *args.overrides])
    stand_in = args.preset_size in LATENT_SIZES and not cfg.latent_autoencoder
    if stand_in:  # the U-Net at the latent shape, on pixels (see the module docstring)
        cfg = replace(cfg, resolution_px=cfg.resolution_px // 8, width_px=cfg.frame_width // 8)
    dtype = torch.bfloat16 if uses_bf16(cfg, device) else torch.float32
    flop = step_flops(cfg)
    peak = matmul_flops_per_s(device, dtype, 8192 if device.type == "cuda" else 2048)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    with tempfile.TemporaryDirectory() as tmp:
        # Clips a bit larger than the training size, so decode + resize + crop are all exercised.
        write_synthetic_shards(tmp, num_clips=16, num_frames=max(24, 2 * cfg.num_frames * cfg.frame_stride),
                               size_px=max(cfg.resolution_px, cfg.frame_width) * 3 // 2, caption_dim=512)
        paths = shard_paths(tmp)
        t0 = time.perf_counter()
        result = train(cfg, paths, os.path.join(tmp, "run"))
        wall = time.perf_counter() - t0
        with open(os.path.join(tmp, "run", "metrics.csv")) as f:
            rows = timed_steps(list(csv.DictReader(f)), args.skip_steps)
        distributed = None
        if args.workers > 1:
            from training.ray_train import train_distributed

            t1 = time.perf_counter()
            report = train_distributed(cfg, paths, os.path.join(tmp, "ray"), args.workers,
                                       use_gpu=device.type == "cuda", cpus_per_worker=max(1, args.threads or 1))
            distributed = (time.perf_counter() - t1, report["step_s"] / max(1, len(report["losses"])))
    peak_mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    step_s = sum(float(r["step_s"]) for r in rows) / len(rows)
    median_step_s = sorted(float(r["step_s"]) for r in rows)[len(rows) // 2]
    wait_s = sum(float(r["data_wait_s"]) for r in rows) / len(rows)
    params = sum(p.numel() for p in result.model.parameters())
    print(f"device: {device} threads: {torch.get_num_threads()} data workers: {args.data_workers}")
    print(f"config: {args.stage} / {args.preset_size}: {params / 1e6:.1f}M parameters, batch {cfg.batch_size}, "
          f"{cfg.num_frames} frame(s) of {cfg.resolution_px}x{cfg.frame_width}"
          f"{' (the latent shape; pixels standing in for latents)' if stand_in else ''}, "
          f"checkpointing {cfg.activation_checkpointing}, compile {cfg.compile}, optimizer {cfg.optimizer_impl}, "
          f"precision {'bf16 autocast' if dtype == torch.bfloat16 else 'float32'}")
    print(f"steps timed: {len(rows)} (after {args.skip_steps} warm-up), wall {wall:.1f}s for {args.steps} steps")
    print(f"samples/s: {cfg.batch_size / median_step_s:.2f} (median step {median_step_s * 1e3:.1f} ms; "
          f"mean {step_s * 1e3:.1f} ms counts steps slowed by other processes)")
    print(f"FLOP/step (fwd+bwd, counted on the meta device): {flop / 1e12:.4f} TFLOP")
    print(f"achieved: {flop / median_step_s / 1e12:.3f} TFLOP/s = {100 * flop / median_step_s / peak:.1f}% of the "
          f"measured {str(dtype).split('.')[-1]} matmul peak {peak / 1e12:.2f} TFLOP/s")
    print(f"peak memory: {peak_mem / 2**30:.2f} GiB ({'CUDA allocator' if device.type == 'cuda' else 'process RSS'})")
    print(f"data wait per step: {wait_s * 1e3:.1f} ms ({100 * wait_s / step_s:.1f}% of the step)")
    if distributed is not None:
        print(f"{args.workers} workers (Ray Train): wall {distributed[0]:.1f}s for {args.steps} steps "
              f"(1 worker in this process: {wall:.1f}s); mean step {distributed[1] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
