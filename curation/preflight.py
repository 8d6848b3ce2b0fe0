"""Before Ray starts: check that every model weight the config needs is there.

A model stage lists the weight files it needs with `weights(step_name)` (stages/weights.py
WeightRequirement: config key, description, location, available) without loading anything.
A missing weight is a `ConfigError` naming the file and the config key that points at it,
never a silent fallback to random weights.

With `skip_unavailable=True` (`curate run --skip-unavailable-models`, what `make demo` passes
on a machine with no hub access) the steps whose weights are missing are removed instead,
along with steps that need a column only a removed step produces, and the filter rules on
the columns they would have produced are dropped and reported as not applied. The result
says so, for the terminal, run.json and the report.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from curation.config import ConfigError, PipelineConfig
from stages import STAGES

log = logging.getLogger(__name__)


@dataclass
class Preflight:
    config: PipelineConfig  # what will run
    skipped_steps: list[dict[str, Any]] = field(default_factory=list)
    rules_not_applied: list[dict[str, Any]] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "rules_not_applied": self.rules_not_applied}


def missing_weights(config: PipelineConfig) -> dict[str, list]:
    """{step name: [WeightRequirement not available]} for every step that lacks weights."""
    missing = {}
    for step in config.steps:
        weights = getattr(step.build(), "weights", None)
        if weights is None:
            continue
        lacking = [w for w in weights(step.name) if not w.available]  # keys named after the step
        if lacking:
            missing[step.name] = lacking
    return missing


def describe(missing: dict[str, list]) -> str:
    lines = []
    for step, reqs in missing.items():
        for w in reqs:
            note = f" ({w.note})" if getattr(w, "note", "") else ""
            lines.append(f"  step {step!r}: {w.what}: not found at {w.location}; set {w.key}{note}")
    return "\n".join(lines)


def preflight(config: PipelineConfig, skip_unavailable: bool = False) -> Preflight:
    missing = missing_weights(config)
    if not missing:
        return Preflight(config)
    if not skip_unavailable:
        raise ConfigError("model weights are missing:\n" + describe(missing) + "\n"
                          "Fix the paths (see `curate models check`), fill the cache with "
                          "`curate models download`, or pass --skip-unavailable-models to run "
                          "without these stages.")
    skipped: dict[str, str] = {name: "weights missing:\n" + describe({name: reqs})
                               for name, reqs in missing.items()}
    # Steps that need a column only a skipped step would produce are skipped too.
    changed = True
    while changed:
        changed = False
        lost = {c for s in config.steps if s.name in skipped for c in STAGES[s.stage].outputs}
        for step in config.steps:
            needs = set(STAGES[step.stage].requires)
            if step.name not in skipped and needs & lost:
                skipped[step.name] = f"needs {sorted(needs & lost)} from a skipped step"
                changed = True
    lost = {c for s in config.steps if s.name in skipped for c in STAGES[s.stage].outputs}
    steps, not_applied = [], []
    for step in config.steps:
        if step.name in skipped:
            continue
        rules = step.args.get("rules") if step.stage == "filter" else None
        if rules:
            kept = {col: b for col, b in rules.items() if col not in lost}
            not_applied += [{"step": step.name, "column": col, "rule": b}
                            for col, b in rules.items() if col in lost]
            step = dataclasses.replace(step, args={**step.args, "rules": kept})
        steps.append(step)
    result = Preflight(
        PipelineConfig(steps=steps, run=config.run),
        skipped_steps=[{"step": s.name, "stage": s.stage, "columns": list(STAGES[s.stage].outputs),
                        "reason": skipped[s.name]} for s in config.steps if s.name in skipped],
        rules_not_applied=not_applied,
    )
    banner = "!" * 78
    log.warning("%s", banner)
    log.warning("SKIPPING MODEL STAGES (--skip-unavailable-models): their scores will be missing")
    for s in result.skipped_steps:
        log.warning("  skipped step %r: %s", s["step"], s["reason"])
    for r in not_applied:
        log.warning("  rule NOT APPLIED: %s %s (step %r)", r["column"], r["rule"], r["step"])
    log.warning("%s", banner)
    return result
