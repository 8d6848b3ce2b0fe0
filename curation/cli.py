"""The `curate` command.

    curate run pipeline.yaml --input RAW --output OUT [--set step.arg=value] [--ray-address auto]
    curate report OUT                                (OUT/report/index.html + terminal table)
    curate refilter OUT --set filter.rules...        (new thresholds, no recompute)
    curate review OUT [--config FILE] [--port N]     (a local page: thresholds by dragging, curation/review/)
    curate dedup OUT [--eps E] [--off]               (near-duplicate removal, curation/dedup/)
    curate compact OUT                               (large files, a ledger checkpoint: curation/compact.py)
    curate models check|download [pipeline.yaml]     (curation/weights_command.py)
    curate train OUT --stage image|video|hq|all      (training/cli.py)
    curate export OUT --format webdataset|files|hf --to DIR   (curation/export.py)
    curate sample CHECKPOINT --prompt "..."          (training/cli.py)
    curate ablate OUT [--leave-one-out all] [--sweep COLUMN]  (proxy-model study, training/study/)
    curate demo-footage DIR                          (deterministic sample footage)

Exit codes: 0 the run finished (sources that could not be read are recorded as error rows
and counted in the summary, they do not fail the run); 2 bad usage or config (nothing was
started); 1 an unexpected failure (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from stages import redaction

log = logging.getLogger("curate")


def setup_logging(verbose: bool = False) -> None:
    """Log to the terminal (INFO, or DEBUG with -v)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(console)
    redaction.install()  # no credential in a log line, a traceback or anything printed
    for noisy in ("ray", "urllib3", "matplotlib", "PIL", "pyscenedetect"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_to_file(log_dir: Path) -> Path:
    """Also log everything (DEBUG) to a new file in log_dir (a local folder)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    fh = logging.FileHandler(log_file)
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    fh.addFilter(redaction.RedactingFilter())
    logging.getLogger().addHandler(fh)
    return log_file


def cmd_run(args: argparse.Namespace) -> int:
    from curation.config import load_config
    from curation.outdir import StorePath, out_path
    from curation.preflight import preflight

    # Every config error, missing weights included, surfaces here, before Ray starts.
    config = load_config(args.config, args.set)
    checked = preflight(config, skip_unavailable=args.skip_unavailable_models)
    out = out_path(args.output)
    if isinstance(out, StorePath):
        # Nothing local beside the temporary folder: the log is written there and uploaded
        # to OUT/logs/ when the command ends, however it ends (a SIGKILLed driver's log is
        # uploaded by the next command that starts on this machine).
        _upload_orphan_logs()
        local_logs = Path(tempfile.mkdtemp(prefix=f"{LOG_PREFIX}{os.getpid()}-"))
        target = out / "logs"
        (local_logs / "target").write_text(str(target))
        log_file = log_to_file(local_logs)
        log.info("logging to %s (uploaded to %s at the end)", log_file, target / log_file.name)
        try:
            return _run(args, checked, out)
        except BaseException:
            log.debug("the run failed", exc_info=True)  # the traceback in the uploaded log
            raise
        finally:
            _close_log(log_file)
            _upload_logs(local_logs)
    log.info("logging to %s", log_to_file(out / "logs"))
    return _run(args, checked, out)


LOG_PREFIX = "curate-logs-"  # $TMPDIR/curate-logs-<pid>-*: a run's log while OUT_DIR is remote


def _close_log(log_file: Path) -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)
              and Path(h.baseFilename) == log_file.resolve()]:
        h.close()
        root.removeHandler(h)


LOG_UPLOAD_TRIES = 4  # on top of the store client's own retries
LOG_UPLOAD_FIRST_WAIT_S = 1.0  # then doubled: 1, 2, 4 s between the tries


def _upload_logs(folder: Path, tries: int = LOG_UPLOAD_TRIES) -> bool:
    """Copy the logs of a local log folder to the OUT_DIR its `target` file names, then delete
    the folder. An upload that keeps failing is said on the terminal and does not change the
    command's exit status; the folder then stays, and the next command that starts on this
    machine uploads it. Returns whether the logs were uploaded."""
    import shutil

    from curation.outdir import out_path

    error: Exception | None = None
    for attempt in range(tries):
        if attempt:
            time.sleep(LOG_UPLOAD_FIRST_WAIT_S * 2.0 ** (attempt - 1))
        try:
            target = out_path((folder / "target").read_text().strip())
            for log_file in sorted(folder.glob("run-*.log")):
                (target / log_file.name).upload_from(log_file)
        except OSError as exc:
            error = exc
            continue
        shutil.rmtree(folder, ignore_errors=True)
        return True
    log.warning("could not upload the run log in %s after %d tries (%s); it stays there, and the next "
                "`curate run` on this machine uploads it", folder, tries, error)
    return False


def _upload_orphan_logs() -> None:
    """Upload and remove the log folders of commands that were killed before they could."""
    from stages.storage import orphans

    for folder in orphans(LOG_PREFIX):
        _upload_logs(folder)


def driver_arrow_pool() -> str:
    """The name of Arrow's memory pool in this process: for `curate run`, the C heap unless
    ARROW_DEFAULT_MEMORY_POOL names another (curation/arrow_pool.py chose it before pyarrow
    loaded)."""
    import pyarrow as pa

    return pa.default_memory_pool().backend_name


def _run(args: argparse.Namespace, checked, out) -> int:
    from curation.runner import run_local, run_pipeline

    pool = driver_arrow_pool()
    offload = None
    if args.runner == "local":
        def executor(cfg, units, store):
            return run_local(cfg, units, store, workers=args.num_cpus)
    else:
        from curation.pipeline import on_cluster, run_ray

        offload = on_cluster

        if args.ray_address is None:
            # An embedded cluster's processes must not outlive this one, even if it is SIGKILLed.
            from curation.reaper import spawn

            spawn(os.getpid())

        def executor(cfg, units, store):
            return run_ray(cfg, units, store, address=args.ray_address, num_cpus=args.num_cpus,
                           num_gpus=args.num_gpus, object_store_mb=args.object_store_mb)
    record = run_pipeline(checked.config, args.input, out, executor, overwrite=args.overwrite,
                          command=sys.argv, notes={**checked.record(), "driver_arrow_pool": pool}, offload=offload)
    outcomes = ", ".join(f"{n} {k}" for k, n in sorted(record["source_outcomes"].items()))
    log.info("done: %d sources (%s), %d clips, %d kept -> %s", record["sources"]["total"],
             outcomes or "all gave clips", record["clips"], record["kept"], out)
    log.info("next: curate report %s", out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from curation.report import format_summary, write_report

    summary = write_report(args.output, to=args.to)
    print(format_summary(summary))
    log.info("report: %s", summary["page"]["path"])
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from curation.review import ReviewError, serve

    try:
        return serve(args.output, args.config, args.host, args.port, browser=not args.no_browser)
    except ReviewError as exc:
        log.error("%s", exc)
        return 2


def cmd_refilter(args: argparse.Namespace) -> int:
    from curation.refilter import refilter

    r = refilter(args.output, args.set)
    log.info("refilter: kept %s -> %d of %d clips (%d units rewritten); next: curate report %s",
             r["kept_before"], r["kept"], r["clips"], r["units_rewritten"], args.output)
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from curation.config import ConfigError
    from curation.refilter import refilter
    from curation.writer import OutputStore

    overrides = [f"dedup.{key}={value}" for key, value in (("eps", args.eps), ("embedding", args.embedding),
                                                           ("min_match", args.min_match),
                                                           ("max_shift_s", args.max_shift_s),
                                                           ("keep_by", args.keep_by),
                                                           ("memory_mb", args.memory_mb)) if value is not None]
    if args.off and overrides:
        raise ConfigError("curate dedup: --off takes no other option")
    has_section = (OutputStore(args.output).read_run().get("config") or {}).get("dedup") is not None
    if not args.off and not overrides and not has_section:
        overrides = ["dedup.embedding=auto"]  # a dedup section with its defaults
    r = refilter(args.output, overrides, drop_dedup=args.off)
    d = r.get("dedup")
    if d:
        log.info("dedup: %d duplicates in %d groups (candidates: %s vectors at cosine >= %.3g; matching "
                 "in time at >= %.3g) among %d clips", d["duplicates"], d["groups"], d["embedding"],
                 d["min_cosine"], d["min_match"], d["clips_embedded"])
    log.info("dedup: kept %s -> %d of %d clips (%d units rewritten); next: curate report %s",
             r["kept_before"], r["kept"], r["clips"], r["units_rewritten"], args.output)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from curation.export import export

    m = export(args.output, args.format, args.to, select=args.select, target_mb=args.target_mb,
               overwrite=args.overwrite)
    log.info("export: %d clips as %s in %d pieces -> %s (manifest %s/export.json)", m["clips"], m["format"],
             len(m["pieces"]), args.to, args.to)
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from curation.compact import checkpoint
    from curation.writer import OutputError, OutputStore

    store = OutputStore(args.output)
    if not store.run_json.exists():
        raise OutputError(f"{args.output} is not a curation output (no run.json); run `curate run` first")
    manifest = checkpoint(store, compact=True, target_mb=args.target_mb, created_by="curate compact")
    files = manifest["files"]
    log.info("compact: %d units; %s", manifest["units"], ", ".join(f"{len(files[k])} {k} files" for k in files))
    return 0


def cmd_demo_footage(args: argparse.Namespace) -> int:
    from curation.synth import DEMO_SOURCES, make_demo_footage

    if Path(args.dir).is_dir() and all((Path(args.dir) / n).exists() for n in DEMO_SOURCES):
        log.info("demo footage already in %s", args.dir)
        return 0
    truth = make_demo_footage(Path(args.dir), overwrite=True)
    log.info("wrote %d demo files to %s (%d meant to fail)", len(truth), args.dir,
             sum(1 for t in truth.values() if not t["valid"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curate", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on the terminal")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or resume) the curation pipeline")
    r.add_argument("config", help="pipeline.yaml")
    r.add_argument("--input", "-i", action="append", required=True,
                   help="file, directory, glob or @list.txt; repeatable")
    r.add_argument("--output", "-o", required=True, help="output directory")
    r.add_argument("--set", action="append", default=[], metavar="STEP.ARG=VALUE",
                   help="override a config value, type-checked; repeatable")
    r.add_argument("--ray-address", default=None,
                   help="run on an existing Ray cluster (e.g. auto); default: embedded local cluster")
    r.add_argument("--runner", choices=["ray", "local"], default="ray",
                   help="local: run the same stages in-process without Ray (one machine, debugging)")
    r.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the embedded Ray cluster; with --runner local, its threads (default: all cores)")
    r.add_argument("--num-gpus", type=int, default=None,
                   help="GPUs of the embedded Ray cluster (default: the ones Ray detects)")
    r.add_argument("--object-store-mb", type=int, default=None,
                   help="object store size of the embedded Ray cluster")
    r.add_argument("--overwrite", action="store_true", help="discard earlier results in OUTPUT")
    r.add_argument("--skip-unavailable-models", action="store_true",
                   help="run without the model stages whose weights are missing (said loudly, "
                        "recorded in run.json; their filter rules are not applied)")
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="filter statistics, plots, rejection galleries -> OUT/report/index.html")
    rep.add_argument("output", help="a curation output (OUT_DIR: a folder or an s3://, gs://, az:// URI)")
    rep.add_argument("--to", default=None, metavar="DIR",
                     help="write the report here (a local folder or a URI) instead of OUT_DIR/report/")
    rep.set_defaults(func=cmd_report)

    rv = sub.add_parser("review", help="a local page: drag the filters' thresholds and watch the funnel follow")
    rv.add_argument("output", help="a curation output (OUT_DIR: a folder or an s3://, gs://, az:// URI)")
    rv.add_argument("--config", default=None, help="start from this pipeline config's rules (default: the run's)")
    rv.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    rv.add_argument("--host", default="127.0.0.1",
                    help="the address to bind (default 127.0.0.1: this machine only; the token guards it)")
    rv.add_argument("--no-browser", action="store_true", help="print the address, do not open a browser")
    rv.set_defaults(func=cmd_review)

    rf = sub.add_parser("refilter", help="new filter rules on the stored scores (no decoding, no scoring)")
    rf.add_argument("output")
    rf.add_argument("--set", action="append", required=True, metavar="STEP.rules.COLUMN.KEY=VALUE",
                    help="KEY: min|max|drop_bottom|drop_top; =null removes; "
                         "e.g. filter.rules.motion_score={drop_bottom: 0.25}; also dedup.KEY=VALUE "
                         "(near-duplicate removal, see curate dedup)")
    rf.set_defaults(func=cmd_refilter)

    dd = sub.add_parser("dedup", help="near-duplicate removal on a finished output: sets the config's "
                                      "dedup section and applies it with the rules (no recompute)")
    dd.add_argument("output")
    dd.add_argument("--eps", type=float, default=None,
                    help="candidates: vector cosine >= 1 - eps (default 0.3 perceptual, 0.1 image_embedding)")
    dd.add_argument("--min-match", type=float, default=None,
                    help="duplicates: candidates whose temporal signatures match at least this (default 0.85)")
    dd.add_argument("--max-shift-s", type=float, default=None,
                    help="the largest time shift between a clip and its copy searched (default 2 s)")
    dd.add_argument("--embedding", choices=["auto", "image_embedding", "perceptual"], default=None)
    dd.add_argument("--keep-by", default=None, metavar="[COL, ...]",
                    help="columns choosing the kept clip of a group, e.g. '[aesthetic_score, motion_score]'")
    dd.add_argument("--memory-mb", type=int, default=None,
                    help="memory the pass may hold besides fixed blocks, whatever the clips' number "
                         "(default 256; the rest goes to temporary files in $TMPDIR)")
    dd.add_argument("--off", action="store_true", help="remove the dedup section (duplicates kept again)")
    dd.set_defaults(func=cmd_dedup)

    ex = sub.add_parser("export", help="the curated clips as WebDataset tars, mp4 files + Open-Sora CSV, "
                                       "or a Hugging Face dataset (curation/export.py)")
    ex.add_argument("output", help="a finished curation output (OUT_DIR)")
    ex.add_argument("--format", required=True, choices=["webdataset", "files", "hf"])
    ex.add_argument("--to", required=True, metavar="DIR", help="export directory (new, empty, or an "
                    "earlier export of the same command, which is finished, not redone)")
    ex.add_argument("--select", default=None, metavar="'{COLUMN: {min: X, max: Y}}'",
                    help="only clips passing these bounds (the filter's rule form, JSON or YAML)")
    ex.add_argument("--target-mb", type=float, default=256.0,
                    help="about this many MB per tar / parquet file / folder of mp4s (default 256)")
    ex.add_argument("--overwrite", action="store_true", help="discard an earlier export in DIR")
    ex.set_defaults(func=cmd_export)

    cp = sub.add_parser("compact", help="rewrite OUT_DIR's per-unit files into large ones and checkpoint its "
                                        "ledger (also at the end of every run; safe while a run goes on)")
    cp.add_argument("output")
    cp.add_argument("--target-mb", type=float, default=None,
                    help="about this many MB per file (default: the run's run.shard_target_mb)")
    cp.set_defaults(func=cmd_compact)

    d = sub.add_parser("demo-footage", help="write deterministic sample footage")
    d.add_argument("dir")
    d.set_defaults(func=cmd_demo_footage)

    # These parse their own arguments (main() hands them over before argparse runs);
    # listed here so `curate --help` shows them.
    sub.add_parser("models", help="check|download: the model weights a config needs (curate models -h)")
    sub.add_parser("train", help="train the SVD-style model on OUT/shards (curate train -h)")
    sub.add_parser("sample", help="generate clips from a trained checkpoint (curate sample -h)")
    sub.add_parser("ablate", help="does curation help? proxy models on curated vs uncurated subsets, "
                                  "threshold sweeps (curate ablate -h)")
    return p


def _delegated(command: str):
    """The entry point of a subcommand that parses its own arguments, or None."""
    if command == "models":
        from curation.weights_command import models_command

        return models_command
    if command in ("train", "sample"):
        from training import cli as training_cli

        return training_cli.train_command if command == "train" else training_cli.sample_command
    if command == "ablate":
        from training.study import ablate_command

        return ablate_command
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = _delegated(argv[0]) if argv else None
    try:
        if delegated is not None:
            setup_logging()
            return delegated(argv[1:])
        args = build_parser().parse_args(argv)
        setup_logging(verbose=args.verbose)
        return _dispatch(args)
    finally:
        redaction.uninstall()  # an in-process caller (a test) gets its own streams back


def _dispatch(args: argparse.Namespace) -> int:
    from curation.compact import CompactionBusy
    from curation.config import ConfigError
    from curation.pipeline import ModelSetupError
    from curation.sources import SourceError
    from curation.writer import OutputError
    from stages.storage import StorageError, StoreUnavailable

    try:
        return args.func(args)
    except StoreUnavailable as exc:  # the store, not the input: resumable, exit 1
        log.error("%s", exc)
        return 1
    except (ConfigError, SourceError, OutputError, FileNotFoundError, StorageError, ModelSetupError,
            CompactionBusy) as exc:
        log.error("%s", exc)
        return 2
    except Exception:  # noqa: BLE001 - a bug or an outage: its traceback in the log (redacted)
        log.exception("curate %s failed on an unexpected error (traceback below); rerun the same "
                      "command to resume", args.command)
        return 1


if __name__ == "__main__":
    sys.exit(main())
