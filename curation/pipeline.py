"""The Ray executor: the pipeline's steps as one streaming Ray Data dataset.

This is the only module that imports ray (Ray's resource arguments change between releases,
so they live in one place). Each source is its own block; split fans it out into clip rows;
every later step is a `map_batches` over Arrow batches. A step with `ray.actors: N` runs in
a pool of N actors that each call `setup()` once (models load once per actor); without it a
step runs as tasks, with the stage object cached per worker process. The driver streams the
finished rows with `iter_batches` and commits units as they complete (curation/runner.py).

Without an address Ray starts an embedded local cluster; with one (`auto`, `ray://...` or
`host:port`) the same pipeline runs on an existing cluster. Every worker installs the
torchvision compatibility hook (curation.compat.worker_setup) before running anything.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from curation import schema
from curation.config import PipelineConfig, Step
from curation.runner import apply_step, source_rows
from curation.sources import Unit

log = logging.getLogger(__name__)

_STAGE_CACHE: dict[str, Any] = {}


def _stage_for(step: Step):
    """The stage object of this step in this worker process (built and set up once)."""
    key = f"{step.name}:{step.stage}:{sorted(step.args.items())!r}"
    stage = _STAGE_CACHE.get(key)
    if stage is None:
        stage = step.build()
        stage.setup()
        _STAGE_CACHE[key] = stage
    return stage


def _torch_threads(num_cpus: float) -> None:
    # Ray workers start with one thread; let torch use the CPUs the step reserved.
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(max(1, int(num_cpus)))


def _run(step: Step, stage, table: pa.Table) -> pa.Table:
    out = apply_step(step, stage, table.to_pydict())
    return schema.batch_to_table(out)


def stage_task(table: pa.Table, step: Step) -> pa.Table:
    """map_batches function for a step run as tasks."""
    stage = _stage_for(step)
    _torch_threads(step.ray.num_cpus)
    return _run(step, stage, table)


class StageActor:
    """map_batches callable class for a step run by an actor pool."""

    def __init__(self, step: Step):
        self.step = step
        self.stage = step.build()
        _torch_threads(step.ray.num_cpus)
        self.stage.setup()

    def __call__(self, table: pa.Table) -> pa.Table:
        return _run(self.step, self.stage, table)


def init_ray(address: str | None, num_cpus: int | None = None,
             object_store_mb: int | None = None, temp_dir: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"worker_process_setup_hook": "curation.compat.worker_setup"}
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "logging_level": logging.WARNING,
                              "log_to_driver": True}
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs.update(include_dashboard=False, num_cpus=num_cpus)
        if object_store_mb:
            kwargs["object_store_memory"] = int(object_store_mb) * 1024 * 1024
        if temp_dir:
            kwargs["_temp_dir"] = temp_dir
        log.info("starting an embedded Ray cluster (num_cpus=%s)", num_cpus or "all")
    else:
        kwargs["address"] = address
        log.info("connecting to the Ray cluster at %s", address)
    ray.init(**kwargs)


def build_dataset(config: PipelineConfig, units: list[Unit]):
    import ray.data

    items = []
    for unit in units:
        rows = source_rows(unit)
        items.extend(dict(zip(rows, values)) for values in zip(*rows.values()))
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    for step in config.steps:
        opts = step.ray
        kwargs: dict[str, Any] = {
            "batch_format": "pyarrow",
            "batch_size": 1 if step.stage == "split" else opts.batch_size,
            "num_cpus": opts.num_cpus,
            "zero_copy_batch": False,
        }
        if opts.num_gpus:
            kwargs["num_gpus"] = opts.num_gpus
        if opts.actors:
            ds = ds.map_batches(StageActor, fn_constructor_kwargs={"step": step},
                                compute=ray.data.ActorPoolStrategy(size=opts.actors), **kwargs)
        else:
            ds = ds.map_batches(stage_task, fn_kwargs={"step": step}, **kwargs)
    return ds


def run_ray(config: PipelineConfig, units: list[Unit], address: str | None = None,
            num_cpus: int | None = None, object_store_mb: int | None = None,
            progress_bars: bool | None = None, temp_dir: str | None = None) -> Iterator[pa.Table]:
    """Stream finished rows of all units through Ray Data (see the module docstring)."""
    if not units:
        return
    import ray.data

    init_ray(address, num_cpus=num_cpus, object_store_mb=object_store_mb, temp_dir=temp_dir)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty() if progress_bars is None else progress_bars
    ds = build_dataset(config, units)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
