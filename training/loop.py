"""The training loop of one stage: data stream -> EDM loss -> AdamW step -> EMA -> metrics and checkpoints.

Writes into run_dir (OUT_DIR/train/<stage>/):
    checkpoint-<step>.pt  {"model", "ema", "optimizer": state dicts, "config": resolved config,
                           "step", "rng": torch RNG states (recorded, not restored: every step
                           reseeds), "in_channels", "data": stream counters, "format"} (no pickled
                           modules); written to a temporary file, fsynced, renamed (training/checkpoint.py)
    metrics.csv           one row per step: step, loss, lr, grad_norm, sigma_median, step_s, data_wait_s,
                          bad_rows (undecodable rows skipped so far, all ranks)
    loss.png              loss per step (and its running mean)
    tensorboard/          the same scalars, when a TensorBoard writer is installed

Exact resume: the batch of step s is a function of (seed, s) (training/stream.py: the stream
position is s * batch_size / data_streams), the noise levels, noise and caption dropout of a
stream's rows at step s come from a generator seeded with (seed, s, stream), the global RNG
(dropout) is reseeded every step, and the checkpoint restores weights, EMA and optimizer
moments, so a run resumed from step k computes the same losses as the uninterrupted run from
step k on. A checkpoint that cannot be read is skipped for the one before it.

Runs in one process, or as one DDP rank when torch.distributed is initialised (ray_train.py,
or any launcher): rank r reads only its own data streams, and the per-rank losses are sums
over the rank's rows divided by the rank's nominal batch, so DDP's gradient average is the
gradient of the global batch mean, as in a single process with the same data_streams.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from training import diffusion, sharding
from training.checkpoint import latest_checkpoint, latest_good_checkpoint, load_checkpoint, save_checkpoint
from training.config import MODEL_FIELDS, TrainConfig, from_dict, to_dict
from training.data import autoencoder_factor, load_autoencoder
from training.unet import VideoUNet, extend_to_video
from training.stream import DataPlan, StreamDataset, plan_data

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: optimizer state keyed by parameter name (training/sharding.py); 1: by position
# The bad-row cap is checked against at least this many rows, so that one bad row among the
# first few batches does not stop a run, while a corpus of bad rows stops within a few steps.
BAD_ROW_MIN_DENOMINATOR = 256
PIECES_READ_KEPT = 10_000  # (epoch, piece) pairs kept in TrainResult (for accounting and tests)


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (this process's steps)
    last_checkpoint: str | None = None
    resumed_from_step: int = 0
    data_wait_s: float = 0.0
    step_s: float = 0.0  # total time of the steps (data wait included)
    samples: int = 0
    bad_rows: int = 0  # undecodable rows skipped, all ranks, since step 0
    pieces_read: list[tuple[int, int]] = field(default_factory=list)  # (epoch, piece) this rank read, the first
    num_pieces_read: int = 0                                          # PIECES_READ_KEPT of them; and how many
    model: torch.nn.Module | None = None  # the trained (unwrapped) network of this process
    ema: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None  # its AdamW (sharded: this rank's moments only)


class BadRowsError(RuntimeError):
    """Too many undecodable rows: the corpus, not the trainer, needs fixing."""


def model_from_config(cfg: TrainConfig, in_channels: int) -> VideoUNet:
    """The network a resolved config describes (temporal layers in the video stages)."""
    return VideoUNet(in_channels=in_channels, model_channels=cfg.model_channels,
                     channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
                     attention_levels=tuple(cfg.attention_levels), num_heads=cfg.num_heads,
                     caption_dim=cfg.caption_dim, context_tokens=cfg.context_tokens,
                     context_dim=cfg.context_dim, temporal=cfg.is_video, dropout=cfg.dropout)


# ---- helpers ----------------------------------------------------------------------------

def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast on GPUs that support it; full precision on CPU (CPU bf16 is often slower)."""
    return cfg.mixed_precision == "bf16" or (
        cfg.mixed_precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, device))


def device_memory_bytes(device: torch.device) -> int:
    """The memory of one GPU; 0 on the CPU (where sharding=auto never shards)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0


class DoesNotFitError(ValueError):
    """A step ran out of device memory: said with what to change, not as a traceback."""


def _does_not_fit(cfg: TrainConfig, model: torch.nn.Module, device: torch.device, world: int,
                  sharded: bool) -> str:
    params = sum(p.numel() for p in model.parameters()) * (world if sharded else 1)
    total = device_memory_bytes(device) / 2**30
    hints = [h for h, on in (("--set activation_checkpointing=true", not cfg.activation_checkpointing),
                             (f"a smaller batch_size (now {cfg.batch_size} over {world} rank(s))", True),
                             ("--workers N --set sharding=fsdp (weights, gradients and AdamW state "
                              "split over N GPUs)", not sharded)) if on]
    return (f"the {cfg.stage} stage ({params / 1e6:.0f}M parameters, batch {cfg.batch_size} of "
            f"{cfg.num_frames} x {cfg.resolution_px}x{cfg.frame_width}) does not fit in the {total:.0f} GiB "
            f"of {device}: try " + "; or ".join(hints))


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")


def compiled(net: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """`net` under torch.compile when the config asks (auto: on CUDA); the parameters stay the
    model's, so checkpoints, EMA and the optimizer see the uncompiled module."""
    if not use_compile(cfg, device):
        return net
    log.info("compiling the network (torch.compile, backend %s; the first steps include compile time)",
             cfg.compile_backend)
    return torch.compile(net, backend=cfg.compile_backend)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the kernels `optimizer_impl` names: fused (one kernel for every parameter;
    auto on CUDA), foreach (a few multi-tensor ops; auto elsewhere) or loop (per parameter)."""
    impl = cfg.optimizer_impl
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def _stream_generator(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + stream)


def _open_tensorboard(run_dir: str):
    for module in ("torch.utils.tensorboard", "tensorboardX"):
        try:
            writer_cls = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
            return writer_cls(os.path.join(run_dir, "tensorboard"))
        except ImportError:
            continue
    return None


METRIC_FIELDS = ["step", "loss", "lr", "grad_norm", "sigma_median", "step_s", "data_wait_s", "bad_rows"]


class MetricsLog:
    """metrics.csv (+ TensorBoard, + a log line every log_every_steps), written by rank 0 only.

    Opened for appending after dropping the rows of steps >= resume_step (work that was lost).
    """

    def __init__(self, run_dir: str, cfg: TrainConfig, resume_step: int, enabled: bool):
        self.cfg, self.file, self.writer, self.tb = cfg, None, None, None
        if not enabled:
            return
        path = os.path.join(run_dir, "metrics.csv")
        rows = []
        if resume_step > 0 and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < resume_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=METRIC_FIELDS, restval="")
        self.writer.writeheader()
        self.writer.writerows({k: r.get(k, "") for k in METRIC_FIELDS} for r in rows)
        self.tb = _open_tensorboard(run_dir)

    def write(self, row: dict) -> None:
        if self.writer is None:
            return
        self.writer.writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"{self.cfg.stage}/{k}", v, row["step"])
        done = row["step"] + 1
        if done % self.cfg.log_every_steps == 0 or done == self.cfg.total_steps:
            self.file.flush()
            log.info("%s step %d/%d loss %.4f lr %.2e grad %.3f %.3fs/step (data %.3fs) bad rows %d",
                     self.cfg.stage, done, self.cfg.total_steps, row["loss"], row["lr"], row["grad_norm"],
                     row["step_s"], row["data_wait_s"], row["bad_rows"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


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


# ---- the paragraphs of a stage ----------------------------------------------------------

def _resolve_caption_dim(cfg: TrainConfig, data_caption_dim: int, resume: dict | None,
                         init: dict | None) -> TrainConfig:
    """cfg with caption_dim set from the shards (or the resumed run), checked against the init checkpoint."""
    if cfg.caption_dim == 0:
        if data_caption_dim == 0:
            log.warning("no caption_embedding in the shards: the model trains unconditionally")
        cfg = replace(cfg, caption_dim=max(1, data_caption_dim))
    elif data_caption_dim not in (0, cfg.caption_dim):
        raise ValueError(f"caption_dim={cfg.caption_dim} but the shards' caption_embedding has {data_caption_dim}")
    if resume is not None:
        saved = from_dict(resume["config"])
        _check_same_model(saved, cfg)
        cfg = replace(cfg, caption_dim=saved.caption_dim)
    if init is not None:
        prev = from_dict(init["config"])
        _check_same_model(prev, cfg)
        if prev.caption_dim != cfg.caption_dim:
            raise ValueError(f"caption_dim {cfg.caption_dim} differs from the init checkpoint's {prev.caption_dim}")
    return cfg


def _prepare_inputs(cfg: TrainConfig, plan: DataPlan, run_dir: str, rank: int,
                    world: int) -> tuple[DataPlan, int, tuple[int, ...]]:
    """(plan, input channels, shape of one sample's x); in latent mode the latent cache is built first."""
    t = (cfg.num_frames,) if cfg.is_video else ()
    if not cfg.latent_autoencoder:
        return plan, 3, (3, *t, cfg.resolution_px, cfg.frame_width)
    from training.latents import build_latents

    vae = load_autoencoder(cfg.latent_autoencoder)
    factor = autoencoder_factor(vae)
    down = factor * 2 ** (len(cfg.channel_mult) - 1)
    if cfg.resolution_px % down or cfg.frame_width % down:
        raise ValueError(f"resolution_px and width_px must be divisible by {down}, the autoencoder's "
                         "and the U-Net's downsampling together")
    cache_dir = cfg.latent_cache_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)), "latent_cache")
    plan = build_latents(plan, cfg, cache_dir, vae, rank, world)
    channels = int(vae.config.latent_channels)
    return plan, channels, (channels, *t, cfg.resolution_px // factor, cfg.frame_width // factor)


def _init_model(cfg: TrainConfig, in_channels: int, init: dict | None, init_path: str | None,
                device: torch.device) -> torch.nn.Module:
    """The stage's network: from the previous stage's EMA weights (temporal layers added at zero), or fresh."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (the EMA copies them too)
    model = model_from_config(cfg, in_channels)
    if init is not None:
        state = init["ema"]  # a stage starts from the previous stage's EMA weights
        if cfg.is_video and not from_dict(init["config"]).is_video:
            extend_to_video(state, model)
        else:
            model.load_state_dict(state)
        log.info("%s stage starts from %s (step %d)", cfg.stage, init_path, init["step"])
    return model.to(device)


def _restore(resume: dict | None, path: str | None, model, ema, optimizer, result: TrainResult) -> int:
    """Load a resumed run's state into the model, EMA and optimizer; returns the step to start at."""
    if resume is None:
        return 0
    log.info("resuming %s from %s (step %d)", from_dict(resume["config"]).stage, path, int(resume["step"]))
    sharding.load_model_state(model, resume["model"])
    sharding.load_model_state(ema, resume["ema"])
    sharding.load_optimizer_state(model, optimizer, resume["optimizer"],
                                  keyed_by_name=int(resume.get("format", 1)) >= 2)
    data = resume.get("data") or {}
    result.bad_rows = int(data.get("bad_rows", 0))
    return int(resume["step"])


def _data_loader(plan: DataPlan, cfg: TrainConfig, x_shape: tuple[int, ...], rank: int, world: int,
                 start_step: int) -> DataLoader:
    """This rank's batches from start_step on; K loader workers build every K-th step's batch."""
    dataset = StreamDataset(plan, cfg, x_shape, rank, world, start_step)
    return DataLoader(dataset, batch_size=None, num_workers=cfg.data_workers,
                      prefetch_factor=4 if cfg.data_workers else None, persistent_workers=False)


def _loss(net, batch: dict, cfg: TrainConfig, step: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(loss to backpropagate, sum of weighted per-row losses, sigmas) of this rank's part of a step.

    Noise levels, noise and caption dropout of each stream's rows are seeded by (seed, step, stream),
    so they do not depend on which rank holds the stream. Bad rows (weight 0) add nothing; the sum is
    divided by the rank's nominal batch, so DDP's gradient average is that of the global mean.
    """
    x = batch["x"].to(device, non_blocking=True)
    streams = batch["stream"]
    sigma, noise, keep_caption = [], [], []
    for j in torch.unique_consecutive(streams).tolist():
        n = int((streams == j).sum())
        gen = _stream_generator(cfg.seed, step, j)
        sigma.append(diffusion.sample_training_sigmas(n, cfg.p_mean, cfg.p_std, gen))
        noise.append(torch.randn((n, *x.shape[1:]), generator=gen))
        keep_caption.append(torch.rand(n, generator=gen) >= cfg.caption_dropout_prob)
    sigma, noise = torch.cat(sigma).to(device), torch.cat(noise).to(device)
    caption_valid = batch["caption_valid"] & torch.cat(keep_caption)
    with _autocast(cfg, device):
        per_row = diffusion.edm_loss(net, x, sigma, noise, cfg.sigma_data,
                                     caption=batch["caption"].to(device),
                                     caption_valid=caption_valid.to(device),
                                     fps_id=batch["fps_id"].to(device),
                                     motion_bucket_id=batch["motion_bucket_id"].to(device))
    weighted = (per_row.float() * batch["weight"].to(device)).sum()
    return weighted / len(x), weighted.detach(), sigma


def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA of the weights; its decay ramps up so early steps do not dominate; buffers are copied."""
    beta = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1 - beta)
        for b_ema, b_net in zip(ema.buffers(), model.buffers()):
            b_ema.copy_(b_net)


def _optimizer_step(net, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    batch: dict, cfg: TrainConfig, step: int, decay: float,
                    device: torch.device) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step: forward and backward at this step's learning rate, clip, AdamW, EMA.

    Returns (lr, this rank's sum of weighted per-row losses, sigmas, gradient norm).
    """
    lr = diffusion.lr_at_step(step, cfg.lr, cfg.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, weighted, sigma = _loss(net, batch, cfg, step, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
    optimizer.step()
    _update_ema(ema, model, decay, step)
    return lr, weighted, sigma, grad_norm


def _step_loss(result: TrainResult, weighted: torch.Tensor, batch: dict, cfg: TrainConfig, step: int,
               world: int) -> float:
    """The mean loss over the global batch's good rows (sums over ranks); the batch's bad rows, all
    ranks, are added to result.bad_rows and capped (BadRowsError)."""
    totals = torch.stack([weighted.cpu().double(), batch["weight"].sum().double(),
                          torch.tensor(float(len(batch["bad_rows"])), dtype=torch.float64)])
    if world > 1:
        dist.all_reduce(totals)
    loss_sum, good, bad = totals.tolist()
    loss_f = loss_sum / max(good, 1.0)
    if not math.isfinite(loss_f):
        raise FloatingPointError(f"loss is {loss_f} at step {step} of the {cfg.stage} stage")
    result.bad_rows += int(bad)
    _check_bad_rows(result, step, cfg, batch)
    return loss_f


def _note_reads(result: TrainResult, batch: dict) -> None:
    """Count the (epoch, piece) pairs this rank read in the batch; keep the first PIECES_READ_KEPT."""
    result.num_pieces_read += len(batch["reads"])
    room = PIECES_READ_KEPT - len(result.pieces_read)
    result.pieces_read.extend(map(tuple, batch["reads"][:room].tolist()))


def _check_bad_rows(result: TrainResult, step: int, cfg: TrainConfig, batch: dict) -> None:
    """Stop the run when more than max_bad_row_fraction of the rows seen so far were bad."""
    seen = (step + 1) * cfg.batch_size
    for message in batch["bad_rows"]:
        log.warning("step %d: skipped a bad row: %s", step, message)
    if result.bad_rows > cfg.max_bad_row_fraction * max(seen, BAD_ROW_MIN_DENOMINATOR):
        last = batch["bad_rows"][-1] if batch["bad_rows"] else "(on another rank)"
        raise BadRowsError(f"{result.bad_rows} of the {seen} rows read by step {step} of the {cfg.stage} stage "
                           f"could not be decoded, more than max_bad_row_fraction={cfg.max_bad_row_fraction}; "
                           f"the latest: {last}. Fix or drop those shards (or raise max_bad_row_fraction)")


def _check_same_streams(resume: dict | None, plan: DataPlan) -> None:
    saved = ((resume or {}).get("data") or {}).get("num_streams", plan.num_streams)
    if saved != plan.num_streams:
        log.warning("resuming with %d data streams where the run had %d: the batches differ from an "
                    "uninterrupted run (set data_streams to keep them)", plan.num_streams, saved)


def _checkpoint_state(cfg, step, in_channels, model, ema, optimizer, plan: DataPlan,
                      result: TrainResult, device) -> dict:
    return {"format": CHECKPOINT_FORMAT, "step": step, "config": to_dict(cfg), "in_channels": in_channels,
            "model": sharding.model_state(model), "ema": sharding.model_state(ema),
            "optimizer": sharding.optimizer_state(model, optimizer),
            "data": {"num_streams": plan.num_streams, "bad_rows": result.bad_rows, "num_rows": plan.num_rows},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}}


def _finish(result: TrainResult, run_dir: str, cfg: TrainConfig, step: int, rank: int) -> None:
    """Loss plot of the whole stage (resumed parts included) once the stage is complete."""
    if rank == 0 and step == cfg.total_steps and os.path.exists(os.path.join(run_dir, "metrics.csv")):
        plot_losses(os.path.join(run_dir, "metrics.csv"), os.path.join(run_dir, "loss.png"),
                    f"{cfg.stage} stage")
        if result.last_checkpoint is None:
            result.last_checkpoint = latest_checkpoint(run_dir)


# ---- the loop ---------------------------------------------------------------------------

def _build_model(cfg: TrainConfig, in_channels: int, init: dict | None, init_checkpoint: str | None,
                 device: torch.device, world: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, bool]:
    """(model, its EMA, the network a step runs: DDP-wrapped or sharded, compiled when asked;
    whether it is sharded)."""
    model = _init_model(cfg, in_channels, init, init_checkpoint, device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    model.checkpointing = cfg.activation_checkpointing
    sharded = sharding.wants_sharding(cfg.sharding, model, device, world, device_memory_bytes(device))
    if sharded:
        log.info("sharding weights, gradients and optimizer state over %d ranks (FSDP2)", world)
        sharding.shard(model, device)
        sharding.shard(ema, device)
        net = model
    else:
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    return model, ema, compiled(net, cfg, device), sharded


def _record_step(result: TrainResult, metrics: MetricsLog, cfg: TrainConfig, step: int, loss: float, lr: float,
                 grad_norm: Any, sigma: torch.Tensor, step_s: float, data_wait_s: float) -> None:
    """A step's loss and times into the result, and its line of metrics."""
    result.losses[step] = loss
    result.data_wait_s, result.step_s = result.data_wait_s + data_wait_s, result.step_s + step_s
    result.samples += cfg.batch_size
    metrics.write({"step": step, "loss": loss, "lr": lr, "grad_norm": sharding.as_float(grad_norm),
                   "sigma_median": float(sigma.median()), "step_s": step_s,
                   "data_wait_s": data_wait_s, "bad_rows": result.bad_rows})


def train(cfg: TrainConfig, shard_paths: list[str], run_dir: str, init_checkpoint: str | None = None,
          stop_after_step: int | None = None) -> TrainResult:
    """Train one stage on the rows of the shard files `shard_paths`; resumes from run_dir's checkpoints.

    init_checkpoint: the previous stage's checkpoint to start from (ignored when resuming).
    stop_after_step: stop (without a final checkpoint) once this many steps are done, as a kill would.
    """
    # Distributed set-up: one process per rank; rank 0 writes files.
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = resolve_device(cfg)
    os.makedirs(run_dir, exist_ok=True)

    # Data plan: pieces (row groups) from metadata, the stage's select, the caption dimension.
    plan = plan_data(list(shard_paths), cfg, num_streams=cfg.data_streams or world)

    # Resume this stage from its newest readable checkpoint, or start from the previous stage's.
    resume_path, resume = latest_good_checkpoint(run_dir)
    init = None if resume is not None or not init_checkpoint else load_checkpoint(init_checkpoint)
    cfg = _resolve_caption_dim(cfg, plan.caption_dim, resume, init)
    _check_same_streams(resume, plan)
    plan, in_channels, x_shape = _prepare_inputs(cfg, plan, run_dir, rank, world)  # latent cache (latent mode)

    # Model, EMA, DDP wrapper and optimizer; a resumed run's state on top.
    model, ema, net, sharded = _build_model(cfg, in_channels, init, init_checkpoint, device, world)
    optimizer = make_optimizer(model, cfg, device)
    result = TrainResult(model=model, ema=ema, optimizer=optimizer)
    start_step = result.resumed_from_step = _restore(resume, resume_path, model, ema, optimizer, result)

    # Data loader, metrics, and the EMA's decay.
    loader = _data_loader(plan, cfg, x_shape, rank, world, start_step)
    metrics = MetricsLog(run_dir, cfg, start_step, enabled=rank == 0)
    decay = diffusion.ema_decay(cfg.ema_halflife_steps)
    log.info("%s stage: %d rows in %d pieces, %d data streams, %d steps of batch %d on %s x%d",
             cfg.stage, plan.num_rows, len(plan.pieces), plan.num_streams, cfg.total_steps, cfg.batch_size,
             device, world)

    step, t_prev = start_step, time.perf_counter()
    try:
        for batch in loader:
            # Wait for data (the time a step spends blocked on reading and decoding).
            t_data = time.perf_counter()
            data_wait_s = t_data - t_prev
            _note_reads(result, batch)
            torch.manual_seed(_stream_generator(cfg.seed, step, 1_000 + rank).initial_seed())  # dropout

            # Forward and backward at this step's learning rate; clip, AdamW step, EMA.
            try:
                lr, weighted, sigma, grad_norm = _optimizer_step(net, model, ema, optimizer, batch, cfg, step,
                                                                 decay, device)
            except torch.cuda.OutOfMemoryError as exc:
                raise DoesNotFitError(_does_not_fit(cfg, model, device, world, sharded)) from exc

            # Metrics: the loss over the global batch's good rows, bad rows counted and capped.
            loss_f = _step_loss(result, weighted, batch, cfg, step, world)
            t_prev = time.perf_counter()
            step_s = t_prev - t_data + data_wait_s
            _record_step(result, metrics, cfg, step, loss_f, lr, grad_norm, sigma, step_s, data_wait_s)
            step += 1

            # Checkpoint periodically and at the end; a requested stop acts like a kill.
            if stop_after_step is not None and step >= stop_after_step and step < cfg.total_steps:
                break
            if step % cfg.checkpoint_every_steps == 0 or step == cfg.total_steps:
                # Sharded: gathering the whole state is a collective of every rank.
                state = _checkpoint_state(cfg, step, in_channels, model, ema, optimizer, plan, result,
                                          device) if rank == 0 or sharded else None
                if rank == 0:
                    result.last_checkpoint = save_checkpoint(run_dir, state)
            if world > 1 and step % cfg.checkpoint_every_steps == 0:
                dist.barrier()
    finally:
        metrics.close()
    _finish(result, run_dir, cfg, step, rank)
    return result
