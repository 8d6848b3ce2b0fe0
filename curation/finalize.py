"""The rules applied over a whole run's stored scores: the end-of-run pass (`finalize`, for
percentile rules and near-duplicate removal) and the pass under `curate refilter` (`apply_rules`).

The rule logic is stages/rules.py's (resolution of percentile rules, evaluation); this module
streams the stored tables through it and writes the results. `apply_rules`:

1. resolve every percentile rule ({drop_bottom: q} / {drop_top: q}) over the non-missing
   values of every committed clip (convention in stages/rules.py: drop_bottom 0.25 ->
   min = the value with 25% of the clips below it; values below min are rejected), by exact
   order statistics in a few streamed passes over the ruled columns (curation/columns.py);
2. with a `dedup:` section, the near-duplicate decisions (curation/dedup/), which need
   each grouped clip's keep under the rules;
3. one streamed pass over scores/, a row group at a time: every rule of every filter step,
   in pipeline order, evaluated on every row -> keep and reject_reasons, exactly as the filter
   stage would have written them (source-error rows stay rejected with "split_error", a
   duplicate gets "duplicate_of:<clip_id>"), written into new compacted scores files; the kept
   clips joined with their payload, read alongside from clips/ (the same clips in the same
   order), written into new compacted shard files; loose clips files are compacted too;
4. a new ledger checkpoint naming the new files (curation/compact.py): its write is the
   commit, so readers see the old tables or the new ones, never a mix; the replaced files
   are deleted after it; run.json records the resolved thresholds and the kept total.

Nothing is decoded or scored again, and memory is a row group per kind and the dedup
decisions, not the corpus. The result depends only on the score columns and the rules, never
on the keep/reject_reasons already stored, so a pass killed part-way (nothing committed) and
run again gives the same result as one never interrupted.

Limits: clips rejected by a filter step placed before an expensive stage have no value for
that stage's scores (the stage skipped them), so loosening such a rule keeps them rejected as
"<column>:missing"; and with run.store_all_clips=false only clips that are in shards already
have their payload stored, so refilter can tighten but not loosen (it refuses, naming a clip,
and changes nothing).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import columns, compact, dedup, schema
from curation.config import PipelineConfig
from curation.ledger import Ledger
from curation.writer import OutputError, OutputStore, add_derived_columns, write_json
from stages.rules import (
    Rules,
    effective_steps,
    evaluate_rows,
    filter_steps,
    is_percentile,
    percentile_ranks,
    percentile_rules,
    resolve_percentile,
)

log = logging.getLogger(__name__)

PAYLOAD_COLUMNS = [f.name for f in schema.PAYLOAD_FIELDS]
PROGRESS_EVERY_S = 10.0
PAYLOAD_SLICE_ROWS = 256  # scores rows whose kept clips' payload (videos) is in memory at once


def _config_dict(config: PipelineConfig | dict[str, Any]) -> dict[str, Any]:
    return config.to_dict() if isinstance(config, PipelineConfig) else config


def needs_final_pass(config: PipelineConfig | dict[str, Any]) -> bool:
    """True when a filter step has a percentile rule (the filter stage skipped it inline) or
    the config removes near-duplicates (both need every unit's data)."""
    if _config_dict(config).get("dedup") is not None:
        return True
    return any(is_percentile(b) for _, rules in filter_steps(_config_dict(config)) for b in rules.values())


def finalize(out_dir: str | Path, config: PipelineConfig | dict[str, Any]) -> dict[str, dict[str, Any]]:
    """End-of-run pass for percentile rules; returns (and records) {step: {column: resolved}}."""
    return apply_rules(out_dir, config)["resolved_rules"]


# ---- percentile rules -------------------------------------------------------------------------

def clip_values(paths: list[Any], column: str):
    """A callable yielding the non-missing values of `column` over the clip rows of `paths`,
    a row group at a time (for columns.order_statistics, which reads it once per pass)."""
    def values():
        for table in columns.scan(paths, [column, "split_error", "start_frame"]):
            v = columns.floats(table, column)[columns.is_clip(table)]
            yield v[~np.isnan(v)]
    return values


def resolve_rules(paths: list[Any], steps: list[tuple[str, Rules]]) -> dict[str, dict[str, Any]]:
    """{step: {column: resolved}} for every percentile rule, with the thresholds
    stages.rules.resolve_percentile takes (the same ranks), over the stored scores `paths`."""
    resolved: dict[str, dict[str, Any]] = {}
    for step_name, rules in steps:
        for column, bounds in percentile_rules(rules).items():
            values = clip_values(paths, column)
            n = sum(int(v.size) for v in values())
            if not n:
                out = resolve_percentile(np.zeros(0), bounds)
            else:
                ranks = percentile_ranks(bounds, n)
                found = columns.order_statistics(values, ranks.values())
                out = {k: bounds[k] for k in ("drop_bottom", "drop_top") if k in bounds}
                out.update({"values": n, **{key: float(found[r]) for key, r in ranks.items()}})
            resolved.setdefault(step_name, {})[column] = out
            log.info("resolved %s.%s %s over %d clips -> %s", step_name, column, bounds, n,
                     {k: v for k, v in out.items() if k in ("min", "max")})
    return resolved


def _warn_unvalued(steps: list[tuple[str, Rules]], valued: set[str]) -> None:
    for name, rules in steps:
        for column in rules:
            if column not in valued:
                log.warning("rule %s.%s: no clip has a value for %s (its stage did not run?); "
                            "every clip is rejected as %s:missing", name, column, column, column)


# ---- one row group of scores under the rules --------------------------------------------------

def evaluate(table: pa.Table, effective: list[Rules], decisions: dict[str, tuple[str, float]]
             ) -> tuple[np.ndarray, list[list[str]]]:
    """keep and reject_reasons of a scores row group under the rules and the dedup decisions."""
    is_error = ~columns.is_clip(table)
    ruled = {c for rules in effective for c in rules}
    keep, reasons = evaluate_rows(is_error, {c: columns.floats(table, c) for c in ruled
                                             if c in table.column_names}, effective)
    keep = np.asarray(keep, bool)
    if decisions:
        ids = table.column("clip_id")
        hit = pc.is_in(ids, value_set=pa.array(list(decisions), pa.string())).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(hit):
            keep[i] = False
            reasons[i] = reasons[i] + [dedup.REASON_PREFIX + decisions[ids[int(i)].as_py()][0]]
    return keep, reasons


def _with_filter_columns(table: pa.Table, keep: np.ndarray, reasons: list[list[str]]) -> pa.Table:
    table = schema.conform(table, schema.SCORES_SCHEMA)
    table = table.set_column(table.schema.get_field_index("keep"), "keep", pa.array(keep, pa.bool_()))
    return table.set_column(table.schema.get_field_index("reject_reasons"), "reject_reasons",
                            pa.array(reasons, pa.list_(pa.string())))


# ---- the pass -----------------------------------------------------------------------------------

def score_inputs(ledger: Ledger) -> list[list[Any]]:
    """The scores files grouped as they may end a compacted file: each compacted file, then
    each loose unit's file."""
    store = ledger.store
    groups = [[store.scores_dir / f["name"]] for f in ledger.compacted("scores")]
    groups += [[store.scores_dir / u["scores_file"]] for u in ledger.loose_units() if u.get("scores_file")]
    return groups


def payload_source(ledger: Ledger) -> str:
    """"clips" when every clip's payload is in clips/ (run.store_all_clips), else "shards"
    (the kept clips' only)."""
    stored = sum(int(f.get("rows", 0)) for f in ledger.compacted("clips"))
    stored += sum(int(u.get("clips") or 0) for u in ledger.loose_units() if u.get("clips_file"))
    return "clips" if stored >= int(ledger.totals().get("clips", 0)) else "shards"


class Rewrite:
    """The writers of one pass: new scores and shard files (compacted), the payload read
    alongside, and what was kept."""

    def __init__(self, store: OutputStore, ledger: Ledger, lock: compact.Lock, target_bytes: float):
        self.scores = compact.RollingWriter(store.scores_dir, lock.prefix, "scores", target_bytes, lock)
        self.shards = compact.RollingWriter(store.shards_dir, lock.prefix, "shards", target_bytes, lock)
        self.source = payload_source(ledger)
        files = ledger.files(self.source)
        self.payload = columns.RowStream(files, ["clip_id"] + PAYLOAD_COLUMNS)
        self.kept = 0
        self.refused: str | None = None

    def add(self, table: pa.Table, keep: np.ndarray, reasons: list[list[str]]) -> None:
        """One scores row group: its rows with the new keep/reasons, its kept clips as shard rows."""
        table = schema.conform(table, schema.SCORES_SCHEMA)
        new = _with_filter_columns(table, keep, reasons)
        self.scores.add(new)
        clip = columns.is_clip(table)
        if self.source == "clips":
            payload = self.payload.take(int(clip.sum()))
            _check_same(payload, table.filter(pa.array(clip)))
            kept_payload = payload.filter(pa.array(keep[clip]))
        else:  # the old shards: the clips kept before, in the same order
            before = pc.fill_null(table.column("keep"), False).to_numpy(zero_copy_only=False).astype(bool)
            payload = self.payload.take(int(before.sum()))
            _check_same(payload, table.filter(pa.array(before)))
            lacking = np.flatnonzero(keep & ~before)
            if lacking.size and self.refused is None:
                self.refused = table.column("clip_id")[int(lacking[0])].as_py()
            keep = keep & before  # (a refused pass is abandoned anyway)
            kept_payload = payload.filter(pa.array(keep[before]))
        kept_rows = new.filter(pa.array(keep))
        for name in PAYLOAD_COLUMNS:
            kept_rows = kept_rows.append_column(name, kept_payload.column(name))
        self.shards.add(add_derived_columns(kept_rows))
        self.shards.end_unit()  # shards may end anywhere (readers take them a row group at a time)
        self.kept += int(keep.sum())

    def end_group(self) -> None:
        self.scores.end_unit()
        self.shards.end_unit()

    def close(self) -> dict[str, list[dict[str, Any]]]:
        return {"scores": self.scores.close(), "shards": self.shards.close()}

    def abort(self) -> None:
        self.scores.abort()
        self.shards.abort()


def _check_same(payload: pa.Table, rows: pa.Table) -> None:
    if rows.num_rows and not pc.all(pc.equal(payload.column("clip_id"), rows.column("clip_id"))).as_py():
        raise OutputError("the stored payload (clips/ or shards/) is not in the order of scores/: the output "
                          "is damaged; rerun `curate run` into a new OUT_DIR")


def apply_rules(out_dir: str | Path, config: PipelineConfig | dict[str, Any]) -> dict[str, Any]:
    """Resolve percentile rules, recompute keep/reject_reasons, rewrite scores/ and shards/
    (compacted) and checkpoint the ledger.

    Returns {"resolved_rules", "clips", "kept", "units_rewritten", "dedup"}; also records
    resolved_rules and the kept total in run.json.
    """
    started = time.monotonic()
    cfg = _config_dict(config)
    store = OutputStore(out_dir)
    lock = compact.Lock(store)
    ledger = lock.acquire()  # the ledger as it is under the lock: no checkpoint changes it meanwhile
    try:
        result = _apply(store, ledger, lock, cfg)
    finally:
        lock.release()
    compact.clean_up(store, ledger, result.pop("replaced"))

    # Record the thresholds and the kept total.
    run = store.read_run()
    run["resolved_rules"] = result["resolved_rules"]
    run["kept"] = result["kept"]
    write_json(store.run_json, run)
    log.info("rules applied to %d clips in %d units: %d kept, %.1fs", result["clips"], result["units_rewritten"],
             result["kept"], time.monotonic() - started)
    return result


def _apply(store: OutputStore, ledger: Ledger, lock: compact.Lock, cfg: dict[str, Any]) -> dict[str, Any]:
    """apply_rules' work under the lock: returns its result and the files the commit replaced."""
    if not ledger.unit_count():
        raise FileNotFoundError(f"{store.root} has no committed units (no ledger/); run `curate run` first")

    # Every rule as absolute min/max: percentile rules resolved over every committed clip.
    steps = filter_steps(cfg)
    score_files = ledger.files("scores")
    resolved = resolve_rules(score_files, steps)
    effective = effective_steps(steps, resolved)
    _warn_unvalued(steps, _valued_columns(score_files, {c for _, rules in steps for c in rules}))

    # Near-duplicates: decided with each grouped clip's keep under the rules.
    decisions, dedup_summary = dedup.decide(store, ledger, cfg.get("dedup"), effective, score_files)

    # The pass: new scores and shards (and the loose clips compacted), then the checkpoint.
    target_bytes = float(cfg.get("run", {}).get("shard_target_mb", 256.0)) * 2**20
    rewrite = Rewrite(store, ledger, lock, target_bytes)
    try:
        clips = _stream(ledger, rewrite, effective, decisions)
        if rewrite.refused is not None:
            raise OutputError(
                f"clip {rewrite.refused} would be kept but its video was not stored (the run had "
                "run.store_all_clips=false, so only clips kept before have their payload); these rules "
                "can only be applied by a new run. Nothing was changed")
        written = rewrite.close()
    except BaseException:
        rewrite.abort()
        raise
    loose = ledger.loose_units()
    clips_files, clips_replaced = (compact.compact_kind(store, ledger, "clips", loose, lock, target_bytes)
                                   if loose else (ledger.compacted("clips"), []))
    units_file = f"units-{lock.seq:08d}-{lock.token}.parquet"
    units = compact.write_units(store, ledger, units_file, compacted=True, kept_unknown=True)
    compact.commit(store, lock.seq, units_file, units,
                   {"scores": written["scores"], "clips": clips_files, "shards": written["shards"]},
                   {**ledger.totals(), "kept": rewrite.kept}, "rules")
    replaced = {"scores": ledger.file_names("scores"), "shards": ledger.file_names("shards"),
                "clips": clips_replaced}
    return {"resolved_rules": resolved, "clips": clips, "kept": rewrite.kept, "units_rewritten": units,
            "dedup": dedup_summary, "replaced": replaced}


def _valued_columns(paths: list[Any], ruled: set[str]) -> set[str]:
    """The ruled columns some clip has a value for."""
    left, valued = set(ruled), set()
    for table in columns.scan(paths, sorted(ruled) + ["split_error", "start_frame"]):
        clip = columns.is_clip(table)
        for c in list(left):
            if (~np.isnan(columns.floats(table, c)[clip])).any():
                valued.add(c)
                left.discard(c)
        if not left:
            break
    return valued


def _stream(ledger: Ledger, rewrite: Rewrite, effective: list[Rules],
            decisions: dict[str, tuple[str, float]]) -> int:
    """Every scores row group through the rules into `rewrite`; returns the clips seen."""
    clips, last, started = 0, time.monotonic(), time.monotonic()
    groups = score_inputs(ledger)
    for k, paths in enumerate(groups):
        for group in columns.scan(paths):
            # In slices: each slice's kept clips are joined with their payload (videos) in memory.
            for table in group.to_batches(max_chunksize=PAYLOAD_SLICE_ROWS):
                table = pa.Table.from_batches([table])
                keep, reasons = evaluate(table, effective, decisions)
                rewrite.add(table, keep, reasons)
                clips += int(columns.is_clip(table).sum())
        rewrite.end_group()
        if time.monotonic() - last > PROGRESS_EVERY_S:
            last = time.monotonic()
            log.info("applying the rules: %d/%d files, %d clips, %d kept, %.0fs", k + 1, len(groups), clips,
                     rewrite.kept, last - started)
    if not rewrite.payload.exhausted() and rewrite.source == "clips":
        raise OutputError("clips/ holds more rows than scores/ has clips: the output is damaged")
    return clips
