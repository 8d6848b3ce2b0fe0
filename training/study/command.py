"""A whole study, planned, trained, evaluated and written (run_study, rerun_study), and `curate ablate`."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from curation import outdir
from curation.writer import write_json
from training.study.corpus import Corpus, load_corpus
from training.study.plan import materialize, prepare_study, study_dir
from training.study.results import analyze, format_results, write_back
from training.study.runs import run_tasks
from training.study.spec import EVAL_SETS, STUDY_FORMAT, StudyError, StudySpec

log = logging.getLogger(__name__)


def _check_same_record(root: Path, record: dict[str, Any], overwrite: bool) -> None:
    path = root / "study.json"
    if not path.exists() or overwrite:
        return
    old = json.loads(path.read_text())

    def substance(r: dict[str, Any]) -> Any:  # what decides the numbers (not wording, paths or dates)
        return ([r.get(k) for k in ("spec", "split", "eval", "tasks")],
                [(a["name"], a["stages"], a["same_as"], a["data"]) for a in r.get("arms", [])])

    if substance(old) != substance(record):
        raise StudyError(f"{root} holds a study with another spec or data; choose another --name, or "
                         "pass --overwrite to replace it")


def run_study(out_dir: str, spec: StudySpec, runner: str = "local", ray_address: str | None = None,
              num_cpus: int | None = None, cpus_per_task: float = 1.0, threads: int = 1,
              overwrite: bool = False, corpus: Corpus | None = None,
              record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plan (or take `record`), train and evaluate every arm, write results.json and the page."""
    import shutil

    corpus = corpus or load_corpus(out_dir, spec.max_clips)
    record = record or prepare_study(out_dir, spec, corpus)
    root = Path(record["root"])
    if overwrite and root.exists():
        shutil.rmtree(root)
    _check_same_record(root, record, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "study.json", record)
    tasks = materialize(record, corpus, threads)
    t0 = time.perf_counter()
    log.info("study %s: %d arms, %d runs (%s), held-out %d sources; writing %s", spec.name,
             len(record["arms"]), len(tasks), runner, len(record["split"]["heldout_sources"]), root)

    def progress(k: int, n: int, r: dict[str, Any]) -> None:
        log.info("study %s: run %d/%d done (%s seed %s, %.0fs)", spec.name, k, n, r["arm"], r["seed"],
                 r.get("seconds", 0.0))

    results = run_tasks(tasks, runner, ray_address, num_cpus, cpus_per_task, progress)
    out = analyze(record, results)
    out["wall_seconds"] = time.perf_counter() - t0
    write_json(root / "results.json", out)
    from training.study.report import write_page

    write_page(root, record, out)
    return out


def rerun_study(study_json: str, name: str, out_dir: str | None = None, **kwargs) -> dict[str, Any]:
    """Run a recorded study again under a new name: the same clip ids, configs, seeds and noise."""
    record = json.loads(Path(study_json).read_text())
    if record.get("format") != STUDY_FORMAT:
        raise StudyError(f"{study_json}: study format {record.get('format')}, this version reads {STUDY_FORMAT}")
    out_dir = out_dir or record["out_dir"]
    spec = replace(StudySpec.from_dict(record["spec"]), name=name)
    record = {**record, "spec": spec.to_dict(), "root": str(study_dir(out_dir, name)),
              "out_dir": outdir.absolute(str(out_dir)), "rerun_of": os.path.abspath(study_json)}
    return run_study(out_dir, spec, record=record, **kwargs)


# ---- the command ------------------------------------------------------------------------

def _floats(text: str) -> tuple[float, ...]:
    """'0,10,25,50' (percent) or '0,0.1,0.25' (fractions) -> fractions."""
    values = [float(v) for v in text.split(",") if v.strip()]
    if any(v >= 1 for v in values):
        values = [v / 100 for v in values]
    return tuple(values)


def _seeds(text: str) -> tuple[int, ...]:
    """'3' -> (0, 1, 2); '0,5,7' -> (0, 5, 7)."""
    if "," in text:
        return tuple(int(v) for v in text.split(",") if v.strip())
    return tuple(range(int(text)))


def ablate_command(argv: list[str]) -> int:
    """`curate ablate`: the proxy-model study. Returns a process exit code."""
    import argparse

    from training.config import SIZES

    p = argparse.ArgumentParser(
        prog="curate ablate",
        description="Does curation help? Train small proxy models on curated, uncurated (same size and "
                    "frames), leave-one-rule-out and threshold-sweep subsets of one curated output and "
                    "compare their denoising loss on held-out sources. Writes OUT_DIR/study/NAME/"
                    "{index.html,results.json,study.json}.")
    p.add_argument("out_dir", help="a finished curation output (with clips/: run.store_all_clips true)")
    p.add_argument("--name", default="default", help="study name: OUT_DIR/study/NAME (default: default)")
    p.add_argument("--preset-size", default="tiny", choices=list(SIZES),
                   help="tiny (default), small; base, large on GPUs (latent space: --set latent_autoencoder=PATH)")
    p.add_argument("--stages", default="image,video", help="stage plan of every arm (default image,video)")
    p.add_argument("--seeds", default="3", help="N (seeds 0..N-1) or a list 0,5,7 (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer config override for every arm (STAGE.KEY=VALUE for one stage), as curate train")
    p.add_argument("--holdout-fraction", type=float, default=0.25, help="share of sources held out (default 0.25)")
    p.add_argument("--holdout-source", action="append", default=[], metavar="ID_OR_PATH",
                   help="hold out this source (repeatable; replaces the fraction)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--leave-one-out", default="", metavar="COLUMNS",
                   help="also train with each of these rules left out (comma list, or all)")
    p.add_argument("--sweep", default="", metavar="COLUMN", help="threshold sweep on this rule's column")
    p.add_argument("--percentiles", default="0,10,25,50",
                   help="sweep: shares dropped, percent or fractions (default 0,10,25,50; 0 = no rule)")
    p.add_argument("--sweep-side", default="auto", choices=["auto", "drop_bottom", "drop_top"])
    p.add_argument("--sweep-metric", default="heldout_all", choices=list(EVAL_SETS))
    p.add_argument("--no-pretrain-compare", action="store_true",
                   help="skip the curated arm's video stage without image pretraining (SVD Fig. 3a)")
    p.add_argument("--eval-windows", type=int, default=4, help="frame windows per held-out clip (default 4)")
    p.add_argument("--eval-sigmas", type=int, default=8, help="noise levels in the fixed grid (default 8)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws (default 2000)")
    p.add_argument("--max-clips", type=int, default=20_000,
                   help="the study's corpus: at most about this many clips, whole sources sampled by a hash "
                        "of their id (default 20000)")
    p.add_argument("--runner", default="local", choices=["local", "ray"],
                   help="local: runs one after another here; ray: every (arm, seed) as a Ray task")
    p.add_argument("--ray-address", default=None, help="ray runner: a cluster (e.g. auto); default embedded")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray cluster")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="ray runner: CPUs per run (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--rerun", default=None, metavar="STUDY_JSON",
                   help="train a recorded study again (its clips, configs, seeds) under --name")
    p.add_argument("--write-back", action="store_true",
                   help="after the study, write the sweep's best setting back as the rule (curate refilter)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier study of this name")
    args = p.parse_args(argv)
    try:
        kwargs = dict(runner=args.runner, ray_address=args.ray_address, num_cpus=args.num_cpus,
                      cpus_per_task=args.cpus_per_run, threads=args.threads, overwrite=args.overwrite)
        if args.rerun:
            results = rerun_study(args.rerun, args.name, args.out_dir, **kwargs)
        else:
            spec = StudySpec(
                name=args.name, preset_size=args.preset_size,
                stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()),
                overrides=tuple(args.overrides), seeds=_seeds(args.seeds),
                holdout_fraction=args.holdout_fraction, holdout_sources=tuple(args.holdout_source),
                split_seed=args.split_seed,
                pretrain_compare=not args.no_pretrain_compare,
                leave_one_out=tuple(c.strip() for c in args.leave_one_out.split(",") if c.strip()),
                sweep_column=args.sweep, sweep_percentiles=_floats(args.percentiles) if args.sweep else (),
                sweep_side=args.sweep_side, sweep_metric=args.sweep_metric, eval_windows=args.eval_windows,
                eval_sigmas=args.eval_sigmas, bootstrap=args.bootstrap, max_clips=args.max_clips)
            results = run_study(args.out_dir, spec, **kwargs)
        print(format_results(results))
        print(f"page: {study_dir(args.out_dir, args.name) / 'index.html'}")
        if args.write_back:
            r = write_back(args.out_dir, args.name)
            print(f"wrote back {results['sweep']['best']['override']}: kept {r['kept_before']} -> {r['kept']} clips")
    except (StudyError, ValueError, FileNotFoundError) as exc:
        print(f"curate ablate: {exc}", file=sys.stderr)
        return 2
    return 0
