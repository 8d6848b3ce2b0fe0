"""The Ray executor: a Ray task per work unit, model steps on actor pools, the driver commits.

Ray's APIs are used here, in training/ray_train.py (Ray Train) and in training/study.py's
Ray runner (plain tasks); each use lives in one place, since their arguments change between
releases.

- Each unit runs as one task (curation/unit.py's UnitWorker): split and the CPU steps source
  by source, then the unit's rows through the later steps, then the unit's data files are
  written into OUT_DIR by the worker (a local path, or a filesystem mounted on every node).
  Only the ledger entry, a small record, travels back; the driver writes it last (the commit).
- A model step (`ray.actors` or `ray.num_gpus` set) runs on a pool of actors that each load
  the model once. Unit tasks send their rows, in batches of the step's batch_size, to the
  run's Dispatcher (a small async actor on the driver's node), which hands each batch to the
  first free actor of the step: the pools are shared by all units, and no batch waits behind
  another's queue while an actor is idle. `actors: N` pins a pool's size; `auto` or
  `{min, max}` lets it grow while batches wait for it (PoolSizer), `auto` up to what the
  cluster's CPUs (or GPUs) and memory hold. A batch whose actor dies or overruns its time
  limit is retried source by source, once, on the restarted actor; rows that fail again get
  that stage's error column ("worker died ..." / "timed out ...").
- The driver keeps about two tasks per free CPU in flight (a task waiting on an actor gives
  its CPU back to Ray meanwhile) and commits each unit as its task returns, so commits stream.
  Every 10 s it logs each step's rows/s and busy share, and the busiest step (StepMonitor).
- A task that dies (segfault, OOM kill, lost node) or runs past its source's time limit is
  retried. The unit's in-flight marker (OUT/inflight/<unit>.json) names the source it was on;
  a source that was in progress at `run.max_source_attempts` deaths is recorded as one
  failure row (worker_died / timed_out) and the rest of its unit runs again without it.

Without an address Ray starts an embedded local cluster; with one (`auto`, `ray://...` or
`host:port`) the same pipeline runs on an existing cluster. Every worker installs the
torchvision compatibility hook and the redaction of its output (stages/worker.py) before
running anything.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import pickle
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from curation.config import PipelineConfig, Step, pool_bounds
from curation.sources import Unit
from curation.unit import (
    SourceGuard,
    UnitWorker,
    apply_step,
    concat_batches,
    is_model_step,
    slices,
)
from curation.writer import OutputStore
from stages import instrument, storage
from stages.base import Batch, batch_len

log = logging.getLogger(__name__)

_STAGE_CACHE: dict[str, Any] = {}
DRIVER_GRACE_S = 30.0  # past a source's limit, the driver cancels a task its own timer missed
ACTOR_RESTART_WAIT_S = 600.0  # a restarting model actor (a new process loading its model) gets this long
AUTO_ACTOR_MEMORY_BYTES = 2 * 1024**3  # what an "auto" pool counts per model actor (CPU models)


def _stage_for(step: Step):
    """The stage object of this step in this worker process (built and set up once)."""
    key = f"{step.name}:{step.stage}:{sorted(step.args.items())!r}"
    stage = _STAGE_CACHE.get(key)
    if stage is None:
        stage = step.build()
        _torch_threads(step.ray.num_cpus)
        stage.setup()
        _STAGE_CACHE[key] = stage
    return stage


def _torch_threads(num_cpus: float) -> None:
    # Ray workers start with one thread; let torch use the CPUs the step reserved.
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(max(1, int(num_cpus)))


# ---- model steps on actor pools -----------------------------------------------------------------

class StageActor:
    """One model step's stage, set up once; returns only the columns the stage adds."""

    def __init__(self, step: Step):
        self.step = step
        try:
            self.stage = _stage_for(step)
        except Exception as exc:  # noqa: BLE001 - said once, by the driver, with the step's name
            raise ModelSetupError(f"step {step.name}: {type(exc).__name__}: {exc}") from exc

    def run(self, batch: Batch) -> Batch:
        out = apply_step(self.step, self.stage, batch)
        return {k: v for k, v in out.items() if k not in batch or k in self.stage.outputs}

    def ready(self) -> bool:
        return True

    def model_loads(self) -> int:
        """Models this actor's process has loaded (stages/instrument; one per set-up)."""
        return int(instrument.counts("model_load")[self.step.name])

    def placement(self) -> dict[str, Any]:
        """Where this actor runs: the GPUs Ray gave it (its CUDA_VISIBLE_DEVICES) and the
        device its stage resolved (`device: auto` is the CPU where torch sees no GPU)."""
        import ray

        return {"gpu_ids": [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "device": getattr(self.stage, "device_used", None)}


class ModelSetupError(ValueError):
    """A model step's actors could not set up their stage (missing weights, a device that
    is not there): the run stops, with the step and the setting named (exit 2)."""


@dataclass
class ActorPools:
    """A unit task's side of the model steps: its rows go to the run's Dispatcher, in batches of
    each step's batch_size (this object pickles into every unit task)."""

    dispatcher: Any = None
    outputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    wait_s: dict[str, float] = field(default_factory=dict)  # in a unit task: time spent waiting
    sent_bytes: dict[str, int] = field(default_factory=dict)  # in a unit task: rows' pickled size

    def __call__(self, step: Step, batch: Batch) -> Batch:
        """The rows through the step's actors. All of a unit's batches are queued at once, so
        the unit finishes (and commits) without waiting behind units submitted after it. A
        batch that fails (its actor died or overran) is retried source by source, once: the
        batch may have failed for another source's sake."""
        started = time.perf_counter()
        parts = slices(batch, step.ray.batch_size)
        calls = [self.submit(step, part) for part in parts]
        results = [self.result(step, part, call, isolate=True) for part, call in zip(parts, calls)]
        self.wait_s[step.name] = self.wait_s.get(step.name, 0.0) + time.perf_counter() - started
        return concat_batches(results)

    def submit(self, step: Step, batch: Batch) -> Any:
        import ray

        # What travels through the object store for this step (sample frames never do).
        self.sent_bytes[step.name] = self.sent_bytes.get(step.name, 0) + len(pickle.dumps(batch, protocol=5))
        # In a list, so that the dispatcher forwards the reference and never holds the rows.
        return self.dispatcher.run.remote(step.name, [ray.put(batch)], batch_len(batch))

    def result(self, step: Step, batch: Batch, call: Any, isolate: bool) -> Batch:
        import ray

        answer = ray.get(call)
        if "error" not in answer:
            return {**batch, **answer["out"]}
        reason = answer["error"]
        log.warning("step %s failed on a batch of %d rows (%s)%s", step.name, batch_len(batch), reason,
                    "; retrying source by source" if isolate else "")
        if not isolate:
            return self.error_rows(step, batch, reason)
        sources = list(dict.fromkeys(batch["source_id"]))
        parts = [{k: [v for v, s in zip(vals, batch["source_id"]) if s == sid] for k, vals in batch.items()}
                 for sid in sources]
        calls = [self.submit(step, part) for part in parts]
        return concat_batches([self.result(step, part, c, isolate=False) for part, c in zip(parts, calls)])

    def error_rows(self, step: Step, batch: Batch, reason: str) -> Batch:
        n = batch_len(batch)
        out = dict(batch)
        for name in self.outputs[step.name]:
            out.setdefault(name, [None] * n)
            if name == f"{step.stage}_error" or name == f"{step.name}_error":
                out[name] = [reason] * n
        return out


class Dispatcher:
    """Every model step's actors, and the batches of all unit tasks waiting for them (an async
    Ray actor, one per run, on the driver's node).

    A batch goes to the first actor of its step that is free (`calls_per_actor` calls at a
    time; 1 keeps a CPU actor from queueing work that a free actor could take), so one slow
    batch never holds up others behind it, and an actor added to a growing pool takes the
    next waiting batch at once. A call is cut at `timeout_floor_s + timeout_per_row_s` x rows
    (the actor is restarted); a failed actor rejoins once it answers again. `stats()` gives
    the queue, the busy time and the rows of each step: the driver grows pools and reports
    the bottleneck from them.
    """

    def __init__(self, timeout_floor_s: float, timeout_per_row_s: float):
        self.timeout_floor_s, self.timeout_per_row_s = timeout_floor_s, timeout_per_row_s
        self.free: dict[str, Any] = {}  # step -> asyncio.Queue of actor handles (one per call slot)
        self.counts: dict[str, dict[str, float]] = {}
        self.running: dict[str, dict[int, float]] = {}  # step -> call number -> started (monotonic)
        self.calls = 0

    def add(self, name: str, handle: Any, calls_per_actor: int = 1) -> None:
        import asyncio

        queue = self.free.setdefault(name, asyncio.Queue())
        c = self.counts.setdefault(name, {"actors": 0, "slots": 0, "queued": 0, "rows": 0, "batches": 0,
                                          "failed": 0, "busy_s": 0.0})
        c["actors"] += 1
        c["slots"] += calls_per_actor
        for _ in range(calls_per_actor):
            queue.put_nowait(handle)

    async def run(self, name: str, refs: list[Any], rows: int) -> dict[str, Any]:
        import asyncio

        import ray

        c = self.counts[name]
        c["queued"] += 1
        actor = await self.free[name].get()
        c["queued"] -= 1
        timeout_s = self.timeout_floor_s + self.timeout_per_row_s * rows
        started = time.monotonic()
        self.calls += 1
        call = self.calls
        self.running.setdefault(name, {})[call] = started
        try:
            out = await asyncio.wait_for(actor.run.remote(refs[0]), timeout_s)
            c["rows"] += rows
            c["batches"] += 1
            self.free[name].put_nowait(actor)
            return {"out": out}
        except Exception as exc:  # noqa: BLE001 - a dead or hung actor is the batch's error
            if isinstance(exc, asyncio.TimeoutError):
                ray.kill(actor, no_restart=False)  # a hung model call: restart the actor
            c["failed"] += 1
            asyncio.get_running_loop().create_task(self.rejoin(name, actor))
            return {"error": actor_failure(exc, timeout_s)}
        finally:
            c["busy_s"] += time.monotonic() - started
            del self.running[name][call]

    async def rejoin(self, name: str, actor: Any) -> None:
        """Back in the pool once the (restarted) actor answers, or after ACTOR_RESTART_WAIT_S."""
        import asyncio

        deadline = time.monotonic() + ACTOR_RESTART_WAIT_S
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(actor.ready.remote(), max(0.1, deadline - time.monotonic()))
                break
            except Exception:  # noqa: BLE001 - still restarting
                await asyncio.sleep(0.5)
        self.free[name].put_nowait(actor)

    def stats(self) -> dict[str, dict[str, float]]:
        """Per step: actors, queued and running batches, rows and batches done, failed calls,
        and busy actor-seconds so far (calls in progress included)."""
        now = time.monotonic()
        running = {name: list(self.running.get(name, {}).values()) for name in self.counts}
        return {name: {**c, "running": len(running[name]),
                       "busy_s": c["busy_s"] + sum(now - t for t in running[name])}
                for name, c in self.counts.items()}


def actor_failure(exc: BaseException, timeout_s: float) -> str:
    import asyncio

    import ray

    if isinstance(exc, (asyncio.TimeoutError, ray.exceptions.GetTimeoutError)):
        return f"timed out after {timeout_s:.0f} s"
    if isinstance(exc, (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)):
        return "worker died (model actor)"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


@dataclass
class PoolSizer:
    """The driver's side of the model pools: each step's bounds, its actors, and growth.

    A pool starts with one actor per unit task that can run at once, within its bounds
    (`starting_size`: a run with work for every actor loads them all at the start, in
    parallel, instead of one at a time as batches pile up; a one-source run loads one). It
    gets one more actor (at most one per `grow_every_s`, up to its maximum) when batches have
    been waiting for a free actor of it at two checks in a row (the dispatcher's queue, read
    every few seconds). What each actor reserves is `actor_cpus`'s.
    """

    pools: ActorPools
    bounds: dict[str, tuple[int, int]]
    make_actor: Callable[[str], Any]  # step name -> a new actor handle
    add_to_dispatcher: Callable[[str, Any], Any] = lambda name, handle: None
    grow_every_s: float = 10.0
    actors: dict[str, list[Any]] = field(default_factory=dict)
    last_grown: dict[str, float] = field(default_factory=dict)
    queued_before: dict[str, float] = field(default_factory=dict)

    def add_actor(self, name: str) -> None:
        handle = self.make_actor(name)
        self.actors.setdefault(name, []).append(handle)
        self.add_to_dispatcher(name, handle)
        self.last_grown[name] = time.monotonic()

    def grow(self, name: str, why: str) -> None:
        size, (_, hi) = len(self.actors[name]), self.bounds[name]
        if size < hi and time.monotonic() - self.last_grown.get(name, 0.0) >= self.grow_every_s:
            self.add_actor(name)
            log.info("step %s: %s; pool grown to %d of at most %d actors", name, why, size + 1, hi)

    def check(self, stats: dict[str, dict[str, float]]) -> None:
        """Grow the pools whose batches wait for a free actor now and at the previous check."""
        for name, c in stats.items():
            queued = c.get("queued", 0)
            if name in self.bounds and queued > 0 and self.queued_before.get(name, 0) > 0:
                self.grow(name, f"{queued:.0f} batches wait for one of its {len(self.actors[name])} actor(s)")
            self.queued_before[name] = queued


def starting_size(bounds: tuple[int, int], busy_units: int) -> int:
    """Actors a pool starts with: one per unit task running at once, within its bounds."""
    lo, hi = bounds
    return min(hi, max(lo, busy_units))


def start_actor_pools(config: PipelineConfig, resources: dict[str, float], busy_units: int = 1) -> PoolSizer:
    """The run's Dispatcher and each model step's pool at its starting size (see PoolSizer);
    `busy_units` is how many unit tasks will run at once."""
    total_cpus = float(resources.get("CPU", 1.0))
    remote_steps = [s for s in config.steps if is_model_step(s)]
    bounds = pools_bounds(config, resources)
    reserved = actor_cpus(remote_steps, bounds, total_cpus, unit_task_cpus(config))
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    dispatcher = None
    if remote_steps:
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        dispatcher = ray.remote(Dispatcher).options(num_cpus=0, scheduling_strategy=here).remote(
            config.run.source_timeout_floor_s, config.run.model_timeout_per_row_s)
    pools = ActorPools(dispatcher=dispatcher)
    options = {}
    for step in remote_steps:
        opts: dict[str, Any] = {"num_cpus": reserved[step.name], "max_restarts": -1,
                                "max_task_retries": 0}
        if step.ray.num_gpus:
            opts["num_gpus"] = step.ray.num_gpus
        options[step.name] = opts
        pools.outputs[step.name] = tuple(step.build().outputs)
    steps = {s.name: s for s in remote_steps}

    def make_actor(name: str):
        return ray.remote(StageActor).options(**options[name]).remote(steps[name])

    def add_to_dispatcher(name: str, handle: Any) -> None:
        # GPU actors get two calls at a time, so the next batch is ready when one ends.
        ray.get(dispatcher.add.remote(name, handle, 2 if steps[name].ray.num_gpus else 1))

    sizer = PoolSizer(pools, bounds, make_actor, add_to_dispatcher)
    for step in remote_steps:
        start = starting_size(bounds[step.name], busy_units)
        for _ in range(start):
            sizer.add_actor(step.name)
        sizer.last_grown[step.name] = 0.0
        log.info("step %s: %d to %d actors, starting with %d", step.name, *bounds[step.name], start)
    return sizer


def pools_bounds(config: PipelineConfig, resources: dict[str, float]) -> dict[str, tuple[int, int]]:
    """(min, max) actors of each model step's pool on a cluster with these resources. An
    "auto" pool holds what the cluster's GPUs allow (a step with num_gpus: 0.25 gets 4 actors
    per GPU) or, on CPUs, what its CPUs allow and, with the other pools, at most half of Ray's
    memory at AUTO_ACTOR_MEMORY_BYTES an actor."""
    total_cpus = float(resources.get("CPU", 1.0))
    total_gpus = float(resources.get("GPU", 0.0))
    remote_steps = [s for s in config.steps if is_model_step(s)]
    memory_cap = int(0.5 * float(resources.get("memory", 0.0))
                     / (max(1, len(remote_steps)) * AUTO_ACTOR_MEMORY_BYTES))
    bounds = {}
    for step in remote_steps:
        if step.ray.num_gpus:
            if total_gpus < step.ray.num_gpus:  # its actors would wait for a GPU forever
                raise ModelSetupError(
                    f"step {step.name}: {step.name}.ray.num_gpus={step.ray.num_gpus:g} but the Ray cluster "
                    f"has {total_gpus:g} GPUs: set {step.name}.ray.num_gpus=0 to run it on CPUs, or start "
                    "the cluster's GPU nodes first (--num-gpus N declares the embedded cluster's)")
            cap = int(total_gpus // step.ray.num_gpus)
        else:
            cap = min(int(total_cpus // max(step.ray.num_cpus, 0.01)), memory_cap)
        bounds[step.name] = pool_bounds(step.ray.actors, cap)
    return bounds


def actor_cpus(steps: list[Step], bounds: dict[str, tuple[int, int]], total_cpus: float,
               unit_cpus: float) -> dict[str, float]:
    """The CPUs each model actor reserves: its step's num_cpus, scaled down when the pools at
    their largest would leave less than one unit task's CPUs free (to 0 when nothing is left,
    e.g. on one CPU: the actors then run on the CPU the unit tasks lend while they wait).
    Rounded down to Ray's resolution, so the sum never exceeds what is left."""
    demand = sum(bounds[s.name][1] * s.ray.num_cpus for s in steps)
    left = max(0.0, total_cpus - unit_cpus)
    scale = 1.0
    if demand > left:
        scale = left / demand
        log.warning("model actors at their largest ask for %.2g CPUs of %.2g; reserving %.0f%% of each "
                    "ask so that unit tasks can run", demand, total_cpus, 100 * scale)
    return {s.name: math.floor(s.ray.num_cpus * scale * 1000) / 1000 for s in steps}


def unit_task_cpus(config: PipelineConfig) -> float:
    return max([s.ray.num_cpus for s in config.steps if not is_model_step(s)] or [1.0])


# ---- the unit task ------------------------------------------------------------------------------

_WORKERS: dict[str, UnitWorker] = {}


def unit_task(config: PipelineConfig, unit: Unit, out_dir: str, attempt: int,
              failed: dict[str, tuple[str, str]], pools: ActorPools) -> dict[str, Any]:
    """Runs on a worker: the whole unit, its data files written here; returns its ledger entry."""
    key = config.fingerprint()
    worker = _WORKERS.get(key)
    if worker is None:
        worker = _WORKERS[key] = UnitWorker(config, _stage_for, remote=pools)
    worker.remote = pools
    store = OutputStore(out_dir)
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    guard = SourceGuard(store.inflight_dir / f"{unit.unit_id}.json", unit.unit_id, attempt,
                        config.run.source_timeout_floor_s, config.run.source_timeout_per_video_s,
                        node_id=node_id)
    started = time.perf_counter()
    pools.wait_s, pools.sent_bytes = {}, {}
    try:
        entry = worker.run(unit, store, guard=guard, failed=failed)
    finally:
        guard.leave()
    # The node that ran the unit, and so wrote its files.
    return {**entry, "attempts": attempt, "unit_wall_s": time.perf_counter() - started,
            "model_wait_s": dict(pools.wait_s), "model_sent_bytes": dict(pools.sent_bytes), "node_id": node_id,
            "node_ip": ray.util.get_node_ip_address()}


def death_cause(exc: BaseException) -> str:
    """A short cause for a failed unit task: what Ray says ended it."""
    import ray

    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return "out of memory, killed by Ray's memory monitor"
    if isinstance(exc, ray.exceptions.NodeDiedError):
        return "its node was lost"
    if isinstance(exc, ray.exceptions.WorkerCrashedError):
        return "the process ended: a native crash, a kill signal or the OOM killer"
    if isinstance(exc, ray.exceptions.TaskCancelledError):
        return "cancelled"
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:200] if str(cause).strip() else ''}"
    return type(exc).__name__


# ---- the driver ---------------------------------------------------------------------------------

@dataclass
class UnitState:
    unit: Unit
    attempt: int = 0
    deaths: dict[str, list[str]] = field(default_factory=dict)  # source_id -> reasons
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # source_id -> (reason, status)
    unattributed: int = 0
    store_failures: int = 0  # attempts that ended because the object store kept failing


@dataclass
class InFlight:
    state: UnitState
    submitted: float
    cancelled_for_time: bool = False


def init_ray(address: str | None, num_cpus: int | None = None,
             object_store_mb: int | None = None, temp_dir: str | None = None,
             num_gpus: int | None = None) -> None:
    """Start the embedded cluster (`address` None: always a new one, never a cluster that
    `ray start` left on this machine) or connect to `address`. `num_gpus` declares the
    embedded cluster's GPUs (default: those Ray detects)."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"worker_process_setup_hook": "stages.worker.setup"}
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "logging_level": logging.WARNING,
                              "log_to_driver": True}
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs.update(address="local", include_dashboard=False, num_cpus=num_cpus)
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
        if object_store_mb:
            kwargs["object_store_memory"] = int(object_store_mb) * 1024 * 1024
        if temp_dir:
            kwargs["_temp_dir"] = temp_dir
        log.info("starting an embedded Ray cluster (num_cpus=%s, num_gpus=%s)", num_cpus or "all",
                 "detected" if num_gpus is None else num_gpus)
    else:
        kwargs["address"] = address
        log.info("connecting to the Ray cluster at %s", address)
    ray.init(**kwargs)


class UnitScheduler:
    """Submits unit tasks, commits what returns, retries what died (see the module docstring)."""

    def __init__(self, config: PipelineConfig, units: Iterable[Unit], store: OutputStore,
                 sizer: PoolSizer, slots: int, driver_grace_s: float = DRIVER_GRACE_S):
        import ray

        self.config, self.store, self.sizer, self.pools = config, store, sizer, sizer.pools
        self.driver_grace_s = driver_grace_s
        self.feed: Iterator[Unit] | None = iter(units)  # new units, taken as slots free up
        self.queue: deque[UnitState] = deque()  # units to try again, before new ones
        self.in_flight: dict[Any, InFlight] = {}
        self.max_in_flight = 2 * slots  # a task waiting on a model actor lends Ray its CPU
        self.task = ray.remote(unit_task).options(num_cpus=unit_task_cpus(config), max_retries=0)
        self.last_check = 0.0
        self.monitor = StepMonitor(config, slots)

    def run(self) -> Iterator[dict[str, Any]]:
        import ray

        while self.queue or self.in_flight or self.feed is not None:
            while len(self.in_flight) < self.max_in_flight and (state := self.next_unit()) is not None:
                self.submit(state)
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                flight = self.in_flight.pop(ref)
                try:
                    entry = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    self.task_failed(flight, exc)
                    continue
                self.monitor.observe(entry)
                yield entry
            self.cancel_overdue()
        self.monitor.report(self.model_stats(), running=0, force=True)

    def model_stats(self) -> dict[str, dict[str, float]]:
        import ray

        return ray.get(self.pools.dispatcher.stats.remote()) if self.pools.dispatcher is not None else {}

    def next_unit(self) -> UnitState | None:
        """A unit to try again, else the next one planned (the listing goes on meanwhile)."""
        if self.queue:
            return self.queue.popleft()
        if self.feed is not None:
            unit = next(self.feed, None)
            if unit is not None:
                return UnitState(unit)
            self.feed = None
        return None

    def submit(self, state: UnitState) -> None:
        state.attempt += 1
        ref = self.task.remote(self.config, state.unit, str(self.store.root), state.attempt,
                               dict(state.failed), self.pools)
        self.in_flight[ref] = InFlight(state, time.time())

    def marker(self, state: UnitState) -> dict[str, Any] | None:
        path = self.store.inflight_dir / f"{state.unit.unit_id}.json"
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return m if m.get("attempt") == state.attempt else None

    def task_failed(self, flight: InFlight, exc: BaseException) -> None:
        import ray

        state = flight.state
        # The worker's whole traceback, chained exceptions included, for the run's log file.
        log.debug("unit %s attempt %d failed", state.unit.unit_id, state.attempt, exc_info=exc)
        cause = getattr(exc, "cause", None)
        if isinstance(cause, storage.StoreUnavailable):
            # The store, not a source: try the unit again (an outage may pass), then stop the
            # run (exit 1) rather than record its sources as failed.
            state.store_failures += 1
            if state.store_failures > self.config.run.max_source_attempts:
                raise storage.StoreUnavailable(str(cause))
            log.warning("unit %s attempt %d: %s (trying again)", state.unit.unit_id, state.attempt, cause)
            self.queue.append(state)
            return
        m = self.marker(state)
        kind = death_cause(exc)
        if m is not None and m.get("phase") == "source":
            elapsed = time.time() - m["started_at"]
            timed_out = flight.cancelled_for_time or elapsed >= m["limit_s"] - 1.0
            raised = isinstance(exc, ray.exceptions.RayTaskError)
            reason = (f"timed out after {m['limit_s']:.0f} s" if timed_out
                      else f"worker raised {kind}" if raised else f"worker died ({kind})")
            sid = m["source_id"]
            state.deaths.setdefault(sid, []).append(reason)
            n = len(state.deaths[sid])
            log.warning("unit %s attempt %d: %s on %s (%d of %d attempts)", state.unit.unit_id,
                        state.attempt, reason, m.get("source_path"), n, self.config.run.max_source_attempts)
            if n >= self.config.run.max_source_attempts:
                status = "timed_out" if timed_out else "worker_died"
                state.failed[sid] = (f"{reason}; {n} attempts", status)
        else:
            # Died outside any one source (model loading, writing, a lost node between sources).
            state.unattributed += 1
            log.warning("unit %s attempt %d failed outside a source: %s", state.unit.unit_id,
                        state.attempt, kind)
            if state.unattributed > self.config.run.max_source_attempts:
                for source in state.unit.sources:
                    state.failed.setdefault(source.source_id, (
                        f"worker died {state.unattributed} times outside any one source ({kind})",
                        "worker_died"))
        self.queue.append(state)

    def cancel_overdue(self) -> None:
        """Every 5 s: cancel a task whose own timer did not end it (from the in-flight markers),
        grow the model pools that batches wait on, and (every 10 s) log the steps' progress."""
        import ray

        now = time.time()
        if now - self.last_check < 5.0:
            return
        self.last_check = now
        stats = self.model_stats()
        self.sizer.check(stats)
        self.monitor.report(stats, running=len(self.in_flight))
        for ref, flight in self.in_flight.items():
            m = self.marker(flight.state)
            if (m is not None and m.get("phase") == "source" and not flight.cancelled_for_time
                    and now > m["started_at"] + m["limit_s"] + self.driver_grace_s):
                log.warning("cancelling unit %s: %s ran past its %.0f s limit", flight.state.unit.unit_id,
                            m.get("source_path"), m["limit_s"])
                flight.cancelled_for_time = True
                ray.cancel(ref, force=True)


class StepMonitor:
    """The progress of each step and which one holds the run back, logged every `every_s`.

    A step's rows/s is its rows done over the elapsed time; its busy share is the time its
    workers spent in it over the time they had: actor-seconds over actors x elapsed for a
    model step (from the dispatcher, live), stage seconds of the committed units over unit
    slots x elapsed for a step run inside the unit tasks. The bottleneck is the busiest step.
    """

    def __init__(self, config: PipelineConfig, slots: int, every_s: float = 10.0):
        self.steps = [(s.name, is_model_step(s)) for s in config.steps]
        self.slots, self.every_s = slots, every_s
        self.started = time.monotonic()
        self.last_log = 0.0
        self.rows = 0
        self.busy_s: dict[str, float] = {}

    def observe(self, entry: dict[str, Any]) -> None:
        self.rows += entry.get("clips", 0)
        for name, seconds in entry.get("stage_seconds", {}).items():
            self.busy_s[name] = self.busy_s.get(name, 0.0) + seconds

    def shares(self, stats: dict[str, dict[str, float]]) -> dict[str, tuple[float, float, str]]:
        """step -> (rows/s, busy share, detail)."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        out = {}
        for name, remote in self.steps:
            c = stats.get(name)
            if remote and c:
                share = c["busy_s"] / (max(c["actors"], 1) * elapsed)
                detail = f"{c['actors']:.0f} actors, {c['queued']:.0f} batches queued"
                out[name] = (c["rows"] / elapsed, share, detail)
            else:
                out[name] = (self.rows / elapsed, self.busy_s.get(name, 0.0) / (self.slots * elapsed), "")
        return out

    def report(self, stats: dict[str, dict[str, float]], running: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_log < self.every_s:
            return
        self.last_log = now
        shares = self.shares(stats)
        parts = [f"{name} {rate:.2f} rows/s {100 * share:.0f}% busy" + (f" ({detail})" if detail else "")
                 for name, (rate, share, detail) in shares.items()]
        worst = max(shares, key=lambda n: shares[n][1]) if shares else "-"
        log.info("steps: %s | %d units running | bottleneck: %s", "; ".join(parts), running, worst)


def pool_summary(sizer: PoolSizer, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """Per model step at the end of an attempt: actors started, models their processes loaded
    (null where an actor does not answer), batches and rows done, failed calls (run.json)."""
    import ray

    stats = ray.get(sizer.pools.dispatcher.stats.remote()) if sizer.pools.dispatcher is not None else {}
    summary = {}
    for name, handles in sizer.actors.items():
        try:
            loads: int | None = sum(ray.get([h.model_loads.remote() for h in handles], timeout=timeout_s))
        except Exception as exc:  # noqa: BLE001 - a dead or hung actor: the count is unknown
            log.warning("step %s: could not read its actors' model loads (%s)", name, exc)
            loads = None
        try:
            placements = ray.get([h.placement.remote() for h in handles], timeout=timeout_s)
        except Exception:  # noqa: BLE001 - as above
            placements = []
        c = stats.get(name, {})
        summary[name] = {"actors": len(handles), "model_loads": loads, "batches": int(c.get("batches", 0)),
                         "rows": int(c.get("rows", 0)), "failed_calls": int(c.get("failed", 0)),
                         "call_slots": int(c.get("slots", 0)),
                         "devices": dict(Counter(str(p["device"]) for p in placements)),
                         "gpu_ids": sorted({g for p in placements for g in p["gpu_ids"]})}
    return summary


def setup_failure(name: str, exc: BaseException) -> str:
    """What a model actor that died while setting up said (its ModelSetupError's line)."""
    lines = [line.strip() for line in str(exc).splitlines() if f"step {name}:" in line]
    if lines:
        return lines[-1][lines[-1].index(f"step {name}:"):]
    return f"step {name}: its actors could not start ({death_cause(exc)})"


def on_cluster(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) as one task on the Ray cluster the run used (here when Ray is not running):
    the end of a run (its final pass, its compaction) reads and writes every unit's files, and
    belongs on a worker, not in the driver's process. `fn` is a module-level function."""
    import ray

    if not ray.is_initialized():
        return fn(*args)
    log.info("%s on the cluster", fn.__name__.replace("_", " "))
    return ray.get(ray.remote(fn).options(num_cpus=1, max_retries=0).remote(*args))


def run_ray(config: PipelineConfig, units: Iterable[Unit], store: OutputStore, address: str | None = None,
            num_cpus: int | None = None, object_store_mb: int | None = None,
            temp_dir: str | None = None, num_gpus: int | None = None,
            driver_grace_s: float = DRIVER_GRACE_S) -> Generator[dict[str, Any], None, dict[str, Any]]:
    """Run every unit on Ray and yield each unit's ledger entry as it finishes (module docstring);
    returns what the attempt's record keeps of it (`pool_summary`).

    `driver_grace_s`: how long past a source's limit the driver waits before it cancels a task
    whose own timer missed (a backstop; an execution setting, not in the config fingerprint).
    Tests raise it to show that the worker's own timer ends a hung source."""
    units = iter(units)
    first = next(units, None)  # nothing to do (everything committed): no cluster started
    if first is None:
        return
    import ray

    init_ray(address, num_cpus=num_cpus, object_store_mb=object_store_mb, temp_dir=temp_dir, num_gpus=num_gpus)
    resources = ray.cluster_resources()
    total_cpus = float(resources.get("CPU", 1.0))
    slots = max(1, int(total_cpus // max(unit_task_cpus(config), 0.01)))
    head = [first, *itertools.islice(units, slots - 1)]  # a short run starts no more actors than units
    units = itertools.chain(head, units)
    sizer = start_actor_pools(config, resources, busy_units=len(head))
    try:
        for name, handles in sizer.actors.items():  # models load before units wait on them
            try:
                ray.get([h.ready.remote() for h in handles])
            except ray.exceptions.RayActorError as exc:
                raise ModelSetupError(setup_failure(name, exc)) from None
        log.info("running units on %g CPUs, up to %d at a time; %d model step(s) on actors",
                 total_cpus, 2 * slots, len(sizer.actors))
        yield from UnitScheduler(config, units, store, sizer, slots, driver_grace_s).run()
        return {"model_pools": pool_summary(sizer)}
    finally:
        for handles in sizer.actors.values():
            for h in handles:
                ray.kill(h)
        if sizer.pools.dispatcher is not None:
            ray.kill(sizer.pools.dispatcher)
