"""The rules applied over a whole run's stored scores: the end-of-run pass (`finalize`, for
percentile rules and near-duplicate removal) and the pass under `curate refilter` (`apply_rules`).

The rule logic is stages/rules.py's (resolution of percentile rules, evaluation); this module
reads the stored scores and writes the results. `apply_rules`:

1. resolve every percentile rule ({drop_bottom: q} / {drop_top: q}) over the non-missing
   values of every committed clip (convention in stages/rules.py: drop_bottom 0.25 ->
   min = the value with 25% of the clips below it; values below min are rejected);
2. evaluate every rule of every filter step, in pipeline order, on every row of scores/
   (absolute rules and resolved ones alike) -> keep and reject_reasons, exactly as the filter
   stage would have written them; source-error rows stay rejected with "split_error";
3. per unit, where anything changed: write new shard files shards/<unit>-r<hash>-<k>.parquet
   (named after the kept set, never the names the ledger lists now) from the payload in
   clips/<unit>.parquet joined with the new scores, then scores/<unit>.parquet, then the
   unit's ledger entry (kept, shard_files); at the end delete shard files no entry lists.
   Readers of shards (`curate train`, Ray Train workers) read only the files the ledger lists,
   so they never see an interrupted pass's new files; `curate train` refuses an output whose
   refilter did not finish (run.json's last "refilters" entry is not "finished"). An
   interrupted pass is finished, not rolled back: by running the same refilter again, or by
   the next `curate run` with the new rules;
4. record the resolved thresholds in run.json under "resolved_rules".

With a `dedup:` section in the config, step 2 is followed by near-duplicate removal over all
units (curation/dedup.py): every clip but one of each near-duplicate group gets the reason
"duplicate_of:<clip_id>", the kept one chosen among the clips passing the rules. The groups
are cached under OUT_DIR/dedup/, so a refilter keeps the dedup decisions (recomputed for the
new rules from the same groups) and `curate dedup` / `--set dedup.eps=...` redoes them.

Nothing is decoded or scored again. Every file is written under a temporary name and renamed.
The result depends only on the score columns and the rules, never on the keep/reject_reasons
already stored, so a pass killed part-way and run again gives the same result as one that was
never interrupted (a unit is skipped only when its scores and its shard files already match).

Limits: clips rejected by a filter step placed before an expensive stage have no value for
that stage's scores (the stage skipped them), so loosening such a rule keeps them rejected as
"<column>:missing"; and with run.store_all_clips=false only clips that are in shards already
have their payload stored, so refilter can tighten but not loosen (it refuses, naming a clip).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import dedup, outdir, schema
from curation.config import PipelineConfig
from curation.writer import OutputError, OutputStore, add_derived_columns, write_json, write_parquet_atomic
from stages.rules import (
    Rules,
    effective_steps,
    evaluate_rows,
    filter_steps,
    float_values,
    is_percentile,
    percentile_rules,
    resolve_steps,
)

log = logging.getLogger(__name__)

PAYLOAD_COLUMNS = [f.name for f in schema.PAYLOAD_FIELDS]


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


# ---- reading the stored scores ------------------------------------------------------------------

def _read_unit_scores(store: OutputStore, ledger: dict[str, dict[str, Any]]) -> dict[str, pa.Table]:
    tables = {}
    for unit_id, entry in ledger.items():
        path = store.scores_dir / entry["scores_file"]
        if not path.exists():
            raise OutputError(f"{path}: listed in the ledger but missing; the output is damaged")
        tables[unit_id] = outdir.read_table(path)
    return tables


def _is_error(table: pa.Table) -> np.ndarray:
    """Source-error rows (not clips): split_error set and no frame range."""
    return (pc.is_valid(table.column("split_error")).to_numpy(zero_copy_only=False)
            & pc.is_null(table.column("start_frame")).to_numpy(zero_copy_only=False))


def clip_values(tables: list[pa.Table], columns: set[str]) -> dict[str, np.ndarray]:
    """{column: float64 values over the clip rows of every table, NaN where missing}; a column
    no table has is left out."""
    values = {}
    for column in sorted(columns):
        parts = [float_values(t.column(column))[~_is_error(t)] for t in tables if column in t.column_names]
        if parts:
            values[column] = np.concatenate(parts)
    return values


def resolve_rules(steps: list[tuple[str, Rules]], values: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """{step: {column: resolved}} for every percentile rule (stages.rules.resolve_steps), logged."""
    resolved = resolve_steps(steps, values)
    for step_name, rules in steps:
        for column, bounds in percentile_rules(rules).items():
            log.info("resolved %s.%s %s over %d clips -> %s", step_name, column, bounds,
                     resolved[step_name][column]["values"],
                     {k: v for k, v in resolved[step_name][column].items() if k in ("min", "max")})
    return resolved


def _warn_unvalued(steps: list[tuple[str, Rules]], values: dict[str, np.ndarray]) -> None:
    for name, rules in steps:
        for column in rules:
            if column not in values or np.isnan(values[column]).all():
                log.warning("rule %s.%s: no clip has a value for %s (its stage did not run?); "
                            "every clip is rejected as %s:missing", name, column, column, column)


def _new_filter_columns(table: pa.Table, steps: list[Rules]) -> tuple[list[bool], list[list[str]]]:
    names = {c for rules in steps for c in rules if c in table.column_names}
    return evaluate_rows(_is_error(table), {c: float_values(table.column(c)) for c in names}, steps)


def _payload(store: OutputStore, unit_id: str, entry: dict[str, Any]) -> pa.Table:
    """clip_id + payload columns of a unit: clips/ (every clip), else its current shards.
    A column an older output lacks (e.g. temporal_signature) comes back as nulls."""
    target = pa.schema([schema.CLIPS_SCHEMA.field("clip_id")] + schema.PAYLOAD_FIELDS)

    def read(path: Path) -> pa.Table:
        present = set(outdir.read_schema(path).names)
        return schema.conform(outdir.read_table(path, columns=[c for c in target.names if c in present]), target)

    clips_file = entry.get("clips_file") or f"{unit_id}.parquet"
    path = store.clips_dir / clips_file
    if path.exists():
        return read(path)
    parts = [read(store.shards_dir / name) for name in entry.get("shard_files", [])
             if (store.shards_dir / name).exists()]
    if not parts:
        return schema.conform(pa.table({"clip_id": pa.array([], pa.string())}), target)
    return pa.concat_tables(parts)


def _shard_clip_ids(store: OutputStore, entry: dict[str, Any]) -> list[str]:
    """clip_ids in the unit's ledger-listed shard files, in file order."""
    ids: list[str] = []
    for name in entry.get("shard_files", []):
        path = store.shards_dir / name
        if not path.exists():
            return []  # damaged: rewritten below
        ids.extend(outdir.read_table(path, columns=["clip_id"]).column("clip_id").to_pylist())
    return ids


def _check_payload_stored(store: OutputStore, unit_id: str, entry: dict[str, Any], table: pa.Table,
                          keep: list[bool]) -> None:
    """Refuse (OutputError) to keep a clip whose video was not stored (run.store_all_clips=false)."""
    clips_file = store.clips_dir / (entry.get("clips_file") or f"{unit_id}.parquet")
    if clips_file.exists():
        return
    stored = set(_shard_clip_ids(store, entry))
    ids = table.column("clip_id").to_pylist()
    lacking = [cid for cid, k in zip(ids, keep) if k and cid not in stored]
    if lacking:
        raise OutputError(
            f"clip {lacking[0]} (and {len(lacking) - 1} more) would be kept but its video was "
            f"not stored ({clips_file} is missing: the run had run.store_all_clips=false); "
            "these rules can only be applied by a new run")


# ---- writing ------------------------------------------------------------------------------------

def shard_version(kept_ids: list[str]) -> str:
    """A name part for a refilter's shard files: the same kept set gives the same names, so a
    pass killed and run again writes the same files, and never the files listed now."""
    return "r" + hashlib.sha1(",".join(kept_ids).encode()).hexdigest()[:8]


def _with_filter_columns(table: pa.Table, keep: list[bool], reasons: list[list[str]]) -> pa.Table:
    """The unit's scores with the new keep and reject_reasons, conformed to the contract."""
    return schema.conform(
        table.set_column(table.column_names.index("keep"), "keep", pa.array(keep, pa.bool_()))
             .set_column(table.column_names.index("reject_reasons"), "reject_reasons",
                         pa.array(reasons, pa.list_(pa.string()))),
        schema.SCORES_SCHEMA)


def _write_kept_shards(store: OutputStore, unit_id: str, entry: dict[str, Any], scores: pa.Table,
                       keep: list[bool], kept_ids: list[str], shard_target_mb: float) -> list[str]:
    """New shard files for the unit's kept clips (scores joined with their payload); their names."""
    kept_rows = scores.filter(pa.array(keep, pa.bool_()))
    payload = _payload(store, unit_id, entry)
    index = {cid: i for i, cid in enumerate(payload.column("clip_id").to_pylist())}
    take = pa.array([index[cid] for cid in kept_ids], pa.int64())
    joined = kept_rows
    for name in PAYLOAD_COLUMNS:
        joined = joined.append_column(name, payload.column(name).take(take))
    return store.write_shards(unit_id, add_derived_columns(joined), shard_target_mb,
                              version=shard_version(kept_ids))


def _rewrite_unit(store: OutputStore, ledger: dict[str, dict[str, Any]], unit_id: str, table: pa.Table,
                  keep: list[bool], reasons: list[list[str]], shard_target_mb: float) -> bool:
    """Write the unit's scores, shards and ledger entry where they changed; False if none did."""
    entry = ledger[unit_id]
    ids = table.column("clip_id").to_pylist()
    kept_ids = [cid for cid, k in zip(ids, keep) if k]
    scores_ok = (table.column("keep").to_pylist() == keep
                 and table.column("reject_reasons").to_pylist() == reasons)
    # Shards hold kept rows only (reasons empty, scores unchanged): they need rewriting
    # only when the kept set changed, or when a killed pass left them out of step.
    shards_ok = _shard_clip_ids(store, entry) == kept_ids and entry.get("kept") == len(kept_ids)
    if scores_ok and shards_ok:
        return False
    new_scores = _with_filter_columns(table, keep, reasons)

    # Shards first, under new names: the ledger still lists the old ones, which readers go
    # on seeing until the entry switches below. The skip test above compares the listed
    # shards with the new keep, so a pass killed after this point redoes the unit.
    if not shards_ok:
        names = _write_kept_shards(store, unit_id, entry, new_scores, keep, kept_ids, shard_target_mb)
    if not scores_ok:
        write_parquet_atomic(store.scores_dir / entry["scores_file"], new_scores)
    if not shards_ok:
        ledger[unit_id] = {**entry, "kept": len(kept_ids), "shard_files": names}
        write_json(store.ledger_dir / f"{unit_id}.json", ledger[unit_id])
        log.debug("unit %s: %d kept, shards %s", unit_id, len(kept_ids), names)
    return True


def _remove_unlisted_shards(store: OutputStore, ledger: dict[str, dict[str, Any]]) -> None:
    """Shard files of committed units that their entry no longer lists (replaced ones)."""
    listed = {name for e in ledger.values() for name in e.get("shard_files", [])}
    for path in store.shards_dir.glob("*.parquet"):
        if path.name.split("-")[0] in ledger and path.name not in listed:
            path.unlink(missing_ok=True)


# ---- the pass -----------------------------------------------------------------------------------

def apply_rules(out_dir: str | Path, config: PipelineConfig | dict[str, Any]) -> dict[str, Any]:
    """Resolve percentile rules, recompute keep/reject_reasons, rewrite scores/ and shards/.

    Returns {"resolved_rules", "clips", "kept", "units_rewritten", "dedup"}; also records
    resolved_rules and the kept total in run.json.
    """
    started = time.monotonic()
    cfg = _config_dict(config)
    store = OutputStore(out_dir)
    ledger = store.committed()
    if not ledger:
        raise FileNotFoundError(f"{out_dir} has no committed units (no ledger/); run `curate run` first")

    # Every rule as absolute min/max: percentile rules resolved over every committed clip.
    steps = filter_steps(cfg)
    tables = _read_unit_scores(store, ledger)
    values = clip_values(list(tables.values()), {c for _, rules in steps for c in rules})
    resolved = resolve_rules(steps, values)
    _warn_unvalued(steps, values)
    effective = effective_steps(steps, resolved)

    # Plan every unit first, so a refilter that cannot be done changes nothing.
    plans = {unit_id: _new_filter_columns(table, effective) for unit_id, table in tables.items()}
    dedup_summary = dedup.apply_to_plans(store, ledger, cfg.get("dedup"), tables, plans)
    for unit_id, table in tables.items():
        _check_payload_stored(store, unit_id, ledger[unit_id], table, plans[unit_id][0])

    # Rewrite the units that changed; replaced shard files go last, when no entry lists them.
    shard_target_mb = float(cfg.get("run", {}).get("shard_target_mb", 256.0))
    rewritten = sum(_rewrite_unit(store, ledger, unit_id, table, *plans[unit_id], shard_target_mb)
                    for unit_id, table in tables.items())
    _remove_unlisted_shards(store, ledger)

    # Record the thresholds and the kept total.
    clips = sum(int((~_is_error(table)).sum()) for table in tables.values())
    kept_total = sum(int(sum(keep)) for keep, _ in plans.values())
    run = store.read_run()
    run["resolved_rules"] = resolved
    run["kept"] = kept_total
    write_json(store.run_json, run)
    log.info("rules applied to %d clips in %d units (%d rewritten): %d kept, %.1fs",
             clips, len(tables), rewritten, kept_total, time.monotonic() - started)
    return {"resolved_rules": resolved, "clips": clips, "kept": kept_total, "units_rewritten": rewritten,
            "dedup": dedup_summary}
