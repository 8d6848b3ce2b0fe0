"""One work unit, start to finish, in one worker process (shared by both runners).

`UnitWorker.run(unit, store)`:
1. each source through split and the steps after it up to the first model step (in the
   default recipe: split, motion): one at a time, or on the in-process runner's threads
   (`source_pool`) several at once. Under a `SourceGuard` (the Ray runner) the
   source runs with a time limit that scales with its duration, and the unit's in-flight
   marker names it, so the driver can pin a crash, an OOM kill or a hang on that source;
2. the unit's rows, in batches of each step's batch_size, through the remaining steps. A
   model step (`ray.actors` or `ray.num_gpus` set) is handed to `remote` (the Ray runner's
   actor pools) when one is given, and runs in this process otherwise;
3. the unit's data files (`OutputStore.write_unit`). The ledger entry is returned, not
   written: the driver writes it last, which commits the unit.

The entry's `unit_seconds` says where the unit's time went, by part (`UnitClock`): fetching
sources from a store, the in-flight marker's writes, probing durations, the per-source steps,
the unit's later steps (model steps run here), calls to model actors, writing the data files;
the Ray runner adds the task's own parts (curation/pipeline.py). The ledger's totals sum them
(run.json `unit_seconds`), so a run's fixed cost a unit can be read part by part.

Sources in `failed` (they killed or hung their worker on every attempt) are not run again;
each gets one row saying why (source_status worker_died / timed_out).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from curation import schema
from stages import storage
from curation.config import PipelineConfig, Step
from curation.sources import Source, Unit
from curation.writer import STAGE_SECONDS_PREFIX, OutputStore, write_json
from stages.base import Batch, Stage, batch_len, check_output

log = logging.getLogger(__name__)

DROPPED_BEFORE_WRITE = ("sample_frames",)  # not part of the written contract
SAMPLE_READERS = {"motion"}  # the stages that read sample_frames

RemoteCall = Callable[[Step, Batch], Batch]


# ---- batches ----------------------------------------------------------------------------------

def source_rows(unit_id: str, sources: tuple[Source, ...] | list[Source]) -> Batch:
    return {
        "source_path": [s.path for s in sources],
        "source_id": [s.source_id for s in sources],
        "unit_id": [unit_id] * len(sources),
    }


def failure_row(source: Source, unit_id: str, reason: str, status: str) -> Batch:
    """The one row of a source that never finished (its worker died or timed out)."""
    return {
        "clip_id": [schema.clip_id_for(source.source_id, None, None)],
        "source_id": [source.source_id], "source_path": [source.path], "unit_id": [unit_id],
        "start_frame": [None], "end_frame": [None], "split_error": [reason], "source_status": [status],
    }


def concat_batches(parts: list[Batch]) -> Batch:
    """Rows of all parts; a column missing from a part is None there."""
    parts = [p for p in parts if batch_len(p)]
    names = list(dict.fromkeys(k for p in parts for k in p))
    return {k: [v for p in parts for v in p.get(k, [None] * batch_len(p))] for k in names}


def slices(batch: Batch, size: int) -> list[Batch]:
    n = batch_len(batch)
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, max(1, size))]


def even_slices(batch: Batch, size: int) -> list[Batch]:
    """As many parts as `slices` (none above `size` rows), of sizes that differ by one at most:
    9 rows at 8 are 5 + 4, not 8 + 1. A unit's batches for a pool of actors run side by side,
    and the unit waits for the longest."""
    n = batch_len(batch)
    parts = -(-n // max(1, size))
    cuts = [i * n // max(1, parts) for i in range(parts + 1)]
    return [{k: v[a:b] for k, v in batch.items()} for a, b in zip(cuts, cuts[1:])]


def apply_step(step: Step, stage: Stage, batch: Batch) -> Batch:
    """Run one stage on a batch, check its declaration, and record its busy time per row."""
    if stage.fan_out:
        # One source at a time, so each source's time is spread over its own rows.
        return concat_batches([apply_step_once(step, stage, part) for part in slices(batch, 1)])
    return apply_step_once(step, stage, batch)


def apply_step_once(step: Step, stage: Stage, batch: Batch) -> Batch:
    started = time.perf_counter()
    out = stage(batch)
    check_output(stage, batch, out)
    n = batch_len(out)
    out[STAGE_SECONDS_PREFIX + step.name] = [(time.perf_counter() - started) / max(n, 1)] * n
    return out


def is_model_step(step: Step) -> bool:
    """Steps that hold a model: run by actor pools under Ray (loaded once per actor)."""
    return step.ray.actors is not None or step.ray.num_gpus > 0


def per_source_steps(config: PipelineConfig) -> int:
    """How many leading steps run source by source (split and the CPU steps after it)."""
    for i, step in enumerate(config.steps):
        if is_model_step(step):
            return i
    return len(config.steps)


# ---- where a unit's time goes ------------------------------------------------------------------

class UnitClock:
    """Seconds by part of one unit, summed over its sources (threads add under a lock)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, part: str, seconds: float) -> None:
        with self._lock:
            self.seconds[part] += seconds

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)


# ---- the time limit -----------------------------------------------------------------------------

class SourceGuard:
    """The in-flight marker of a unit and a hard time limit for the source being processed.

    The marker (OUT/inflight/<unit>.json) says which source this attempt is on, since when,
    and its limit; the driver reads it when the worker dies. The limit is a real-time timer
    whose signal (SIGALRM, default action) ends the process even inside native code that never
    returns to Python; where the task does not run on the main thread, a timer thread sends
    SIGKILL instead. Only for worker processes: it would end an in-process run.
    """

    def __init__(self, marker: Path, unit_id: str, attempt: int, floor_s: float, per_video_s: float,
                 node_id: str | None = None):
        self.marker, self.unit_id, self.attempt, self.node_id = marker, unit_id, attempt, node_id
        self.floor_s, self.per_video_s = floor_s, per_video_s
        self._thread_timer: threading.Timer | None = None
        self.write_s = 0.0  # the marker's writes, in all

    def limit_for(self, duration_s: float | None) -> float:
        if duration_s is None or not duration_s > 0:
            return self.floor_s
        return max(self.floor_s, self.per_video_s * duration_s)

    def enter(self, source: Source, limit_s: float) -> None:
        self._write({"phase": "source", "source_id": source.source_id, "source_path": source.path,
                     "limit_s": limit_s})
        self._arm(limit_s)

    def leave(self) -> None:
        self._arm(0)

    def unit_phase(self, model_step: str | None = None) -> None:
        """The unit's rows are past the per-source steps (waiting on `model_step`, if given)."""
        self._write({"phase": "unit", "model_step": model_step})

    def _write(self, fields: dict[str, Any]) -> None:
        # Advisory (read only when this process has died), so no fsync: twice per source.
        started = time.perf_counter()
        write_json(self.marker, {"unit_id": self.unit_id, "attempt": self.attempt, "pid": os.getpid(),
                                 "node_id": self.node_id, "started_at": time.time(), **fields}, durable=False)
        self.write_s += time.perf_counter() - started

    def _arm(self, seconds: float) -> None:
        if self._thread_timer is not None:
            self._thread_timer.cancel()
            self._thread_timer = None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.setitimer(signal.ITIMER_REAL, max(0.0, seconds))
        elif seconds > 0:
            self._thread_timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGKILL))
            self._thread_timer.daemon = True
            self._thread_timer.start()


def probe_duration(path: str) -> float | None:
    """The source's duration from its container (None when it cannot be read)."""
    from stages.split import probe

    try:
        return probe(path)["duration_s"]
    except Exception:  # noqa: BLE001 - an unreadable file is split's to report
        return None


# ---- the unit -----------------------------------------------------------------------------------

class UnitWorker:
    """Runs units through the steps of a config (see the module docstring)."""

    def __init__(self, config: PipelineConfig, stage_for: Callable[[Step], Stage],
                 remote: RemoteCall | None = None, source_pool: Executor | None = None):
        """`source_pool`: threads that run the per-source steps of a unit's sources at once
        (the in-process runner); the model steps then run for one caller at a time."""
        self.config = config
        self.stage_for = stage_for
        self.remote = remote
        self.n_per_source = per_source_steps(config)
        self.source_pool = source_pool
        self._model_locks = {step.name: threading.Lock() for step in config.steps if is_model_step(step)}

    def run_step(self, step: Step, batch: Batch) -> Batch:
        if not batch_len(batch):
            return batch
        if self.remote is not None and is_model_step(step):
            return self.remote(step, batch)
        stage = self.stage_for(step)
        lock = self._model_locks.get(step.name) if self.source_pool is not None else None
        with lock or contextlib.nullcontext():
            return concat_batches([apply_step(step, stage, part) for part in slices(batch, step.ray.batch_size)])

    def run_source(self, unit: Unit, source: Source) -> Batch:
        batch = source_rows(unit.unit_id, [source])
        for step in self.config.steps[:self.n_per_source]:
            batch = self.run_step(step, batch)
        return batch

    def run(self, unit: Unit, store: OutputStore, guard: SourceGuard | None = None,
            failed: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
        failed = failed or {}
        todo = [s for s in unit.sources if s.source_id not in failed]
        before = storage.counters()
        clock = UnitClock()
        # Sources in object storage: the next one is fetched while this one decodes.
        with storage.Prefetcher([s.path for s in todo], {s.path: s.size_bytes for s in todo}) as fetches:
            entry = self._run(unit, store, guard, failed, fetches, clock)
        if guard is not None:
            clock.add("markers", guard.write_s)
        entry["unit_seconds"] = dict(clock.seconds)
        if guard is not None and any(storage.is_uri(s.path) for s in todo):
            # A Ray worker runs one unit at a time: its process's counts are this unit's, all
            # fetched into the Prefetcher's folder (run.json's `nodes` sums both per node).
            entry["storage"] = storage.counted_since(before)
            entry["fetch_dir"] = str(fetches.dir)
        return entry

    def _source(self, unit: Unit, source: Source, failed: dict[str, tuple[str, str]],
                clock: UnitClock) -> Batch:
        if source.source_id in failed:
            return failure_row(source, unit.unit_id, *failed[source.source_id])
        with clock.part("source_steps"):
            return self.run_source(unit, source)

    def _run(self, unit: Unit, store: OutputStore, guard: SourceGuard | None,
             failed: dict[str, tuple[str, str]], fetches: storage.Prefetcher, clock: UnitClock) -> dict[str, Any]:
        if self.source_pool is not None and guard is None:
            parts = list(self.source_pool.map(lambda s: self._source(unit, s, failed, clock), unit.sources))
        else:
            parts = []
            for source in unit.sources:
                if source.source_id in failed:
                    parts.append(self._source(unit, source, failed, clock))
                    continue
                if guard is not None:
                    local: str | None = source.path
                    if storage.is_uri(source.path):  # fetched before the clock starts (retried reads)
                        try:
                            with clock.part("fetch"):
                                local = fetches.take(source.path)
                        except Exception:  # noqa: BLE001 - a failed fetch is split's to report
                            local = None
                    guard.enter(source, guard.floor_s)  # the probe itself may hang
                    with clock.part("probe"):
                        duration = probe_duration(local) if local else None
                    guard.enter(source, guard.limit_for(duration))
                parts.append(self._source(unit, source, failed, clock))
                if guard is not None:
                    guard.leave()
        if guard is not None:
            guard.unit_phase()
        batch = concat_batches(parts)
        later = self.config.steps[self.n_per_source:]
        if not any(step.stage in SAMPLE_READERS for step in later):
            batch.pop("sample_frames", None)  # most of a row's bytes: not sent to model actors
        for step in later:
            remote = self.remote is not None and is_model_step(step)
            if guard is not None and remote:
                guard.unit_phase(step.name)  # the driver grows pools that units wait on
            with clock.part("model_calls" if remote else "unit_steps"):
                batch = self.run_step(step, batch)
        for name in DROPPED_BEFORE_WRITE:
            batch.pop(name, None)
        with clock.part("write"):
            table = schema.batch_to_table(batch)
            return store.write_unit(unit.unit_id, [s.source_id for s in unit.sources], table,
                                    self.config.run.shard_target_mb, self.config.run.store_all_clips)
