"""The Ray executor: a Ray task per work unit, model steps on actor pools, the driver commits.

Ray's APIs are used here and in training/ray_train.py only (their arguments change between
releases, so each use lives in one place).

- Each unit runs as one task (curation/unit.py's UnitWorker): split and the CPU steps source
  by source, then the unit's rows through the later steps, then the unit's data files are
  written into OUT_DIR by the worker (a local path, or a filesystem mounted on every node).
  Only the ledger entry, a small record, travels back; the driver writes it last (the commit).
- A model step (`ray.actors` or `ray.num_gpus` set) runs on a pool of actors that each load
  the model once; unit tasks send it their rows in batches of its batch_size. `actors: N`
  pins the pool's size; `auto` or `{min, max}` lets it grow while units wait on it
  (PoolSizer), `auto` up to what the cluster's CPUs (or GPUs) and memory hold. A batch
  whose actor dies or overruns its time limit is retried source by source, once, on the
  restarted actor; rows that fail again get that stage's error column ("worker died ..." /
  "timed out ...").
- The driver keeps about two tasks per free CPU in flight (a task waiting on an actor gives
  its CPU back to Ray meanwhile) and commits each unit as its task returns, so commits stream.
- A task that dies (segfault, OOM kill, lost node) or runs past its source's time limit is
  retried. The unit's in-flight marker (OUT/inflight/<unit>.json) names the source it was on;
  a source that was in progress at `run.max_source_attempts` deaths is recorded as one
  failure row (worker_died / timed_out) and the rest of its unit runs again without it.

Without an address Ray starts an embedded local cluster; with one (`auto`, `ray://...` or
`host:port`) the same pipeline runs on an existing cluster. Every worker installs the
torchvision compatibility hook (curation.compat.worker_setup) before running anything.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
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
from stages.base import Batch, batch_len

log = logging.getLogger(__name__)

_STAGE_CACHE: dict[str, Any] = {}
DRIVER_GRACE_S = 30.0  # past a source's limit, the driver cancels a task its own timer missed
AUTO_ACTOR_MEMORY_BYTES = 2 * 1024**3  # what an "auto" pool counts per model actor (CPU models)
REGISTRY_REFRESH_S = 2.0  # how often a unit task looks for actors added to a growing pool


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
        self.stage = _stage_for(step)

    def run(self, batch: Batch) -> Batch:
        out = apply_step(self.step, self.stage, batch)
        return {k: v for k, v in out.items() if k not in batch or k in self.stage.outputs}

    def ready(self) -> bool:
        return True


@dataclass
class ActorPools:
    """The actor handles of every model step, passed to the unit tasks (handles pickle)."""

    actors: dict[str, list[Any]] = field(default_factory=dict)
    outputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    timeout_floor_s: float = 300.0
    timeout_per_row_s: float = 60.0
    wait_s: dict[str, float] = field(default_factory=dict)  # in a unit task: time spent waiting
    registry: Any = None  # a PoolRegistry actor: running tasks see actors added after they started
    max_size: dict[str, int] = field(default_factory=dict)
    refreshed_at: float = 0.0

    def __call__(self, step: Step, batch: Batch) -> Batch:
        """The rows through the step's actors, in batches of its batch_size.

        At its largest size a pool gets all of a unit's batches at once (round robin over its
        actors), so one unit's batches queue together and the unit finishes, and commits,
        without waiting for the other units in flight. While a pool can still grow, a unit keeps
        only as many batches queued as the pool has actors, so that an actor added meanwhile
        gets work from the next batch on instead of idling behind queues already assigned.
        A batch whose call fails is retried source by source (`isolate`).
        """
        started = time.perf_counter()
        parts = slices(batch, step.ray.batch_size)
        results: list[Batch] = [{} for _ in parts]
        pending: deque[tuple[int, tuple[Any, Any]]] = deque()
        offset = random.randrange(1 << 30)  # units start their round robin on different actors
        for i, part in enumerate(parts):
            while len(pending) >= self.window(step):
                j, call = pending.popleft()
                results[j] = self.result(step, parts[j], call, isolate=True)
            pending.append((i, self.submit(step, part, turn=offset + i)))
        for j, call in pending:
            results[j] = self.result(step, parts[j], call, isolate=True)
        self.wait_s[step.name] = self.wait_s.get(step.name, 0.0) + time.perf_counter() - started
        return concat_batches(results)

    def window(self, step: Step) -> int | float:
        size = len(self.current(step))
        return size if size < self.max_size.get(step.name, size) else float("inf")

    def current(self, step: Step) -> list[Any]:
        """The step's actors now (re-read from the registry every REGISTRY_REFRESH_S)."""
        if self.registry is not None and time.monotonic() - self.refreshed_at > REGISTRY_REFRESH_S:
            import ray

            self.actors = ray.get(self.registry.actors.remote())
            self.refreshed_at = time.monotonic()
        return self.actors[step.name]

    def timeout_for(self, batch: Batch) -> float:
        return self.timeout_floor_s + self.timeout_per_row_s * batch_len(batch)

    def submit(self, step: Step, batch: Batch, turn: int) -> tuple[Any, Any]:
        actors = self.current(step)
        actor = actors[turn % len(actors)]
        return actor, actor.run.remote(batch)

    def result(self, step: Step, batch: Batch, call: tuple[Any, Any], isolate: bool) -> Batch:
        """The batch with the stage's columns. On a dead or hung actor, with `isolate`, each
        source's rows are tried once more alone on the restarted actor (the batch may have
        failed for another batch's sake); rows that fail again get error rows."""
        import ray

        actor, ref = call
        timeout_s = self.timeout_for(batch)
        try:
            return {**batch, **ray.get(ref, timeout=timeout_s)}
        except Exception as exc:  # noqa: BLE001 - a dead or hung actor is recorded, not raised
            if isinstance(exc, ray.exceptions.GetTimeoutError):
                ray.kill(actor, no_restart=False)  # a hung model call: restart the actor
            reason = actor_failure(exc, timeout_s)
        sources = list(dict.fromkeys(batch["source_id"]))
        log.warning("step %s failed on a batch of %d rows (%s)%s", step.name, batch_len(batch), reason,
                    "; retrying source by source" if isolate else "")
        if not isolate:
            return self.error_rows(step, batch, reason)
        parts = [{k: [v for v, s in zip(vals, batch["source_id"]) if s == sid] for k, vals in batch.items()}
                 for sid in sources]
        done = []
        for part in parts:
            wait_alive(actor, self.timeout_floor_s)  # Ray restarts it; calls meanwhile fail
            done.append(self.result(step, part, (actor, actor.run.remote(part)), isolate=False))
        return concat_batches(done)

    def error_rows(self, step: Step, batch: Batch, reason: str) -> Batch:
        n = batch_len(batch)
        out = dict(batch)
        for name in self.outputs[step.name]:
            out.setdefault(name, [None] * n)
            if name == f"{step.stage}_error" or name == f"{step.name}_error":
                out[name] = [reason] * n
        return out


def wait_alive(actor: Any, timeout_s: float) -> None:
    """Wait until a (restarting) actor answers again, at most timeout_s."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=max(0.1, deadline - time.monotonic()))
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)


def actor_failure(exc: BaseException, timeout_s: float) -> str:
    import ray

    if isinstance(exc, ray.exceptions.GetTimeoutError):
        return f"timed out after {timeout_s:.0f} s"
    if isinstance(exc, (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)):
        return "worker died (model actor)"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


class PoolRegistry:
    """The current actors of every pool, for unit tasks that started before a pool grew."""

    def __init__(self):
        self.handles: dict[str, list[Any]] = {}

    def add(self, name: str, handle: Any) -> None:
        self.handles.setdefault(name, []).append(handle)

    def actors(self) -> dict[str, list[Any]]:
        return self.handles


@dataclass
class PoolSizer:
    """The driver's side of the model pools: each step's bounds and actor options, and growth.

    A pool starts at its minimum and gets one more actor (at most one per `grow_every_s`, up
    to its maximum) when more units in flight wait on it than it has actors (read from their
    in-flight markers every few seconds), or when a committed unit spent more than
    `grow_wait_share` of its time waiting on it. Actors' CPU reservations are scaled down when the
    pools at their maximum would leave no CPU for the unit tasks (logged).
    """

    pools: ActorPools
    bounds: dict[str, tuple[int, int]]
    make_actor: Callable[[str], Any]  # step name -> a new actor handle
    grow_wait_share: float = 0.3
    grow_every_s: float = 10.0
    last_grown: dict[str, float] = field(default_factory=dict)

    def add_actor(self, name: str) -> None:
        handle = self.make_actor(name)
        self.pools.actors.setdefault(name, []).append(handle)
        if self.pools.registry is not None:
            import ray

            ray.get(self.pools.registry.add.remote(name, handle))
        self.last_grown[name] = time.monotonic()

    def grow(self, name: str, why: str) -> None:
        size, (_, hi) = len(self.pools.actors[name]), self.bounds[name]
        if size < hi and time.monotonic() - self.last_grown.get(name, 0.0) >= self.grow_every_s:
            self.add_actor(name)
            log.info("step %s: %s; pool grown to %d of at most %d actors", name, why, size + 1, hi)

    def observe(self, entry: dict[str, Any]) -> None:
        """A committed unit's waits: grow the pools it spent much of its time waiting on."""
        wall = max(entry.get("unit_wall_s") or 0.0, 1e-6)
        for name, waited in (entry.get("model_wait_s") or {}).items():
            if waited / wall > self.grow_wait_share:
                self.grow(name, f"a unit waited {100 * waited / wall:.0f}% of its time on it")

    def waiting(self, counts: dict[str, int]) -> None:
        """Units in flight waiting on each step now (from their markers): more than actors, grow."""
        for name, n in counts.items():
            if name in self.bounds and n > len(self.pools.actors[name]):
                self.grow(name, f"{n} units wait on {len(self.pools.actors[name])} actor(s)")


def start_actor_pools(config: PipelineConfig, resources: dict[str, float]) -> PoolSizer:
    """Create each model step's pool at its minimum size (see PoolSizer)."""
    total_cpus = float(resources.get("CPU", 1.0))
    total_gpus = float(resources.get("GPU", 0.0))
    remote_steps = [s for s in config.steps if is_model_step(s)]
    # "auto" pools hold what the cluster's CPUs (GPUs) allow, and together at most half of
    # Ray's memory at AUTO_ACTOR_MEMORY_BYTES an actor.
    memory_cap = int(0.5 * float(resources.get("memory", 0.0))
                     / (max(1, len(remote_steps)) * AUTO_ACTOR_MEMORY_BYTES))
    bounds = {}
    for step in remote_steps:
        if step.ray.num_gpus:
            cap = int(total_gpus // step.ray.num_gpus)
        else:
            cap = min(int(total_cpus // max(step.ray.num_cpus, 0.01)), memory_cap)
        bounds[step.name] = pool_bounds(step.ray.actors, cap)
    demand = sum(bounds[s.name][1] * s.ray.num_cpus for s in remote_steps)
    unit_cpus = unit_task_cpus(config)
    scale = 1.0
    if demand and demand > total_cpus - unit_cpus:
        scale = max(0.01, (total_cpus - unit_cpus) / demand)
        log.warning("model actors at their largest ask for %.2g CPUs of %.2g; reserving %.0f%% of each "
                    "ask so that unit tasks can run", demand, total_cpus, 100 * scale)
    import ray

    pools = ActorPools(timeout_floor_s=config.run.source_timeout_floor_s,
                       timeout_per_row_s=config.run.model_timeout_per_row_s)
    if any(lo < hi for lo, hi in bounds.values()):
        pools.registry = ray.remote(PoolRegistry).options(num_cpus=0).remote()
    pools.max_size = {name: hi for name, (_, hi) in bounds.items()}
    options = {}
    for step in remote_steps:
        opts: dict[str, Any] = {"num_cpus": step.ray.num_cpus * scale, "max_restarts": -1,
                                "max_task_retries": 0}
        if step.ray.num_gpus:
            opts["num_gpus"] = step.ray.num_gpus
        options[step.name] = opts
        pools.outputs[step.name] = tuple(step.build().outputs)
    steps = {s.name: s for s in remote_steps}

    def make_actor(name: str):
        return ray.remote(StageActor).options(**options[name]).remote(steps[name])

    sizer = PoolSizer(pools, bounds, make_actor)
    for step in remote_steps:
        for _ in range(bounds[step.name][0]):
            sizer.add_actor(step.name)
        sizer.last_grown[step.name] = 0.0
        log.info("step %s: %d to %d actors", step.name, *bounds[step.name])
    return sizer


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

    guard = SourceGuard(store.inflight_dir / f"{unit.unit_id}.json", unit.unit_id, attempt,
                        config.run.source_timeout_floor_s, config.run.source_timeout_per_video_s,
                        node_id=ray.get_runtime_context().get_node_id())
    started = time.perf_counter()
    pools.wait_s = {}
    try:
        entry = worker.run(unit, store, guard=guard, failed=failed)
    finally:
        guard.leave()
    return {**entry, "attempts": attempt, "unit_wall_s": time.perf_counter() - started,
            "model_wait_s": dict(pools.wait_s)}


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


@dataclass
class InFlight:
    state: UnitState
    submitted: float
    cancelled_for_time: bool = False


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


class UnitScheduler:
    """Submits unit tasks, commits what returns, retries what died (see the module docstring)."""

    def __init__(self, config: PipelineConfig, units: list[Unit], store: OutputStore,
                 sizer: PoolSizer, max_in_flight: int):
        import ray

        self.config, self.store, self.sizer, self.pools = config, store, sizer, sizer.pools
        self.queue: deque[UnitState] = deque(UnitState(u) for u in units)
        self.in_flight: dict[Any, InFlight] = {}
        self.max_in_flight = max_in_flight
        self.task = ray.remote(unit_task).options(num_cpus=unit_task_cpus(config), max_retries=0)
        self.last_check = 0.0

    def run(self) -> Iterator[dict[str, Any]]:
        import ray

        while self.queue or self.in_flight:
            while self.queue and len(self.in_flight) < self.max_in_flight:
                self.submit(self.queue.popleft())
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                flight = self.in_flight.pop(ref)
                try:
                    entry = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    self.task_failed(flight, exc)
                    continue
                self.sizer.observe(entry)
                yield entry
            self.cancel_overdue()

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
        """Every 5 s, from the in-flight markers: cancel a task whose own timer did not end it,
        and grow the model pools that more units wait on than they have actors."""
        import ray

        now = time.time()
        if now - self.last_check < 5.0:
            return
        self.last_check = now
        waiting: dict[str, int] = {}
        for ref, flight in self.in_flight.items():
            m = self.marker(flight.state)
            if m is not None and m.get("model_step"):
                waiting[m["model_step"]] = waiting.get(m["model_step"], 0) + 1
            if (m is not None and m.get("phase") == "source" and not flight.cancelled_for_time
                    and now > m["started_at"] + m["limit_s"] + DRIVER_GRACE_S):
                log.warning("cancelling unit %s: %s ran past its %.0f s limit", flight.state.unit.unit_id,
                            m.get("source_path"), m["limit_s"])
                flight.cancelled_for_time = True
                ray.cancel(ref, force=True)
        self.sizer.waiting(waiting)


def run_ray(config: PipelineConfig, units: list[Unit], store: OutputStore, address: str | None = None,
            num_cpus: int | None = None, object_store_mb: int | None = None,
            temp_dir: str | None = None) -> Iterator[dict[str, Any]]:
    """Run every unit on Ray and yield each unit's ledger entry as it finishes (module docstring)."""
    if not units:
        return
    import ray

    init_ray(address, num_cpus=num_cpus, object_store_mb=object_store_mb, temp_dir=temp_dir)
    resources = ray.cluster_resources()
    total_cpus = float(resources.get("CPU", 1.0))
    sizer = start_actor_pools(config, resources)
    pools = sizer.pools
    try:
        for handles in pools.actors.values():
            ray.get([h.ready.remote() for h in handles])  # models load before units wait on them
        slots = max(1, int(total_cpus // max(unit_task_cpus(config), 0.01)))
        log.info("running %d units on %g CPUs, up to %d at a time; %d model step(s) on actors",
                 len(units), total_cpus, 2 * slots, len(pools.actors))
        yield from UnitScheduler(config, units, store, sizer, max_in_flight=2 * slots).run()
    finally:
        for handles in pools.actors.values():
            for h in handles:
                ray.kill(h)
        if pools.registry is not None:
            ray.kill(pools.registry)
