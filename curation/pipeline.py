"""The Ray executor: a Ray task per work unit, model steps on actor pools, the driver commits.

Ray's APIs are used here and in curation/pools.py (the model steps' actor pools), in
training/ray_train.py (Ray Train) and in training/study/runs.py's Ray runner (plain tasks);
each use lives in one place, since their arguments change between releases.

- Each unit runs as one task (curation/unit.py's UnitWorker): split and the CPU steps source
  by source, then the unit's rows through the later steps, then the unit's data files are
  written into OUT_DIR by the worker (a local path, or a filesystem mounted on every node).
  Only the ledger entry, a small record, travels back; the driver writes it last (the commit).
- A model step (`ray.actors` or `ray.num_gpus` set) runs on a pool of actors that each load
  the model once, shared by all units (curation/pools.py: the run's Dispatcher hands each
  batch to the first free actor of its step; PoolSizer grows the pools).
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
import os
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from curation.config import PipelineConfig
from curation.pools import (
    ActorPools,
    ModelSetupError,
    PoolSizer,
    _stage_for,
    actor_cpus,  # noqa: F401 - re-exported: tests import it from here
    pool_summary,
    start_actor_pools,
    starting_size,  # noqa: F401 - re-exported: tests import it from here
    unit_task_cpus,
)
from curation.sources import Unit
from curation.unit import SourceGuard, UnitClock, UnitWorker, is_model_step
from curation.writer import OutputStore
from stages import storage

log = logging.getLogger(__name__)

DRIVER_GRACE_S = 30.0  # past a source's limit, the driver cancels a task its own timer missed


# ---- the unit task ------------------------------------------------------------------------------

_WORKERS: dict[str, UnitWorker] = {}


def unit_task(config: PipelineConfig, unit: Unit, out_dir: str, attempt: int,
              failed: dict[str, tuple[str, str]], pools: ActorPools) -> dict[str, Any]:
    """Runs on a worker: the whole unit, its data files written here; returns its ledger entry
    (with `task_times`: when the task started and ended, and this process's previous unit's
    end, for the driver's parts of `unit_seconds`)."""
    began, started = time.time(), time.perf_counter()
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
    pools.wait_s, pools.sent_bytes = {}, {}
    setup = time.perf_counter() - started
    try:
        entry = worker.run(unit, store, guard=guard, failed=failed)
    finally:
        guard.leave()
    entry["unit_seconds"]["task_setup"] = setup
    previous, _LAST_END[0] = _LAST_END[0], time.time()
    # The node that ran the unit, and so wrote its files.
    return {**entry, "attempts": attempt, "unit_wall_s": time.perf_counter() - started,
            "model_wait_s": dict(pools.wait_s), "model_sent_bytes": dict(pools.sent_bytes), "node_id": node_id,
            "node_ip": ray.util.get_node_ip_address(),
            "task_times": {"began": began, "ended": _LAST_END[0], "previous_end": previous}}


_LAST_END: list[float | None] = [None]  # when this worker process's last unit task ended


def task_parts(entry: dict[str, Any], submitted: float, received: float) -> None:
    """The task's parts of a unit's time, from `task_times` (wall clocks: on several nodes they
    are as close as the nodes' clocks): `task_queued`, from submission to the start (a unit
    waits for a free slot: the driver keeps two a slot in flight); `task_return`, from the
    task's end until the driver had its entry; `task_gap`, from this worker process's previous
    unit's end to this one's start (Ray's dispatch, while units wait; a process's first unit
    has none)."""
    times = entry.pop("task_times", None)
    if not times:
        return
    parts = entry.setdefault("unit_seconds", {})
    parts["task_queued"] = max(0.0, times["began"] - submitted)
    parts["task_return"] = max(0.0, received - times["ended"])
    if times.get("previous_end") is not None:
        parts["task_gap"] = max(0.0, times["began"] - times["previous_end"])


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
        self.clock = UnitClock()  # the driver's own seconds: submitting, receiving, checking

    def run(self) -> Iterator[dict[str, Any]]:
        import ray

        while self.queue or self.in_flight or self.feed is not None:
            while len(self.in_flight) < self.max_in_flight and (state := self.next_unit()) is not None:
                self.submit(state)
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=1.0)
            for ref in ready:
                flight = self.in_flight.pop(ref)
                try:
                    with self.clock.part("receive"):
                        entry = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    self.task_failed(flight, exc)
                    continue
                task_parts(entry, flight.submitted, time.time())
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
        submitted = time.time()
        with self.clock.part("submit"):
            ref = self.task.remote(self.config, state.unit, str(self.store.root), state.attempt,
                                   dict(state.failed), self.pools)
        self.in_flight[ref] = InFlight(state, submitted)

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
        now = time.time()
        if now - self.last_check < 5.0:
            return
        self.last_check = now
        with self.clock.part("checks"):
            self._check(now)

    def _check(self, now: float) -> None:
        import ray

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
        # A step with nothing done yet is "starting" (models loading, the first unit decoding),
        # not "0.00 rows/s 0% busy", and cannot be the bottleneck.
        started = {name: v for name, v in shares.items() if v[0] > 0 or v[1] > 0}
        parts = [f"{name} " + (f"{rate:.2f} rows/s {100 * share:.0f}% busy" if name in started else "starting")
                 + (f" ({detail})" if detail else "") for name, (rate, share, detail) in shares.items()]
        worst = max(started, key=lambda n: started[n][1]) if started else "none yet"
        log.info("steps: %s | %d units running | bottleneck: %s", "; ".join(parts), running, worst)



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
    task = ray.remote(with_progress).options(num_cpus=1, max_retries=0, name=fn.__name__)
    return ray.get(task.remote(fn, *args))


def with_progress(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) with this process's `curation` log lines from INFO up written to its stderr
    (redacted, as every line a worker writes): in a Ray worker, which logs warnings only,
    that is how the end of a run shows its progress. Ray forwards a worker's stderr to the
    driver's terminal, so a compaction of 10^5 units is not minutes of silence there."""
    import sys

    from stages import redaction

    logger = logging.getLogger("curation")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(redaction.RedactingFilter())
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the worker's own handler would print its warnings again
    try:
        return fn(*args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


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
        scheduler = UnitScheduler(config, units, store, sizer, slots, driver_grace_s)
        yield from scheduler.run()
        return {"model_pools": pool_summary(sizer), "scheduler_seconds": dict(scheduler.clock.seconds)}
    finally:
        for handles in sizer.actors.values():
            for h in handles:
                ray.kill(h)
        if sizer.pools.dispatcher is not None:
            ray.kill(sizer.pools.dispatcher)
