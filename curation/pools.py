"""Model steps on actor pools: each model step's actors, the run's Dispatcher, and their sizes.

A model step (`ray.actors` or `ray.num_gpus` set) runs on a pool of actors that each load
the model once. Unit tasks send their rows, in batches of the step's batch_size, to the
run's Dispatcher (a small async actor on the driver's node), which hands each batch to the
first free actor of the step: the pools are shared by all units, and no batch waits behind
another's queue while an actor is idle. `actors: N` pins a pool's size; `auto` or
`{min, max}` lets it grow while batches wait for it (PoolSizer), `auto` up to what the
cluster's CPUs (or GPUs) and memory hold. A batch whose actor dies or overruns its time
limit is retried source by source, once, on the restarted actor; rows that fail again get
that stage's error column ("worker died ..." / "timed out ...").

The Ray executor (curation/pipeline.py) starts the pools (`start_actor_pools`), grows them
(PoolSizer, from the driver's periodic check) and records them (`pool_summary`); its unit
tasks send their rows through ActorPools.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from curation.config import PipelineConfig, Step, pool_bounds
from curation.unit import apply_step, concat_batches, even_slices, is_model_step
from stages import instrument
from stages.base import Batch, batch_len

log = logging.getLogger(__name__)

_STAGE_CACHE: dict[str, Any] = {}
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
        the unit finishes (and commits) without waiting behind units submitted after it; they
        are of even sizes (`even_slices`), so none holds the unit up much longer than another. A
        batch that fails (its actor died or overran) is retried source by source, once: the
        batch may have failed for another source's sake."""
        started = time.perf_counter()
        parts = even_slices(batch, step.ray.batch_size)
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

