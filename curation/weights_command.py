"""`curate models check|download`: the model weights a pipeline config needs, and fetching them.

    curate models check [pipeline.yaml] [--set STEP.ARG=VALUE ...]
        list every weight the config needs, where it comes from, available or MISSING;
        exit 1 if any is missing.
    curate models download [pipeline.yaml] [--set ...] [--timeout-s 60]
        on a connected machine: fill the caches an offline cluster reads (open_clip
        pretrained tags through open_clip's own downloader, the LAION aesthetic heads from
        their public URLs into the model cache); exit 1 if anything could not be fetched.

Each model stage declares its weights itself (`weights(step)`, `download(step, timeout_s)`;
WeightRequirement and where weights live: stages/weights.py); this module only builds the
configured stages and asks them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from stages.model_batch import error_text
from stages.weights import WeightRequirement, missing_weights_message

log = logging.getLogger(__name__)

DEFAULT_PIPELINE = "pipeline.yaml"


# ---- the config's weights -----------------------------------------------------------------

def config_weights(config: Any) -> list[tuple[Any, WeightRequirement]]:
    """(step, requirement) for every weight every step of a PipelineConfig needs."""
    found = []
    for step in config.steps:
        stage = step.build()
        if hasattr(stage, "weights"):
            for req in stage.weights(step.name):
                found.append((step, req))
    return found


def download_step(step: Any, timeout_s: float) -> list[str]:
    """Fill the caches for one step; returns error texts (empty when all went well)."""
    stage = step.build()
    if not hasattr(stage, "download"):
        return []
    try:
        return stage.download(step.name, timeout_s)
    except Exception as exc:  # noqa: BLE001 - report per step, go on with the others
        return [f"{step.name}: {error_text(exc)}"]


def _set_network_timeouts(timeout_s: float) -> None:
    """Bound every network wait so an offline machine fails fast instead of hanging."""
    import socket

    socket.setdefaulttimeout(timeout_s)
    # huggingface_hub reads these when it is first imported.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout_s)))
    os.environ.pop("HF_HUB_OFFLINE", None)


def models_command(argv: list[str]) -> int:
    """`curate models check|download [pipeline.yaml] [--set ...]`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="curate models", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["check", "download"])
    parser.add_argument("config", nargs="?", default=DEFAULT_PIPELINE, help="pipeline.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="STEP.ARG=VALUE",
                        help="override a config value, as for `curate run`; repeatable")
    parser.add_argument("--timeout-s", type=float, default=60.0,
                        help="download: network timeout per request, seconds")
    args = parser.parse_args(argv)

    import curation  # noqa: F401 - installs the torchvision import hook before open_clip loads
    from curation.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    if args.action == "download":
        _set_network_timeouts(args.timeout_s)
        errors = []
        for step in config.steps:
            errors += download_step(step, args.timeout_s)
        for err in errors:
            log.error("download failed: %s", err)
    requirements = config_weights(config)
    if not requirements:
        print(f"{args.config}: no step needs model weights")
        return 0
    print(f"{args.config}: {len(requirements)} weight file(s)")
    for _, req in requirements:
        print(req.describe())
    missing = [r for _, r in requirements if not r.available]
    if missing:
        print(missing_weights_message(missing), file=sys.stderr)
        return 1
    if args.action == "download" and errors:
        return 1
    return 0
