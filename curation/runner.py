"""Drive a run: discover sources, plan units, execute the steps, commit units, record the run.

Two executors run the same stage objects:
- `run_local` (in-process, one unit after another): tests, debugging, small jobs;
- `curation.pipeline.run_ray` (a streaming Ray Data pipeline): the default.
Both yield Arrow batches of finished rows; `UnitAssembler` regroups them by work unit on the
driver (a source's rows all carry `source_rows`, the number of rows it produced), and each
complete unit is committed atomically by `OutputStore.commit`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from curation import schema
from curation.config import PipelineConfig, Step
from curation.refilter import finalize, needs_final_pass
from curation.sources import Unit, discover, plan_units
from curation.writer import STAGE_SECONDS_PREFIX, OutputStore, write_json
from stages.base import Batch, Stage, batch_len, check_output

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


# ---- executing steps ----------------------------------------------------------------------

def apply_step(step: Step, stage: Stage, batch: Batch) -> Batch:
    """Run one stage on a batch, check its declaration, and record its busy time per row."""
    if stage.fan_out:
        # One source at a time, so each source's time is spread over its own rows.
        outs = []
        for i in range(batch_len(batch)):
            one = {k: [v[i]] for k, v in batch.items()}
            started = time.perf_counter()
            out = stage(one)
            check_output(stage, one, out)
            n = batch_len(out)
            out[STAGE_SECONDS_PREFIX + step.name] = [(time.perf_counter() - started) / max(n, 1)] * n
            outs.append(out)
        return {k: [v for o in outs for v in o[k]] for k in (outs[0] if outs else {})}
    started = time.perf_counter()
    out = stage(batch)
    check_output(stage, batch, out)
    n = batch_len(out)
    out[STAGE_SECONDS_PREFIX + step.name] = [(time.perf_counter() - started) / max(n, 1)] * n
    return out


def source_rows(unit: Unit) -> Batch:
    return {
        "source_path": [s.path for s in unit.sources],
        "source_id": [s.source_id for s in unit.sources],
        "unit_id": [unit.unit_id] * len(unit.sources),
    }


def run_local(config: PipelineConfig, units: list[Unit]) -> Iterator[pa.Table]:
    """The in-process executor: same stage objects, no Ray."""
    stages = [step.build() for step in config.steps]
    for stage in stages:
        stage.setup()
    for unit in units:
        batch = source_rows(unit)
        for step, stage in zip(config.steps, stages):
            if not batch_len(batch):
                break
            if stage.fan_out:
                batch = apply_step(step, stage, batch)
                continue
            parts = []
            n = batch_len(batch)
            for start in range(0, n, step.ray.batch_size):
                part = {k: v[start:start + step.ray.batch_size] for k, v in batch.items()}
                parts.append(apply_step(step, stage, part))
            batch = {k: [v for p in parts for v in p[k]] for k in parts[0]}
        yield schema.batch_to_table(batch)


# ---- regrouping rows into units ------------------------------------------------------------

DROPPED_BEFORE_WRITE = {"sample_frames"}


class UnitAssembler:
    """Collect rows per source; hand out a unit once every one of its sources is complete."""

    def __init__(self, units: list[Unit]):
        self.units = {u.unit_id: u for u in units}
        self.pending_sources = {u.unit_id: {s.source_id for s in u.sources} for u in units}
        self.rows: dict[str, list[pa.Table]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, table: pa.Table) -> list[tuple[Unit, pa.Table]]:
        done = []
        if table.num_rows == 0:
            return done
        # Rows wait here until their unit is complete: keep only what the writer needs
        # (the 2 fps sample frames are most of a row and only the motion stage reads them).
        table = table.drop_columns([c for c in table.column_names if c in DROPPED_BEFORE_WRITE])
        source_ids = table.column("source_id").to_pylist()
        expected = table.column("source_rows").to_pylist()
        units = table.column("unit_id").to_pylist()
        for unit_id in dict.fromkeys(units):
            mask = pa.array([u == unit_id for u in units])
            self.rows[unit_id].append(table.filter(mask))
        for sid, n_expected, unit_id in zip(source_ids, expected, units):
            self.counts[sid] += 1
            if self.counts[sid] == n_expected:
                self.pending_sources[unit_id].discard(sid)
                if not self.pending_sources[unit_id]:
                    parts = self.rows.pop(unit_id)
                    merged = pa.concat_tables(parts, promote_options="permissive")
                    done.append((self.units[unit_id], merged))
        return done


# ---- progress -------------------------------------------------------------------------------

class Progress:
    """Sources done/total, clips and kept so far, elapsed and ETA (by bytes of sources done)."""

    def __init__(self, units: list[Unit], log_every_s: float = 5.0):
        self.total_sources = sum(len(u.sources) for u in units)
        self.total_bytes = max(1, sum(s.size_bytes for u in units for s in u.sources))
        self.sources = self.bytes = self.clips = self.kept = self.errors = 0
        self.stage_errors: dict[str, int] = defaultdict(int)
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self.started = time.monotonic()
        self.last_log = 0.0
        self.log_every_s = log_every_s

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
        self.report(force=self.sources == self.total_sources)

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_log < self.log_every_s:
            return
        self.last_log = now
        elapsed = now - self.started
        frac = self.bytes / self.total_bytes
        eta = f"{elapsed * (1 - frac) / frac:.0f}s" if frac > 0 else "?"
        # Per stage: clips that failed in it, and busy seconds spent in it so far.
        stages = " ".join(f"{name} {self.stage_seconds[name]:.0f}s/{self.stage_errors.get(name, 0)}err"
                          for name in self.stage_seconds)
        log.info("sources %d/%d | clips %d kept %d | source errors %d | stages %s | elapsed %.0fs ETA %s",
                 self.sources, self.total_sources, self.clips, self.kept, self.errors, stages or "-",
                 elapsed, eta)


# ---- the run --------------------------------------------------------------------------------

Executor = Callable[[PipelineConfig, list[Unit]], Iterable[pa.Table]]


def run_pipeline(config: PipelineConfig, inputs: list[str], out_dir: str | Path, executor: Executor,
                 overwrite: bool = False, command: list[str] | None = None,
                 notes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the pipeline into out_dir; returns the run summary written to run.json.

    `notes` are merged into run.json (for example the steps skipped for missing weights).
    """
    store = OutputStore(out_dir)
    sources = discover(inputs)
    store.prepare(config.fingerprint(), overwrite=overwrite)
    done_sources = store.committed_source_ids()
    todo = [s for s in sources if s.source_id not in done_sources]
    units = plan_units(todo, config.run.sources_per_unit)
    if done_sources:
        log.info("resuming: %d of %d sources already committed, %d units to do",
                 len(sources) - len(todo), len(sources), len(units))
    log.info("%d sources in %d units -> %s", len(todo), len(units), store.root)

    record = store.read_run()
    attempts = record.get("attempts", [])
    attempt = {"started_at": time.time(), "units": len(units), "command": command or sys.argv}
    attempts.append(attempt)
    record.update({
        "status": "running",
        "config": config.to_dict(),
        "config_fingerprint": config.fingerprint(),
        "inputs": list(inputs),
        "versions": package_versions(),
        "attempts": attempts,
        "skipped_steps": [],
        "rules_not_applied": [],
        **(notes or {}),
    })
    write_json(store.run_json, record)

    started = time.monotonic()
    progress = Progress(units)
    assembler = UnitAssembler(units)
    for table in executor(config, units):
        for unit, unit_table in assembler.add(table):
            entry = store.commit(unit.unit_id, [s.source_id for s in unit.sources], unit_table,
                                 config.run.shard_target_mb, config.run.store_all_clips)
            progress.unit_done(unit, entry)
    missing = [u for u, pending in assembler.pending_sources.items() if pending]
    if missing:
        raise RuntimeError(f"{len(missing)} units did not receive all their rows: {missing[:5]}")
    if needs_final_pass(config):
        # Percentile rules need the whole run's scores: resolved now, keep/shards rewritten.
        record["resolved_rules"] = finalize(store.root, config)

    ledger = store.committed()
    stage_seconds: dict[str, float] = defaultdict(float)
    for entry in ledger.values():
        for name, seconds in entry["stage_seconds"].items():
            stage_seconds[name] += seconds
    attempt["finished_at"] = time.time()
    attempt["wall_s"] = time.monotonic() - started
    record.update({
        "status": "complete",
        "sources": {"total": len(sources),
                    "committed": len({sid for e in ledger.values() for sid in e["source_ids"]})},
        "clips": sum(e["clips"] for e in ledger.values()),
        "kept": sum(e["kept"] for e in ledger.values()),
        "source_errors": sum(e["source_errors"] for e in ledger.values()),
        "units": len(ledger),
        "stage_busy_seconds": dict(stage_seconds),
    })
    write_json(store.run_json, record)
    return record
