"""A study's results: results.json from its runs' evals, the terminal table, and the sweep's write-back."""

from __future__ import annotations

import json
import logging
from typing import Any

from stages.rules import fmt
from training.study.arms import Arm
from training.study.plan import study_dir
from training.study.spec import StudyError, StudySpec
from training.study.stats import comparisons_of, summarize

log = logging.getLogger(__name__)


def analyze(record: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json: per eval set, each arm's mean and interval and the differences; the sweep."""
    spec = StudySpec.from_dict(record["spec"])
    seeds = list(spec.seeds)
    arms = [a for a in record["arms"] if any(d["clip_ids"] for d in a["data"].values())]
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], {})[int(r["seed"])] = r
    for a in arms:
        if a["same_as"]:
            by_arm[a["name"]] = by_arm[a["same_as"]]
    names = [a["name"] for a in arms]
    arm_objs = [Arm(a["name"], a["kind"], a["description"], tuple(a["stages"]), {}, a["meta"], a["same_as"])
                for a in arms]
    cmps = comparisons_of(arm_objs)
    sets = {}
    for set_name in record["eval"]["sets"]:
        per_run = {n: {s: by_arm[n][s]["eval"][set_name] for s in seeds} for n in names}
        sets[set_name] = summarize(per_run, names, seeds, cmps, spec.bootstrap, spec.bootstrap_seed)
    out = {"study": spec.name, "out_dir": record["out_dir"], "spec": record["spec"],
           "eval": {k: v for k, v in record["eval"].items() if k != "sets"},
           "eval_sets": sets,
           "arms": [{k: a[k] for k in ("name", "kind", "description", "stages", "meta", "same_as")}
                    | {"clips_per_seed": {s: len(d["clip_ids"]) for s, d in a["data"].items()}}
                    for a in record["arms"]],
           "split": {"train_sources": len(record["split"]["train_sources"]),
                     "heldout_sources": len(record["split"]["heldout_sources"]),
                     "heldout_source_paths": record["split"]["heldout_source_paths"]},
           "runs": [{"arm": r["arm"], "seed": r["seed"], "seconds": r["seconds"],
                     "stages": r["stages"]} for r in results],
           "versions": record["versions"]}
    sweep = [a for a in arms if a["kind"] == "sweep"]
    if sweep and spec.sweep_metric not in sets:
        log.warning("sweep: no %s clips (the held-out sources have none), so no setting is chosen",
                    spec.sweep_metric)
    if sweep and spec.sweep_metric in sets:
        table = sets[spec.sweep_metric]["arms"]
        best = min(sweep, key=lambda a: (table[a["name"]]["mean"], a["meta"]["percentile"]))
        m = best["meta"]
        side, q = m["side"], m["percentile"]
        override = (f"{m['step']}.rules.{m['column']}=null" if q == 0
                    else f"{m['step']}.rules.{m['column']}={{{side}: {q:g}}}")
        out["sweep"] = {"column": m["column"], "side": side, "metric": spec.sweep_metric,
                        "settings": [{"arm": a["name"], "percentile": a["meta"]["percentile"],
                                      "threshold": a["meta"]["threshold"], "clips": a["meta"]["clips"],
                                      **{k: sets[s]["arms"][a["name"]][k] for s in [spec.sweep_metric]
                                         for k in ("mean", "ci95")}} for a in sweep],
                        "best": {"arm": best["name"], "percentile": q, "threshold": m["threshold"],
                                 "refilter": f"curate refilter {record['out_dir']} --set '{override}'",
                                 "override": override}}
    return out


def write_back(out_dir: str, name: str) -> dict[str, Any]:
    """Apply the sweep's best setting to the output as its rule (`curate refilter`)."""
    from curation.refilter import refilter

    path = study_dir(out_dir, name) / "results.json"
    if not path.exists():
        raise StudyError(f"{path} does not exist: run the study first")
    results = json.loads(path.read_text())
    if "sweep" not in results:
        raise StudyError(f"study {name} has no sweep to write back")
    best = results["sweep"]["best"]
    log.info("writing back %s (held-out loss %.4f) with refilter", best["override"],
             next(s["mean"] for s in results["sweep"]["settings"] if s["arm"] == best["arm"]))
    return refilter(out_dir, [best["override"]])


def format_results(results: dict[str, Any]) -> str:
    """The headline table for the terminal."""
    lines = []
    for set_name, s in results["eval_sets"].items():
        lines.append(f"{set_name}: {s['clips']} clips from {s['sources']} held-out sources, {s['samples']} samples; "
                     f"95% intervals over {s['interval_covers']}")
        lines += [f"  note: {n}" for n in s.get("notes", [])]
        for arm, a in s["arms"].items():
            lines.append(f"  {arm:<34} {a['mean']:.4f}  [{a['ci95'][0]:.4f}, {a['ci95'][1]:.4f}]")
        for c in s["comparisons"]:
            lines.append(f"  {c['label']:<60} {c['difference']:+.4f}  [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
                         f"  {c['verdict']}")
    if "sweep" in results:
        b = results["sweep"]["best"]
        thr = "no rule" if b["threshold"] is None else fmt(b["threshold"])
        lines.append(f"sweep {results['sweep']['column']}: lowest {results['sweep']['metric']} loss at "
                     f"{results['sweep']['side']} {b['percentile']:g} ({thr}); apply with: {b['refilter']}")
    return "\n".join(lines)

