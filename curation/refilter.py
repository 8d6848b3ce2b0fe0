"""`curate refilter`: new filter rules (and dedup settings) on a finished run's stored scores.

The overrides are checked (only filter rules and the dedup section may change), applied to
the config recorded in run.json, and recorded there first (with the previous rules in the
"refilters" history, marked unfinished); then the same pass as the end of every run
(`curation.finalize.apply_rules`: percentile rules resolved, every rule evaluated again,
scores/, shards/ and ledger/ rewritten where they changed) applies them, and the history entry
is marked finished. Nothing is decoded or scored again; an interrupted refilter is finished
by running it again (curation/finalize.py says why that is safe).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from curation.config import ConfigError, apply_override, parse_config
from curation.finalize import apply_rules
from curation.writer import OutputError, OutputStore, write_json
from stages.rules import filter_steps


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
