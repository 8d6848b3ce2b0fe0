"""`curate train` and `curate sample`: argument parsing and stage orchestration for the trainer.

    curate train OUT_DIR --stage image|video|hq|all [--preset-size tiny|small] [--workers N]
                 [--set key=value ...] [--set video.key=value ...]
    curate sample CHECKPOINT|STAGE_DIR --prompt TEXT [--prompt-embedding FILE.npy] --frames T --steps N --out PATH

`train` streams the shard files the ledger of OUT_DIR lists (training/stream.py) and writes OUT_DIR/train/<stage>/ (checkpoints, metrics.csv,
loss.png). A stage starts from the previous stage's latest checkpoint (init_from=auto), and a
stage whose folder already has a checkpoint resumes from it, so re-running the same command
after a kill continues where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from training.config import LATENT_SIZES, PREVIOUS_STAGE, SIZES, STAGES, TrainConfig, apply_overrides, preset

log = logging.getLogger(__name__)


def _stage_overrides(items: list[str], stage: str) -> list[str]:
    """Overrides for one stage: plain key=value apply to all stages, stage.key=value to that one."""
    out = []
    for item in items:
        key = item.split("=", 1)[0]
        prefix, dot, rest = key.partition(".")
        if dot and prefix in STAGES:
            if prefix == stage:
                out.append(rest + item[len(key):])
        else:
            out.append(item)
    return out


def resolve_init(cfg: TrainConfig, work: str) -> str | None:
    """The checkpoint a stage starts from: none for image, else the previous stage's newest readable one (or a path)."""
    from training.loop import latest_good_checkpoint

    if cfg.init_from == "none" or PREVIOUS_STAGE[cfg.stage] is None and cfg.init_from == "auto":
        return None
    if cfg.init_from != "auto":
        if not os.path.isfile(cfg.init_from):
            raise FileNotFoundError(f"init_from: no checkpoint at {cfg.init_from}")
        return cfg.init_from
    prev_dir = os.path.join(work, "train", PREVIOUS_STAGE[cfg.stage])
    path, _ = latest_good_checkpoint(prev_dir)
    if path is None:
        raise FileNotFoundError(f"the {cfg.stage} stage starts from the {PREVIOUS_STAGE[cfg.stage]} stage's "
                                f"checkpoint, but {prev_dir} has none: train that stage first "
                                f"(--stage {PREVIOUS_STAGE[cfg.stage]}), or --set init_from=PATH|none")
    return path


def train_command(argv: list[str]) -> int:
    """`curate train`: train one stage or all three in order. Returns a process exit code."""
    parser = argparse.ArgumentParser(prog="curate train", description="Train the SVD-style model on curated shards.")
    parser.add_argument("out_dir", help="the curation output (a folder or an s3://, gs://, az:// URI): "
                                        "reads the shards its ledger lists")
    parser.add_argument("--work-dir", default=None, metavar="DIR",
                        help="local folder for checkpoints (DIR/train/STAGE); default OUT_DIR, or for an "
                             "object-store OUT_DIR ./curate-work/SCHEME/BUCKET/PREFIX")
    parser.add_argument("--stage", choices=[*STAGES, "all"], required=True)
    parser.add_argument("--preset-size", choices=list(SIZES), default="small",
                        help="tiny, small: CPUs and tests; base (346M), large (1.6B): GPUs, latent space, "
                             "need --set latent_autoencoder=PATH")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP); 1 = in this process")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in this process (0 = torch default; 1 is fastest on a busy 2-core machine)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (STAGE.KEY=VALUE for one stage); repeatable")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import torch

    from training.data import shard_paths
    from training.loop import BadRowsError  # (a DoesNotFitError, out of device memory, is a ValueError)

    if args.threads:
        torch.set_num_threads(args.threads)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    try:
        paths = shard_paths(args.out_dir)
        cfgs = [apply_overrides(preset(s, args.preset_size), _stage_overrides(args.overrides, s)) for s in stages]
        if args.preset_size in LATENT_SIZES and not all(c.latent_autoencoder for c in cfgs):
            raise ValueError(f"the {args.preset_size} preset trains in latent space (4 x 32 x 48 latents of "
                             "256x384 frames): give SVD's autoencoder (a diffusers AutoencoderKL folder) with "
                             "--set latent_autoencoder=PATH")
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    for cfg in cfgs:
        try:
            _train_stage(cfg, args, paths)
        except (ValueError, FileNotFoundError, BadRowsError) as exc:  # user-fixable: say it, no traceback
            print(f"curate train: {cfg.stage} stage: {exc}", file=sys.stderr)
            return 2
    return 0


def _train_stage(cfg: TrainConfig, args: argparse.Namespace, paths: list[str]) -> None:
    from training.loop import train

    from curation.outdir import work_dir

    work = str(work_dir(args.out_dir, args.work_dir))
    run_dir = os.path.join(work, "train", cfg.stage)
    t0 = time.perf_counter()
    init = resolve_init(cfg, work)
    if args.workers > 1:
        from training.ray_train import train_distributed

        report = train_distributed(cfg, paths, run_dir, args.workers, init_checkpoint=init,
                                   cpus_per_worker=args.cpus_per_worker)
        losses, last = report["losses"], report["last_checkpoint"]
    else:
        result = train(cfg, paths, run_dir, init_checkpoint=init)
        losses, last = [result.losses[k] for k in sorted(result.losses)], result.last_checkpoint
    head = sum(losses[:10]) / max(1, len(losses[:10]))
    tail = sum(losses[-10:]) / max(1, len(losses[-10:]))
    print(f"{cfg.stage}: {len(losses)} steps in {time.perf_counter() - t0:.0f}s, "
          f"loss {head:.4f} (first 10) -> {tail:.4f} (last 10), checkpoint {last}")


def sample_command(argv: list[str]) -> int:
    """`curate sample`: write OUT.mp4 and OUT.gif generated from a checkpoint. Returns an exit code."""
    parser = argparse.ArgumentParser(prog="curate sample", description="Generate clips from a checkpoint.")
    parser.add_argument("checkpoint", help="a checkpoint-*.pt file, or a stage folder (its latest checkpoint)")
    parser.add_argument("--prompt", required=True, help="text prompt; '' samples unconditionally")
    parser.add_argument("--prompt-embedding", default=None, help=".npy caption embedding to use instead of a text encoder")
    parser.add_argument("--open-clip-model", default="", help="open_clip model name (default: the checkpoint config's)")
    parser.add_argument("--open-clip-pretrained", default="", help="open_clip weights path (default: the config's)")
    parser.add_argument("--frames", type=int, default=0, help="frames (default: the checkpoint's num_frames)")
    parser.add_argument("--steps", type=int, default=25, help="Heun steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate of the output (and its fps_id)")
    parser.add_argument("--motion-bucket-id", type=int, default=127)
    parser.add_argument("--out", default="sample.mp4", help="output path; .mp4 and .gif are written")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the network runs (auto: CUDA where torch sees a GPU)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import torch

    from curation.schema import fps_id_for

    from training.sample import (embed_prompt, generate, latent_decoder, load_for_sampling, to_uint8_frames,
                                 write_outputs)

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        checkpoint = args.checkpoint
        if os.path.isdir(checkpoint):
            from training.loop import latest_checkpoint

            checkpoint = latest_checkpoint(checkpoint) or parser.error(f"no checkpoint-*.pt in {checkpoint}")
        model, cfg, in_channels = load_for_sampling(checkpoint, args.device)
        caption = embed_prompt(args.prompt, cfg, args.prompt_embedding, args.open_clip_model,
                               args.open_clip_pretrained)
        frames = args.frames or cfg.num_frames
        decode = latent_decoder(cfg) if cfg.latent_autoencoder else None
        videos = generate(model, cfg, in_channels, caption, frames, args.steps, seed=args.seed,
                          guidance_scale=args.guidance, fps_id=fps_id_for(args.fps) or 0,
                          motion_bucket_id=args.motion_bucket_id, num_samples=args.num_samples, decode=decode)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    for i, video in enumerate(videos):
        out = args.out if args.num_samples == 1 else args.out.replace(".mp4", f"-{i}.mp4")
        mp4, gif = write_outputs(to_uint8_frames(video), out, args.fps)
        print(f"wrote {mp4} and {gif} ({frames} frames, {args.steps} Heun steps, guidance {args.guidance})")
    return 0
