"""A study's plan: split, arms, eval sets and tasks as one record (study.json), and its data files."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curation import outdir
from training.study.arms import Arm, plan_arms
from training.study.corpus import Corpus, load_corpus
from training.study.files import _ids_hash, write_clip_files
from training.study.runs import sigma_grid, stage_configs
from training.study.spec import STUDY_FORMAT, StudyError, StudySpec
from training.study.split import _rank, split_sources


# ---- the study --------------------------------------------------------------------------

def study_dir(out_dir: str, name: str) -> Path:
    """OUT_DIR/study/NAME; for an object-store OUT_DIR, under its local work folder (outdir.work_dir)."""
    return outdir.work_dir(out_dir) / "study" / name


def _versions() -> dict[str, str]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pyarrow": pa.__version__, "machine": platform.machine()}


def prepare_study(out_dir: str, spec: StudySpec, corpus: Corpus | None = None) -> dict[str, Any]:
    """Split, arms, data files and tasks of a study; returns the study record (study.json)."""
    corpus = corpus or load_corpus(out_dir, spec.max_clips)
    root = study_dir(out_dir, spec.name)
    dec = corpus.decodable
    sources = corpus.sources
    keep = corpus.stored_keep
    has_kept = {s: bool((keep & dec)[sources == s].any()) for s in set(sources[dec])}
    explicit = tuple(_source_ids(corpus, spec.holdout_sources))
    train_sources, held = split_sources(list(sources[dec]), has_kept, spec.holdout_fraction, spec.split_seed, explicit)
    arms = plan_arms(corpus, spec, train_sources)
    ids = corpus.ids
    heldout = dec & np.isin(sources, held)
    eval_ids = {"heldout_all": [ids[i] for i in np.flatnonzero(heldout)],
                "heldout_kept": [ids[i] for i in np.flatnonzero(heldout & keep)]}
    for name, chosen in eval_ids.items():
        if len(chosen) > spec.eval_max_clips:
            keep_ids = set(sorted(chosen, key=lambda c: _rank(spec.eval_seed, c))[:spec.eval_max_clips])
            eval_ids[name] = [c for c in chosen if c in keep_ids]
    if not eval_ids["heldout_all"]:
        raise StudyError("the held-out sources have no decodable clip")
    record = _record(out_dir, spec, corpus, train_sources, held, arms, eval_ids)
    return record


def _source_ids(corpus: Corpus, given: tuple[str, ...]) -> list[str]:
    """Held-out sources given as ids or paths (a path's file name is enough when unique)."""
    ids = corpus.clips.column("source_id").to_pylist()
    paths = corpus.clips.column("source_path").to_pylist()
    out = []
    for g in given:
        match = {i for i, p in zip(ids, paths) if g in (i, p) or os.path.basename(p) == g}
        if len(match) != 1:
            raise StudyError(f"held-out source {g!r} matches {len(match)} sources of this output")
        out.append(match.pop())
    return out


def _record(out_dir: str, spec: StudySpec, corpus: Corpus, train_sources: list[str], held: list[str],
            arms: list[Arm], eval_ids: dict[str, list[str]]) -> dict[str, Any]:
    root = study_dir(out_dir, spec.name)
    final_cfg = stage_configs(spec, tuple(spec.stages), spec.seeds[0])[-1]
    source_paths = dict(zip(corpus.clips.column("source_id").to_pylist(),
                            corpus.clips.column("source_path").to_pylist()))
    eval_sets = {name: {"clip_ids": chosen, "file": f"eval/{name}-{_ids_hash(chosen)}.parquet"}
                 for name, chosen in eval_ids.items() if chosen}
    arm_records, tasks = [], []
    for arm in arms:
        data = {}
        for s in spec.seeds:
            chosen = arm.clip_ids[s]
            data[str(s)] = {"clip_ids": chosen, "file": f"data/{arm.name}-{_ids_hash(chosen)}.parquet"}
        arm_records.append({"name": arm.name, "kind": arm.kind, "description": arm.description,
                            "stages": list(arm.stages), "meta": arm.meta, "same_as": arm.same_as, "data": data})
        if arm.same_as or not any(arm.clip_ids.values()):
            continue
        for s in spec.seeds:
            configs = stage_configs(spec, arm.stages, s)
            tasks.append({"arm": arm.name, "seed": s, "data_file": data[str(s)]["file"], "configs": configs,
                          "run": f"runs/{arm.name}/seed{s}"})
    return {
        "format": STUDY_FORMAT, "spec": spec.to_dict(), "out_dir": outdir.absolute(str(out_dir)),
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": _versions(),
        "corpus": {"config_fingerprint": corpus.run.get("config_fingerprint"), "clips": corpus.clips.num_rows,
                   "decodable": int(corpus.decodable.sum()), "stored_kept": int(corpus.stored_keep.sum()),
                   "not_decodable": corpus.decode_errors,
                   "rules": {n: r for n, r in corpus.steps}, "resolved_rules": corpus.resolved,
                   "rules_not_applied": corpus.run.get("rules_not_applied") or []},
        "split": {"train_sources": train_sources, "heldout_sources": held,
                  "heldout_source_paths": {s: source_paths.get(s) for s in held}},
        "eval": {"sets": eval_sets, "sigmas": sigma_grid(final_cfg, spec.eval_sigmas),
                 "windows": spec.eval_windows, "seed": spec.eval_seed, "batch": 32,
                 "stage": final_cfg["stage"]},
        "arms": arm_records, "tasks": tasks, "root": str(root),
    }


def materialize(record: dict[str, Any], corpus: Corpus, threads: int = 1) -> list[dict[str, Any]]:
    """Write the record's data files and return its runnable tasks (absolute paths)."""
    root = Path(record["root"])
    wanted = {str(root / d["file"]): d["clip_ids"] for arm in record["arms"] for d in arm["data"].values()
              if d["clip_ids"] and not arm["same_as"]}
    wanted.update({str(root / e["file"]): e["clip_ids"] for e in record["eval"]["sets"].values()})
    write_clip_files(corpus, wanted)
    ev = {k: record["eval"][k] for k in ("sigmas", "windows", "seed", "batch")}
    eval_paths = {name: str(root / e["file"]) for name, e in record["eval"]["sets"].items()}
    out = []
    for t in record["tasks"]:
        out.append({"arm": t["arm"], "seed": t["seed"], "data": str(root / t["data_file"]),
                    "configs": t["configs"], "run_dir": str(root / t["run"]), "eval": ev,
                    "eval_paths": eval_paths, "threads": threads,
                    "eval_files": {n: e["file"] for n, e in record["eval"]["sets"].items()},
                    "data_file": t["data_file"]})
    return out

