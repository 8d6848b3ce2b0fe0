"""The training loop of one stage: data -> EDM loss -> AdamW step -> EMA -> metrics and checkpoints.

Writes into run_dir (OUT_DIR/train/<stage>/):
    checkpoint-<step>.pt  {"model", "ema", "optimizer": state dicts, "config": resolved config,
                           "step", "rng": torch RNG states, "in_channels", "format"} (no pickled modules)
    metrics.csv           one row per step: step, loss, lr, grad_norm, sigma_median, step_s, data_wait_s
    loss.png              loss per step (and its running mean)
    tensorboard/          the same scalars, when a TensorBoard writer is installed

Exact resume: the batch of step s is a function of (seed, s) (data.StepBatchSampler), the noise
levels, noise and caption dropout of step s come from a generator seeded with (seed, s, rank),
and the checkpoint restores weights, EMA, optimizer moments and the global torch RNG, so a run
resumed from step k computes the same losses as the uninterrupted run from step k on.

Runs in one process, or as one DDP rank when torch.distributed is initialised (ray_train.py).
"""

from __future__ import annotations

import copy
import csv
import glob
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, replace

import pyarrow as pa
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from training import diffusion
from training.config import MODEL_FIELDS, TrainConfig, from_dict, to_dict
from training.data import (LatentCache, ShardDataset, StepBatchSampler, apply_select, autoencoder_factor,
                           caption_dim_of, load_autoencoder)
from training.model import VideoUNet, extend_to_video

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
KEEP_CHECKPOINTS = 3


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (this process's steps)
    last_checkpoint: str | None = None
    resumed_from_step: int = 0
    data_wait_s: float = 0.0
    step_s: float = 0.0  # total time of the steps (data wait included)
    samples: int = 0
    model: torch.nn.Module | None = None  # the trained (unwrapped) network of this process
    ema: torch.nn.Module | None = None


# ---- checkpoints ------------------------------------------------------------------------

def checkpoint_paths(run_dir: str) -> list[str]:
    """Checkpoints in run_dir, oldest first."""
    paths = glob.glob(os.path.join(run_dir, "checkpoint-*.pt"))
    return sorted(paths, key=lambda p: int(re.findall(r"checkpoint-(\d+)\.pt$", p)[0]))


def latest_checkpoint(run_dir: str) -> str | None:
    paths = checkpoint_paths(run_dir)
    return paths[-1] if paths else None


def load_checkpoint(path: str) -> dict:
    """A checkpoint dict; only tensors and plain values are stored, so weights_only loading works."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_config(cfg: TrainConfig, in_channels: int) -> VideoUNet:
    """The network a resolved config describes (temporal layers in the video stages)."""
    return VideoUNet(in_channels=in_channels, model_channels=cfg.model_channels,
                     channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
                     attention_levels=tuple(cfg.attention_levels), num_heads=cfg.num_heads,
                     caption_dim=cfg.caption_dim, context_tokens=cfg.context_tokens,
                     context_dim=cfg.context_dim, temporal=cfg.is_video, dropout=cfg.dropout)


def _save_checkpoint(run_dir: str, state: dict) -> str:
    path = os.path.join(run_dir, f"checkpoint-{state['step']:07d}.pt")
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written checkpoint
    for old in checkpoint_paths(run_dir)[:-KEEP_CHECKPOINTS]:
        os.remove(old)
    return path


# ---- helpers ----------------------------------------------------------------------------

def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on GPUs that support it; full precision on CPU (CPU bf16 is often slower)."""
    use = cfg.mixed_precision == "bf16" or (
        cfg.mixed_precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + rank)


def _open_tensorboard(run_dir: str):
    for module in ("torch.utils.tensorboard", "tensorboardX"):
        try:
            writer_cls = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
            return writer_cls(os.path.join(run_dir, "tensorboard"))
        except ImportError:
            continue
    return None


METRIC_FIELDS = ["step", "loss", "lr", "grad_norm", "sigma_median", "step_s", "data_wait_s"]


def _open_metrics(run_dir: str, resume_step: int):
    """metrics.csv opened for appending; rows of steps >= resume_step (lost work) are dropped first."""
    path = os.path.join(run_dir, "metrics.csv")
    rows = []
    if resume_step > 0 and os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) < resume_step]
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return f, writer


def plot_losses(metrics_csv: str, out_png: str, title: str) -> None:
    """Loss per step and its running mean over 20 steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    mean = [sum(losses[max(0, i - 19):i + 1]) / len(losses[max(0, i - 19):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.7, alpha=0.5, label="loss")
    ax.plot(steps, mean, lw=1.5, label="running mean (20 steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted EDM loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _check_same_model(prev: TrainConfig, cfg: TrainConfig) -> None:
    diff = {k: (getattr(prev, k), getattr(cfg, k)) for k in MODEL_FIELDS
            if k != "caption_dim" and _norm(getattr(prev, k)) != _norm(getattr(cfg, k))}
    if diff:
        raise ValueError(f"the {cfg.stage} stage's model differs from its init checkpoint's "
                         f"({prev.stage}): {diff}; use the same size preset / --set values for all stages")


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


# ---- the loop ---------------------------------------------------------------------------

def train(cfg: TrainConfig, table: pa.Table, run_dir: str, init_checkpoint: str | None = None,
          stop_after_step: int | None = None) -> TrainResult:
    """Train one stage on the rows of `table` (shard columns); resumes from run_dir if it has a checkpoint.

    init_checkpoint: the previous stage's checkpoint to start from (ignored when resuming).
    stop_after_step: stop (without a final checkpoint) once this many steps are done, as a kill would.
    """
    # Distributed set-up: one process per rank; rank 0 writes files.
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = resolve_device(cfg)
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (the EMA copies them too)

    # Data: the stage's rows, the caption dimension, and (latent mode) the cached latents.
    table = apply_select(table, cfg.select)
    data_caption_dim = caption_dim_of(table)
    if cfg.caption_dim == 0:
        if data_caption_dim == 0:
            log.warning("no caption_embedding in the shards: the model trains unconditionally")
        cfg = replace(cfg, caption_dim=max(1, data_caption_dim))
    elif data_caption_dim not in (0, cfg.caption_dim):
        raise ValueError(f"caption_dim={cfg.caption_dim} but the shards' caption_embedding has {data_caption_dim}")

    # Model: resume this stage, or start from the previous stage's checkpoint, or from scratch.
    resume_path = latest_checkpoint(run_dir)
    resume = load_checkpoint(resume_path) if resume_path else None
    init = None if resume or not init_checkpoint else load_checkpoint(init_checkpoint)
    if resume is not None:
        saved = from_dict(resume["config"])
        _check_same_model(saved, cfg)
        cfg = replace(cfg, caption_dim=saved.caption_dim)
    if init is not None:
        prev = from_dict(init["config"])
        _check_same_model(prev, cfg)
        if prev.caption_dim != cfg.caption_dim:
            raise ValueError(f"caption_dim {cfg.caption_dim} differs from the init checkpoint's {prev.caption_dim}")

    dataset = ShardDataset(table, cfg, cfg.caption_dim)
    in_channels = 3
    if cfg.latent_autoencoder:
        vae = load_autoencoder(cfg.latent_autoencoder)
        if cfg.resolution_px % (autoencoder_factor(vae) * 2 ** (len(cfg.channel_mult) - 1)):
            raise ValueError("resolution_px must be divisible by the autoencoder's and the U-Net's downsampling")
        in_channels = int(vae.config.latent_channels)
        cache_dir = cfg.latent_cache_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)), "latent_cache")
        dataset.latents = LatentCache.build(dataset, table.column("clip_id").to_pylist(), cfg, cache_dir, vae)
        del vae

    model = model_from_config(cfg, in_channels)
    if init is not None:
        state = init["ema"]  # a stage starts from the previous stage's EMA weights
        if cfg.is_video and not from_dict(init["config"]).is_video:
            extend_to_video(state, model)
        else:
            model.load_state_dict(state)
        log.info("%s stage starts from %s (step %d)", cfg.stage, init_checkpoint, init["step"])
    model.to(device)
    torch.manual_seed(cfg.seed + rank)  # dropout differs between ranks, as separate data does
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    start_step = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"]["torch"])
        if device.type == "cuda" and resume["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resume["rng"]["cuda"])
        start_step = int(resume["step"])
        log.info("resuming %s from %s (step %d)", cfg.stage, resume_path, start_step)

    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.total_steps, cfg.seed,
                               start_step=start_step, rank=rank, world_size=world)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data_workers,
                        prefetch_factor=4 if cfg.data_workers else None,
                        persistent_workers=False)
    metrics_file = writer = tb = None
    if rank == 0:
        metrics_file, writer = _open_metrics(run_dir, start_step)
        tb = _open_tensorboard(run_dir)
    result = TrainResult(resumed_from_step=start_step, model=model, ema=ema)
    decay = diffusion.ema_decay(cfg.ema_halflife_steps)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s stage: %d rows, %d parameters, %d steps of batch %d on %s x%d",
             cfg.stage, len(dataset), n_params, cfg.total_steps, cfg.batch_size, device, world)

    def checkpoint(step: int) -> str:
        return _save_checkpoint(run_dir, {
            "format": CHECKPOINT_FORMAT, "step": step, "config": to_dict(cfg), "in_channels": in_channels,
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
        })

    step = start_step
    t_prev = time.perf_counter()
    try:
        for batch in loader:
            # Wait for data (the time a step spends blocked on decoding).
            t_data = time.perf_counter()
            data_wait_s = t_data - t_prev
            x = batch["x"].to(device, non_blocking=True)
            b = x.shape[0]

            # Noise levels, noise and caption dropout of this step (seeded by step: exact resume).
            gen = _step_generator(cfg.seed, step, rank)
            sigma = diffusion.sample_training_sigmas(b, cfg.p_mean, cfg.p_std, gen).to(device)
            noise = torch.randn(x.shape, generator=gen).to(device)
            keep_caption = torch.rand(b, generator=gen) >= cfg.caption_dropout_prob
            caption_valid = batch["caption_valid"] & keep_caption

            # Forward and backward.
            lr = diffusion.lr_at_step(step, cfg.lr, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(cfg, device):
                loss = diffusion.edm_loss(net, x, sigma, noise, cfg.sigma_data,
                                          caption=batch["caption"].to(device),
                                          caption_valid=caption_valid.to(device),
                                          fps_id=batch["fps_id"].to(device),
                                          motion_bucket_id=batch["motion_bucket_id"].to(device)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()

            # Clip, step, and update the EMA (its decay ramps up so early steps do not dominate).
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            beta = min(decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p.detach(), 1 - beta)
                for b_ema, b_net in zip(ema.buffers(), model.buffers()):
                    b_ema.copy_(b_net)

            # Metrics: the loss averaged over ranks, written by rank 0.
            loss_value = loss.detach()
            if world > 1:
                dist.all_reduce(loss_value)
                loss_value /= world
            loss_f = float(loss_value)
            if not math.isfinite(loss_f):
                raise FloatingPointError(f"loss is {loss_f} at step {step} of the {cfg.stage} stage")
            step += 1
            t_prev = time.perf_counter()
            step_s = t_prev - t_data + data_wait_s
            result.losses[step - 1] = loss_f
            result.data_wait_s += data_wait_s
            result.step_s += step_s
            result.samples += b * world
            if rank == 0:
                row = {"step": step - 1, "loss": loss_f, "lr": lr, "grad_norm": float(grad_norm),
                       "sigma_median": float(sigma.median()), "step_s": step_s, "data_wait_s": data_wait_s}
                writer.writerow(row)
                if tb is not None:
                    for k, v in row.items():
                        if k != "step":
                            tb.add_scalar(f"{cfg.stage}/{k}", v, step - 1)
                if step % cfg.log_every_steps == 0 or step == cfg.total_steps:
                    metrics_file.flush()
                    log.info("%s step %d/%d loss %.4f lr %.2e grad %.3f %.3fs/step (data %.3fs)",
                             cfg.stage, step, cfg.total_steps, loss_f, lr, float(grad_norm), step_s, data_wait_s)

            # Checkpoint periodically and at the end; a requested stop acts like a kill.
            if stop_after_step is not None and step >= stop_after_step and step < cfg.total_steps:
                break
            if rank == 0 and (step % cfg.checkpoint_every_steps == 0 or step == cfg.total_steps):
                result.last_checkpoint = checkpoint(step)
            if world > 1 and step % cfg.checkpoint_every_steps == 0:
                dist.barrier()
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if tb is not None:
            tb.close()

    # Loss plot of the whole stage (resumed parts included).
    if rank == 0 and step == cfg.total_steps and os.path.exists(os.path.join(run_dir, "metrics.csv")):
        plot_losses(os.path.join(run_dir, "metrics.csv"), os.path.join(run_dir, "loss.png"),
                    f"{cfg.stage} stage")
        if result.last_checkpoint is None:
            result.last_checkpoint = latest_checkpoint(run_dir)
    return result
