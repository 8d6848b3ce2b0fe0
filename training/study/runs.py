"""The runs: each (arm, seed) trained through its stages and evaluated on the held-out sets, here or on Ray."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from curation.writer import write_json
from training.study.spec import StudyError, StudySpec


# ---- runs -------------------------------------------------------------------------------

def stage_configs(spec: StudySpec, stages: tuple[str, ...], seed: int) -> list[dict[str, Any]]:
    """The resolved trainer config (to_dict) of each stage of one run."""
    from training.cli import _stage_overrides
    from training.config import apply_overrides, preset, to_dict

    out = []
    for k, stage in enumerate(stages):
        cfg = apply_overrides(preset(stage, spec.preset_size), _stage_overrides(list(spec.overrides), stage))
        cfg = replace(cfg, seed=seed, init_from="auto" if k > 0 else "none")
        out.append(to_dict(cfg))
    return out


def sigma_grid(cfg: dict[str, Any], k: int) -> list[float]:
    """Noise levels at the quantiles (i + 0.5) / k of the stage's ln sigma ~ N(p_mean, p_std^2)."""
    from statistics import NormalDist

    z = [NormalDist().inv_cdf((i + 0.5) / k) for i in range(k)]
    return [float(math.exp(cfg["p_mean"] + cfg["p_std"] * zi)) for zi in z]


def task_hash(task: dict[str, Any]) -> str:
    keep = {k: v for k, v in task.items() if k not in ("run_dir", "threads", "eval_paths")}
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Train one (arm, seed) through its stages, then evaluate the last stage on the held-out sets.

    Resumes: a stage with checkpoints continues, and a run whose eval.json has this task's
    hash returns it unread-again. Runs in this process or as a Ray task (plain dicts only).
    """
    import curation  # noqa: F401  (torchvision shim first, in a Ray worker too)
    import torch

    from training.config import from_dict
    from training.loop import latest_good_checkpoint, train

    run_dir = task["run_dir"]
    done = os.path.join(run_dir, "eval.json")
    digest = task_hash(task)
    if os.path.exists(done):
        with open(done) as f:
            saved = json.load(f)
        if saved.get("task_hash") == digest:
            return saved
    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    t0 = time.perf_counter()
    init, stages = None, {}
    for d in task["configs"]:
        cfg = from_dict(d)
        stage_dir = os.path.join(run_dir, cfg.stage)
        t_stage = time.perf_counter()
        result = train(cfg, [task["data"]], stage_dir, init_checkpoint=init)
        losses = [result.losses[k] for k in sorted(result.losses)]
        init, _ = latest_good_checkpoint(stage_dir)
        stages[cfg.stage] = {"steps": cfg.total_steps, "seconds": time.perf_counter() - t_stage,
                             "last_losses_mean": float(np.mean(losses[-10:])) if losses else None,
                             "checkpoint": init}
    evals = {name: evaluate_checkpoint(init, path, task["eval"]) for name, path in task["eval_paths"].items()}
    out = {"task_hash": digest, "arm": task["arm"], "seed": task["seed"], "stages": stages,
           "seconds": time.perf_counter() - t0, "eval": evals}
    write_json(Path(done), out)
    _prune_checkpoints(run_dir, [d["stage"] for d in task["configs"]])
    return out


def _prune_checkpoints(run_dir: str, stages: list[str]) -> None:
    """Keep only each stage's last checkpoint once the run is evaluated (a study has many runs)."""
    from training.checkpoint import checkpoint_paths

    for stage in stages:
        for path in checkpoint_paths(os.path.join(run_dir, stage))[:-1]:
            os.remove(path)


def evaluate_checkpoint(checkpoint: str, eval_path: str, ev: dict[str, Any]) -> dict[str, Any]:
    """Per-sample EDM losses of a checkpoint's EMA network on the clips of one shard file.

    ev: {"sigmas": [...], "windows": k, "seed": s, "batch": b}. Returns {"clip_ids", "source_ids",
    "losses": [[loss at each sigma] per sample]} with samples in (clip, window) order.
    """
    import torch

    from training import diffusion
    from training.data import FrameCache, columns_for, read_shards, row_sample
    from training.loop import resolve_device
    from training.sample import load_for_sampling

    model, cfg, _ = load_for_sampling(checkpoint)
    device = resolve_device(cfg)
    model = model.to(device)
    table = read_shards([eval_path], list(dict.fromkeys(columns_for(cfg) + ["source_id"])))
    sigmas = [float(s) for s in ev["sigmas"]]
    cache = FrameCache(cfg.frame_cache_mb)
    rows = table.to_pylist()
    items = [(r, w) for r in rows for w in range(int(ev["windows"]))]
    out_losses: list[list[float]] = []
    batch_size = int(ev.get("batch", 32))
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            samples, noises = [], []
            for row, w in chunk:
                seed = _sample_seed(ev["seed"], row["clip_id"], w)
                rng = np.random.default_rng(seed)
                samples.append(row_sample(row, cfg, cfg.caption_dim, rng, cache, row["clip_id"]))
                gen = torch.Generator().manual_seed(seed)
                noises.append(torch.randn((len(sigmas), *samples[-1]["x"].shape), generator=gen))
            x = torch.stack([s["x"] for s in samples]).to(device)
            noise = torch.stack(noises).to(device)  # (B, K, ...)
            cond = {"caption": torch.stack([s["caption"] for s in samples]).to(device),
                    "caption_valid": torch.stack([s["caption_valid"] for s in samples]).to(device),
                    "fps_id": torch.stack([s["fps_id"] for s in samples]).to(device),
                    "motion_bucket_id": torch.stack([s["motion_bucket_id"] for s in samples]).to(device)}
            per = []
            for k, sigma in enumerate(sigmas):
                s = torch.full((len(x),), sigma, device=device)
                per.append(diffusion.edm_loss(model, x, s, noise[:, k], cfg.sigma_data, **cond).double().cpu())
            out_losses += torch.stack(per, 1).tolist()
    return {"clip_ids": [r["clip_id"] for r, _ in items], "source_ids": [r["source_id"] for r, _ in items],
            "windows": [w for _, w in items], "losses": out_losses}


def _sample_seed(eval_seed: int, clip_id: str, window: int) -> int:
    return int(hashlib.sha1(f"{eval_seed}:{clip_id}:{window}".encode()).hexdigest()[:15], 16)


def run_tasks(tasks: list[dict[str, Any]], runner: str = "local", ray_address: str | None = None,
              num_cpus: int | None = None, cpus_per_task: float = 1.0,
              progress: Callable[[int, int, dict], None] | None = None) -> list[dict[str, Any]]:
    """Every task's result, in task order: one after another here, or as parallel Ray tasks."""
    if runner == "local":
        out = []
        for k, task in enumerate(tasks):
            out.append(run_task(task))
            if progress:
                progress(k + 1, len(tasks), out[-1])
        return out
    if runner != "ray":
        raise StudyError(f"runner must be local or ray, got {runner!r}")
    import ray

    from curation.pipeline import init_ray

    init_ray(ray_address, num_cpus=num_cpus)
    remote = ray.remote(run_task).options(num_cpus=cpus_per_task, max_retries=1)
    refs = [remote.remote(t) for t in tasks]
    order = {ref: k for k, ref in enumerate(refs)}
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    pending, done = list(refs), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            results[order[ref]] = ray.get(ref)
            done += 1
            if progress:
                progress(done, len(tasks), results[order[ref]])
    return results  # type: ignore[return-value]

