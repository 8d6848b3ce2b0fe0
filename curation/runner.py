"""Drive a run: discover sources, plan units, execute them, commit units, record the run.

Two executors run the same stage objects through curation/unit.py's UnitWorker:
- `run_local` (in-process, a thread per core): tests, debugging, one machine;
- `curation.pipeline.run_ray` (a Ray task per unit, model steps on actor pools): the default.
Each writes a unit's data files where it ran and yields the unit's ledger entry (a small
record); the driver writes that entry last, which commits the unit (`OutputStore.write_ledger`).
Units commit as they finish, so a kill loses at most the units in flight.
"""

from __future__ import annotations

import collections
import importlib.metadata
import io
import itertools
import logging
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from curation import arrow_pool
from curation.config import PipelineConfig
from curation.finalize import finalize, needs_final_pass
from curation.sources import Unit, UnitFeed, iter_sources
from curation.unit import UnitClock, UnitWorker
from curation.writer import OutputStore, write_json
from stages import storage

log = logging.getLogger(__name__)

PACKAGES = ["ray", "av", "scenedetect", "opencv-python", "numpy", "pyarrow", "torch",
            "open-clip-torch", "easyocr", "svd-curate"]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# ---- the in-process executor ---------------------------------------------------------------

def run_local(config: PipelineConfig, units: Iterable[Unit], store: OutputStore,
              workers: int | None = None) -> Iterator[dict[str, Any]]:
    """The in-process executor: the same stage objects, no Ray.

    `workers` threads (default: one per core) split sources and run the CPU steps after split,
    so one process keeps every core busy: decoding, swscale, x264, OpenCV and numpy release
    the GIL. Up to `workers` units are open at once; their sources share the threads. A model
    step runs for one unit at a time (its model is loaded once and is not shared between
    threads). Each unit's data files are written where it finished, and the ledger entries
    are yielded in unit order for the driver to commit, so the outputs are those of one
    unit after another. A source that crashes or hangs the process takes the run with it
    here (no guard: it would end this process); the Ray runner contains such sources.
    """
    workers = max(1, workers or os.cpu_count() or 1)
    units = iter(units)
    first = next(units, None)
    if first is None:
        return
    units = itertools.chain([first], units)
    stages = {step.name: step.build() for step in config.steps}
    for stage in stages.values():
        stage.setup()
    if workers == 1:
        worker = UnitWorker(config, lambda step: stages[step.name])
        for unit in units:
            yield worker.run(unit, store)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="source") as source_pool, \
            ThreadPoolExecutor(workers, thread_name_prefix="unit") as unit_pool:
        worker = UnitWorker(config, lambda step: stages[step.name], source_pool=source_pool)
        open_units: collections.deque[Future] = collections.deque()
        todo = iter(units)
        try:
            for unit in itertools.islice(todo, workers):
                open_units.append(unit_pool.submit(worker.run, unit, store))
            while open_units:
                entry = open_units.popleft().result()
                for unit in itertools.islice(todo, 1):
                    open_units.append(unit_pool.submit(worker.run, unit, store))
                yield entry
        finally:
            for future in open_units:
                future.cancel()


# ---- progress -------------------------------------------------------------------------------

class Progress:
    """Sources done/listed, clips and kept so far, the slowest step, elapsed and ETA (by bytes
    of sources done, once the listing has ended; while it goes on, the totals so far have a
    "+"). On a terminal (`stream` a TTY) this is one live bar (tqdm) and the log's lines are
    printed above it; elsewhere, a plain log line every `log_every_s`."""

    def __init__(self, feed: UnitFeed, log_every_s: float = 5.0, stream: TextIO | None = None):
        self.feed = feed
        self.sources = self.bytes = self.clips = self.kept = self.errors = 0
        self.stage_errors: dict[str, int] = defaultdict(int)
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self.started = time.monotonic()
        self.last_log = 0.0
        self.log_every_s = log_every_s
        stream = sys.stderr if stream is None else stream
        self.bar = LiveBar(stream) if stream.isatty() else None

    def unit_done(self, unit: Unit, entry: dict[str, Any]) -> None:
        self.sources += len(unit.sources)
        self.bytes += sum(s.size_bytes for s in unit.sources)
        self.clips += entry["clips"]
        self.kept += entry["kept"]
        self.errors += entry["source_errors"]
        for stage, n in entry.get("errors", {}).items():
            self.stage_errors[stage] += n
        for stage, seconds in entry["stage_seconds"].items():
            self.stage_seconds[stage] += seconds
        self.report(force=self.feed.complete and self.sources == self.feed.todo)

    def eta(self, elapsed: float) -> str:
        frac = self.bytes / max(1, self.feed.todo_bytes)
        return f"{elapsed * (1 - frac) / frac:.0f}s" if frac > 0 and self.feed.complete else "?"

    def slowest(self) -> str:
        """The step whose busy seconds lead in the units done so far (the bottleneck)."""
        return max(self.stage_seconds, key=self.stage_seconds.get) if self.stage_seconds else "-"

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        if self.bar is not None:
            self.bar.show(self.sources, self.feed.todo if self.feed.complete else None,
                          f"clips {self.clips} kept {self.kept} | errors {self.errors} | "
                          f"bottleneck {self.slowest()} | {elapsed:.0f}s, ETA {self.eta(elapsed)}")
        if not force and now - self.last_log < self.log_every_s:
            return
        self.last_log = now
        total = f"{self.feed.todo}" + ("" if self.feed.complete else "+ listed")
        # Per stage: clips that failed in it, and busy seconds spent in it so far.
        stages = " ".join(f"{name} {self.stage_seconds[name]:.0f}s/{self.stage_errors.get(name, 0)}err"
                          for name in self.stage_seconds)
        # Under a live bar the line goes to the log file only (DEBUG): the bar says it.
        log.log(logging.DEBUG if self.bar else logging.INFO,
                "sources %d/%s | clips %d kept %d | source errors %d | stages %s | elapsed %.0fs ETA %s",
                self.sources, total, self.clips, self.kept, self.errors, stages or "-", elapsed, self.eta(elapsed))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LiveBar:
    """One tqdm bar on a terminal stream. While it is up, the root logger's handlers that
    write to that terminal write above it (the bar cleared, the line written, the bar drawn
    again), so log lines and the bar do not overwrite each other."""

    def __init__(self, stream: TextIO):
        from tqdm import tqdm

        self.stream = stream
        self.tqdm = tqdm(total=None, unit="src", file=stream, dynamic_ncols=True, mininterval=0.5,
                         bar_format="sources {n_fmt}/{total_fmt} |{bar}| {desc}")
        self.handlers: list[tuple[logging.StreamHandler, TextIO]] = []
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and _same_terminal(handler.stream, stream):
                self.handlers.append((handler, handler.stream))
                handler.setStream(_AboveBar(self.tqdm, handler.stream))

    def show(self, done: int, total: int | None, postfix: str) -> None:
        if total is not None and self.tqdm.total != total:
            self.tqdm.total = total
        self.tqdm.n = done
        self.tqdm.set_description_str(postfix, refresh=False)
        self.tqdm.refresh()

    def close(self) -> None:
        for handler, stream in self.handlers:
            handler.setStream(stream)
        self.tqdm.close()


class _AboveBar(io.TextIOBase):
    """A stream whose writes clear the bar, print, and draw it again."""

    def __init__(self, bar: Any, stream: TextIO):
        self.bar, self.stream = bar, stream

    def write(self, text: str) -> int:
        self.bar.clear()
        self.stream.write(text)
        self.stream.flush()
        self.bar.refresh()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


def _same_terminal(a: Any, b: Any) -> bool:
    """Whether two streams write to the same terminal (the redacting wrappers included)."""
    try:
        return a is b or (a.isatty() and b.isatty() and os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno())))
    except (AttributeError, OSError, ValueError):
        return False


def nodes_summary(entries: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """node id -> its address, the units and clips it ran (and wrote), the objects its workers
    fetched from a store and the temporary folders they fetched into; Ray runs only."""
    nodes: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e.get("node_id"):
            n = nodes.setdefault(e["node_id"], {"ip": e.get("node_ip"), "units": 0, "clips": 0,
                                                "fetched_objects": 0, "fetch_temp_dirs": []})
            n["units"] += 1
            n["clips"] += e["clips"]
            n["fetched_objects"] += int((e.get("storage") or {}).get("objects", 0))
            # The parent of the unit's own fetch folder: the node's temporary directory.
            temp_dir = str(Path(e["fetch_dir"]).parent) if e.get("fetch_dir") else None
            if temp_dir is not None and temp_dir not in n["fetch_temp_dirs"]:
                n["fetch_temp_dirs"].append(temp_dir)
    return nodes


def attempt_storage(before: dict[str, float], workers: Counter) -> dict[str, float]:
    """An attempt's object-store traffic: this process's since `before` (discovery; the
    in-process runner's fetches) and the Ray workers' (from their units' ledger entries)."""
    return dict(Counter(storage.counted_since(before)) + workers)


def total_storage(attempts: list[dict[str, Any]]) -> dict[str, float]:
    return dict(sum((Counter(a.get("storage") or {}) for a in attempts), Counter()))


# ---- checkpoints ----------------------------------------------------------------------------

class LedgerCheckpoints:
    """The driver's ledger checkpoints while a run goes on: after CHECKPOINT_EVERY_UNITS new
    entries, or 5% of the units the checkpoint holds if that is more (so the units' table is
    rewritten a few dozen times over a run, not once per few units), a checkpoint of the
    ledger alone (no data file rewritten): a resume then reads it and a few entries. Skipped
    while a `curate compact` holds the lock."""

    def __init__(self, store: OutputStore):
        self.store = store
        self.new = 0
        self.held = 0

    def committed(self) -> None:
        from curation.compact import CHECKPOINT_EVERY_UNITS, CompactionBusy, checkpoint

        self.new += 1
        if self.new < max(CHECKPOINT_EVERY_UNITS, 0.05 * self.held):
            return
        try:
            manifest = checkpoint(self.store, compact=False, created_by="curate run (ledger)")
        except CompactionBusy as exc:
            log.info("ledger checkpoint skipped: %s", exc)
            return
        self.new, self.held = 0, int(manifest["units"])
        arrow_pool.give_back()  # what the checkpoint read and wrote (curation/arrow_pool.py)


def compact_at_end(out_dir: str) -> None:
    """The finished run's per-unit files rewritten into large ones (curation/compact.py);
    skipped, with a message, while another compaction holds the lock."""
    from curation.compact import CompactionBusy, checkpoint

    store = OutputStore(out_dir)
    try:
        checkpoint(store, compact=True, created_by="curate run")
    except CompactionBusy as exc:
        log.warning("not compacted at the end of the run: %s; run `curate compact %s` later", exc, store.root)


# ---- the run --------------------------------------------------------------------------------

# An executor takes the units as an iterable that plans them as the listing goes (UnitFeed).
Executor = Callable[[PipelineConfig, Iterable[Unit], OutputStore], Iterable[dict[str, Any]]]


def run_pipeline(config: PipelineConfig, inputs: list[str], out_dir: str | Path, executor: Executor,
                 overwrite: bool = False, command: list[str] | None = None,
                 notes: dict[str, Any] | None = None,
                 offload: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the pipeline into out_dir; returns the run summary written to run.json.

    `notes` are merged into run.json (for example the steps skipped for missing weights).
    `offload(fn, *args)` runs the end of the run (the final pass, the compaction) where the
    units ran (curation.pipeline.on_cluster: a task on the Ray cluster, so the driver's
    machine does not do it); by default here.
    """
    offload = offload or (lambda fn, *args: fn(*args))
    store = OutputStore(out_dir)
    cpu_started = time.process_time()  # this process's CPU (the driver's, on Ray)
    storage_before = storage.counters()
    sources = iter_sources(inputs)  # streamed; a missing input or an empty listing raises here
    # One read of the ledger serves the sweep of uncommitted files and the committed sources.
    done_sources = store.prepare(config.fingerprint(), overwrite=overwrite).source_ids()
    # Units are planned as the listing goes: the first starts before a long listing ends.
    units = UnitFeed(sources, config.run.sources_per_unit, done_sources)
    if done_sources:
        log.info("resuming: %d sources already committed", len(done_sources))
    log.info("listing sources and running units as they are planned -> %s", store.root)

    record, attempt = start_attempt(store, config, inputs, command, notes)

    started = time.monotonic()
    cpu_units = time.process_time()
    progress = Progress(units)
    checkpoints = LedgerCheckpoints(store)
    workers_storage: Counter = Counter()
    driver = UnitClock()  # this process's seconds a unit: the commits and the bookkeeping
    entries = executor(config, units, store)
    try:
        while True:
            try:
                entry = next(entries)
            except StopIteration as done:  # an executor may return what the attempt's record keeps
                attempt.update(done.value or {})
                break
            with driver.part("commit"):
                store.write_ledger(entry)
            with driver.part("progress"):
                workers_storage.update(entry.get("storage") or {})
                progress.unit_done(units.finished(entry["unit_id"]), entry)
            with driver.part("ledger_checkpoints"):
                checkpoints.committed()
    except BaseException as exc:  # the attempt's record says what it did before it failed
        progress.close()
        attempt.update({"finished_at": time.time(), "error": storage.redact(repr(exc))[:2000],
                        "storage": attempt_storage(storage_before, workers_storage)})
        record.update({"status": "failed", "storage": total_storage(record["attempts"])})
        write_json(store.run_json, record)
        raise
    progress.close()
    attempt["units"] = units.units
    attempt["driver_seconds"] = dict(driver.seconds)
    cpu_end = time.process_time()
    missing = sorted(units.open)  # given out, never committed
    if missing:
        raise RuntimeError(f"{len(missing)} units were not committed: {missing[:5]}")
    end_of_run(config, store, record, offload)
    totals = store.ledger().totals()
    attempt["finished_at"] = time.time()
    attempt["wall_s"] = time.monotonic() - started
    # Where this process's CPU went: planning (listing the ledger, the sweep), the units (their
    # commits; on Ray the workers' CPU is not in it) and the end (final pass or compaction).
    attempt["driver_cpu_s"] = {"planning": cpu_units - cpu_started, "units": cpu_end - cpu_units,
                               "end": time.process_time() - cpu_end}
    # Everything up to run.json's last write (which cannot count itself).
    attempt["storage"] = attempt_storage(storage_before, workers_storage)
    if attempt["storage"].get("failed_requests"):
        log.info("object store: %d failed requests retried", attempt["storage"]["failed_requests"])
    record.update(run_totals(totals, units.listed))
    record.update({"status": "complete", "storage": total_storage(record["attempts"])})
    write_json(store.run_json, record)
    return record


def end_of_run(config: PipelineConfig, store: OutputStore, record: dict[str, Any],
               offload: Callable[..., Any]) -> None:
    """After the last unit: the final pass when percentile rules need the whole run's scores
    (resolved now, keep/shards rewritten into compacted files; the same pass finishes a
    refilter that was interrupted), else the compaction."""
    refilters = record.get("refilters") or []
    unfinished_refilter = bool(refilters) and not refilters[-1].get("finished")
    if needs_final_pass(config) or unfinished_refilter:
        record["resolved_rules"] = offload(finalize, str(store.root), config.to_dict())
        if unfinished_refilter:
            log.info("finished the interrupted `curate refilter %s`", " ".join(refilters[-1]["overrides"]))
            refilters[-1].update({"finished": True, "finished_by": "curate run"})
    elif config.run.compact_at_end:
        offload(compact_at_end, str(store.root))


def start_attempt(store: OutputStore, config: PipelineConfig, inputs: list[str], command: list[str] | None,
                  notes: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """run.json marked running, with this attempt appended: (the record, the attempt)."""
    record = store.read_run()
    attempts = record.get("attempts", [])
    attempt = {"started_at": time.time(), "command": command or sys.argv}
    attempts.append(attempt)
    record.update({
        "status": "running",
        "config": config.to_dict(),
        "config_fingerprint": config.fingerprint(),
        "inputs": [storage.redact(i) for i in inputs],
        "versions": package_versions(),
        "attempts": attempts,
        "skipped_steps": [],
        "rules_not_applied": [],
        **(notes or {}),
    })
    write_json(store.run_json, record)
    return record, attempt


def run_totals(totals: dict[str, Any], listed: int) -> dict[str, Any]:
    """run.json's figures of a finished run, from the ledger's totals."""
    clips = int(totals.get("clips", 0))
    return {
        "sources": {"total": listed, "committed": int(totals.get("sources", 0))},
        "clips": clips,
        "kept": int(totals.get("kept", 0)),
        "source_errors": int(totals.get("source_errors", 0)),
        "source_outcomes": dict(totals.get("source_outcomes") or {}),
        "units": int(totals.get("units", 0)),
        "units_retried": int(totals.get("units_retried", 0)),
        "nodes": dict(totals.get("nodes") or {}),
        "model_sent_bytes_per_clip": {name: n / max(1, clips)
                                      for name, n in (totals.get("model_sent_bytes") or {}).items()},
        "stage_busy_seconds": dict(totals.get("stage_seconds") or {}),
        "unit_seconds": dict(totals.get("unit_seconds") or {}),
    }
