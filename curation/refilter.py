"""New thresholds on stored scores: the end-of-run pass for percentile rules, and `curate refilter`.

Both rewrite the same things from the same inputs, so they share one function (`apply_rules`):

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

import copy
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import schema
from curation import dedup
from curation.config import ConfigError, PipelineConfig, apply_override, parse_config
from stages.rules import (
    Rules,
    effective_bounds,
    evaluate_rows,
    filter_steps,
    float_values,
    is_percentile,
    resolve_percentile,
)
from curation.writer import OutputError, OutputStore, add_derived_columns, write_json, write_parquet_atomic

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


# ---- the shared pass ----------------------------------------------------------------------------

def _read_unit_scores(store: OutputStore, ledger: dict[str, dict[str, Any]]) -> dict[str, pa.Table]:
    tables = {}
    for unit_id, entry in ledger.items():
        path = store.scores_dir / entry["scores_file"]
        if not path.exists():
            raise OutputError(f"{path}: listed in the ledger but missing; the output is damaged")
        tables[unit_id] = pq.read_table(path)
    return tables


def _is_error(table: pa.Table) -> np.ndarray:
    """Source-error rows (not clips): split_error set and no frame range."""
    return (pc.is_valid(table.column("split_error")).to_numpy(zero_copy_only=False)
            & pc.is_null(table.column("start_frame")).to_numpy(zero_copy_only=False))


def resolve_rules(steps: list[tuple[str, Rules]], tables: list[pa.Table]) -> dict[str, dict[str, Any]]:
    """{step: {column: resolved}} for every percentile rule, over every clip row of `tables`."""
    resolved: dict[str, dict[str, Any]] = {}
    for step_name, rules in steps:
        for column, bounds in rules.items():
            if not is_percentile(bounds):
                continue
            parts = [float_values(t.column(column))[~_is_error(t)] for t in tables if column in t.column_names]
            values = np.concatenate(parts) if parts else np.zeros(0)
            resolved.setdefault(step_name, {})[column] = resolve_percentile(values, bounds)
            log.info("resolved %s.%s %s over %d clips -> %s", step_name, column, bounds,
                     resolved[step_name][column]["values"],
                     {k: v for k, v in resolved[step_name][column].items() if k in ("min", "max")})
    return resolved


def _new_filter_columns(table: pa.Table, steps: list[Rules]) -> tuple[list[bool], list[list[str]]]:
    names = {c for rules in steps for c in rules if c in table.column_names}
    return evaluate_rows(_is_error(table), {c: float_values(table.column(c)) for c in names}, steps)


def _payload(store: OutputStore, unit_id: str, entry: dict[str, Any]) -> pa.Table:
    """clip_id + payload columns of a unit: clips/ (every clip), else its current shards."""
    clips_file = entry.get("clips_file") or f"{unit_id}.parquet"
    path = store.clips_dir / clips_file
    if path.exists():
        return pq.read_table(path, columns=["clip_id"] + PAYLOAD_COLUMNS)
    parts = [pq.read_table(store.shards_dir / name, columns=["clip_id"] + PAYLOAD_COLUMNS)
             for name in entry.get("shard_files", []) if (store.shards_dir / name).exists()]
    if not parts:
        return schema.conform(pa.table({"clip_id": pa.array([], pa.string())}),
                              pa.schema([schema.CLIPS_SCHEMA.field("clip_id")] + schema.PAYLOAD_FIELDS))
    return pa.concat_tables(parts)


def _shard_clip_ids(store: OutputStore, entry: dict[str, Any]) -> list[str]:
    """clip_ids in the unit's ledger-listed shard files, in file order."""
    ids: list[str] = []
    for name in entry.get("shard_files", []):
        path = store.shards_dir / name
        if not path.exists():
            return []  # damaged: rewritten below
        ids.extend(pq.read_table(path, columns=["clip_id"]).column("clip_id").to_pylist())
    return ids


def shard_version(kept_ids: list[str]) -> str:
    """A name part for a refilter's shard files: the same kept set gives the same names, so a
    pass killed and run again writes the same files, and never the files listed now."""
    return "r" + hashlib.sha1(",".join(kept_ids).encode()).hexdigest()[:8]


def _remove_unlisted_shards(store: OutputStore, ledger: dict[str, dict[str, Any]]) -> None:
    """Shard files of committed units that their entry no longer lists (replaced ones)."""
    listed = {name for e in ledger.values() for name in e.get("shard_files", [])}
    for path in store.shards_dir.glob("*.parquet"):
        if path.name.split("-")[0] in ledger and path.name not in listed:
            path.unlink(missing_ok=True)


def apply_rules(out_dir: str | Path, config: PipelineConfig | dict[str, Any]) -> dict[str, Any]:
    """Resolve percentile rules, recompute keep/reject_reasons, rewrite scores/ and shards/.

    Returns {"resolved_rules", "clips", "kept", "units_rewritten"}; also records
    resolved_rules and the kept total in run.json.
    """
    started = time.monotonic()
    cfg = _config_dict(config)
    store = OutputStore(out_dir)
    ledger = store.committed()
    if not ledger:
        raise FileNotFoundError(f"{out_dir} has no committed units (no ledger/); run `curate run` first")
    steps = filter_steps(cfg)
    tables = _read_unit_scores(store, ledger)
    resolved = resolve_rules(steps, list(tables.values()))
    effective = [{c: effective_bounds(b, resolved.get(name, {}).get(c)) for c, b in rules.items()}
                 for name, rules in steps]
    for name, rules in steps:
        for column in rules:
            if not any(column in t.column_names and (~np.isnan(float_values(t.column(column))[~_is_error(t)])).any()
                       for t in tables.values()):
                log.warning("rule %s.%s: no clip has a value for %s (its stage did not run?); "
                            "every clip is rejected as %s:missing", name, column, column, column)
    shard_target_mb = float(cfg.get("run", {}).get("shard_target_mb", 256.0))

    # Plan every unit first, so a refilter that cannot be done changes nothing.
    plans = {unit_id: _new_filter_columns(table, effective) for unit_id, table in tables.items()}
    dedup_summary = dedup.apply_to_plans(store, ledger, cfg.get("dedup"), tables, plans)
    for unit_id, table in tables.items():
        keep, _ = plans[unit_id]
        entry = ledger[unit_id]
        clips_file = store.clips_dir / (entry.get("clips_file") or f"{unit_id}.parquet")
        if not clips_file.exists():
            stored = set(_shard_clip_ids(store, entry))
            ids = table.column("clip_id").to_pylist()
            lacking = [cid for cid, k in zip(ids, keep) if k and cid not in stored]
            if lacking:
                raise OutputError(
                    f"clip {lacking[0]} (and {len(lacking) - 1} more) would be kept but its video was "
                    f"not stored ({clips_file} is missing: the run had run.store_all_clips=false); "
                    "these rules can only be applied by a new run")

    rewritten = 0
    clips = kept_total = 0
    for unit_id, table in tables.items():
        keep, reasons = plans[unit_id]
        entry = ledger[unit_id]
        ids = table.column("clip_id").to_pylist()
        kept_ids = [cid for cid, k in zip(ids, keep) if k]
        clips += int((~_is_error(table)).sum())
        kept_total += len(kept_ids)
        shard_ids = _shard_clip_ids(store, entry)
        scores_ok = (table.column("keep").to_pylist() == keep
                     and table.column("reject_reasons").to_pylist() == reasons)
        # Shards hold kept rows only (reasons empty, scores unchanged): they need rewriting
        # only when the kept set changed, or when a killed pass left them out of step.
        shards_ok = shard_ids == kept_ids and entry.get("kept") == len(kept_ids)
        if scores_ok and shards_ok:
            continue
        rewritten += 1
        new_scores = schema.conform(
            table.set_column(table.column_names.index("keep"), "keep", pa.array(keep, pa.bool_()))
                 .set_column(table.column_names.index("reject_reasons"), "reject_reasons",
                             pa.array(reasons, pa.list_(pa.string()))),
            schema.SCORES_SCHEMA)

        # Shards first, under new names: the ledger still lists the old ones, which readers go
        # on seeing until the entry switches below. The skip test above compares the listed
        # shards with the new keep, so a pass killed after this point redoes the unit.
        if not shards_ok:
            kept_rows = new_scores.filter(pa.array(keep, pa.bool_()))
            payload = _payload(store, unit_id, entry)
            index = {cid: i for i, cid in enumerate(payload.column("clip_id").to_pylist())}
            take = pa.array([index[cid] for cid in kept_ids], pa.int64())
            joined = kept_rows
            for name in PAYLOAD_COLUMNS:
                joined = joined.append_column(name, payload.column(name).take(take))
            names = store.write_shards(unit_id, add_derived_columns(joined), shard_target_mb,
                                       version=shard_version(kept_ids))
        if not scores_ok:
            write_parquet_atomic(store.scores_dir / entry["scores_file"], new_scores)
        if not shards_ok:
            ledger[unit_id] = {**entry, "kept": len(kept_ids), "shard_files": names}
            write_json(store.ledger_dir / f"{unit_id}.json", ledger[unit_id])
            log.debug("unit %s: %d kept, shards %s", unit_id, len(kept_ids), names)
    # Replaced shard files go last, when no entry lists them any more.
    _remove_unlisted_shards(store, ledger)

    run = store.read_run()
    run["resolved_rules"] = resolved
    run["kept"] = kept_total
    write_json(store.run_json, run)
    log.info("rules applied to %d clips in %d units (%d rewritten): %d kept, %.1fs",
             clips, len(tables), rewritten, kept_total, time.monotonic() - started)
    return {"resolved_rules": resolved, "clips": clips, "kept": kept_total, "units_rewritten": rewritten,
            "dedup": dedup_summary}


# ---- the two entry points -----------------------------------------------------------------------

def finalize(out_dir: str | Path, config: PipelineConfig | dict[str, Any]) -> dict[str, dict[str, Any]]:
    """End-of-run pass for percentile rules; returns (and records) {step: {column: resolved}}."""
    return apply_rules(out_dir, config)["resolved_rules"]


def _rules_override_check(raw: dict[str, Any], override: str) -> None:
    """Refilter may change only a filter step's rules and the dedup section: anything else needs
    a new run."""
    path = override.partition("=")[0].strip()
    parts = path.split(".")
    if parts[0] == "dedup":
        return
    steps = {s.get("name", s.get("stage")): s.get("stage") for s in raw.get("steps", [])}
    filters = [n for n, stage in steps.items() if stage == "filter"]
    if parts[0] in steps and (steps[parts[0]] != "filter" or len(parts) < 3 or parts[1] != "rules") \
            or parts[0] == "run":
        raise ConfigError(f"--set {path}: refilter changes only filter rules "
                          f"({', '.join(f + '.rules.COLUMN.KEY' for f in filters) or 'no filter step'}) "
                          "and dedup.KEY; "
                          "other settings need a new `curate run`")


def _prune_nulls(raw: dict[str, Any]) -> None:
    """`--set filter.rules.X=null` removes rule X, `...X.min=null` removes its min."""
    for step in raw.get("steps", []):
        if step.get("stage") != "filter":
            continue
        rules = (step.get("args") or {}).get("rules")
        if not isinstance(rules, dict):
            continue
        for column in list(rules):
            bounds = rules[column]
            if isinstance(bounds, dict):
                for k in [k for k, v in bounds.items() if v is None]:
                    del bounds[k]
            if bounds is None or bounds == {}:
                del rules[column]


def refilter(out_dir: str | Path, overrides: list[str], drop_dedup: bool = False) -> dict[str, Any]:
    """Apply `--set STEP.rules.COLUMN.KEY=VALUE` overrides to a finished run's stored scores.

    The config recorded in run.json is updated (with the previous rules in run.json's
    "refilters" history) and its fingerprint too, so resuming with `curate run` and the new
    rules continues the same output. `drop_dedup` removes the config's dedup section first
    (`curate dedup --off`). Returns apply_rules' result plus kept_before and config.
    """
    store = OutputStore(out_dir)
    run = store.read_run()
    if not run or "config" not in run:
        raise FileNotFoundError(f"{out_dir} is not a curation output (no run.json); run `curate run` first")
    if run.get("status") != "complete":
        raise OutputError(f"{out_dir}: the run is not complete (status {run.get('status')!r}); "
                          "resume it with the same `curate run` command first")
    raw = copy.deepcopy(run["config"])
    if drop_dedup:
        raw.pop("dedup", None)
    for override in overrides:
        _rules_override_check(raw, override)
        apply_override(raw, override)
    _prune_nulls(raw)
    config = parse_config(raw, f"{store.run_json} config")
    kept_before = run.get("kept")

    # The new config is recorded before any table changes, marked unfinished: a refilter killed
    # part-way leaves a run.json that says so (the report warns), and running the same refilter
    # again finishes it (apply_rules is idempotent).
    run.setdefault("refilters", []).append({
        "at": time.time(),
        "overrides": list(overrides),
        "previous_rules": {name: rules for name, rules in filter_steps(run["config"])},
        "previous_fingerprint": run.get("config_fingerprint"),
        "previous_resolved_rules": run.get("resolved_rules", {}),
        "previous_dedup": run["config"].get("dedup"),
        "kept_before": kept_before,
        "finished": False,
    })
    run["config"] = config.to_dict()
    run["config_fingerprint"] = config.fingerprint()
    # A rule preflight dropped (its stage was skipped) and now set again is applied: to every
    # clip, as missing, which apply_rules warns about.
    ruled = {(name, column) for name, rules in filter_steps(run["config"]) for column in rules}
    run["rules_not_applied"] = [x for x in run.get("rules_not_applied") or []
                                if not (isinstance(x, dict) and (x.get("step"), x.get("column")) in ruled)]
    write_json(store.run_json, run)

    result = apply_rules(store.root, config)

    run = store.read_run()  # apply_rules recorded resolved_rules and kept
    run["refilters"][-1].update({"finished": True, "kept_after": result["kept"]})
    write_json(store.run_json, run)
    return {**result, "kept_before": kept_before, "config": config.to_dict()}
