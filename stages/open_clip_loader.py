"""Shared open_clip loading for the aesthetics, caption (CoCa) and clip_similarity stages.

A stage names its model by three arguments:
  model         open_clip architecture ("ViT-B-32", "coca_ViT-L-14"), or "local-dir:/folder"
                holding open_clip_config.json and the weights
  pretrained    a pretrained tag of that architecture ("openai", "laion2b_s34b_b79k"),
                resolved from open_clip's caches, or a local checkpoint file
  model_config  optional JSON file with an open_clip model config, registered under `model`
                (for architectures open_clip does not ship; the tests' tiny models use it)
and `cache_dir` (None: open_clip's own cache locations).

Loading never goes to the network and never builds a model without weights: a tag is
resolved to its cached file first (a missing file is an error naming the config key), then
open_clip.create_model_and_transforms loads that file exactly as it loads a user's own
checkpoint path. The tag's preprocessing (mean/std, interpolation) and its QuickGELU flag
are applied as open_clip would for the tag, so the tag and its cached file give the same
model.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.model_batch import error_text
from stages.weights import WeightRequirement, check_reachable

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")
LOCAL_DIR = "local-dir:"


def decode_rgb(jpeg: bytes):
    """JPEG bytes -> PIL RGB image; ValueError when undecodable."""
    import io

    from PIL import Image

    try:
        image = Image.open(io.BytesIO(jpeg))
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for bad data
        raise ValueError(f"undecodable keyframe ({type(exc).__name__})") from exc
    return image.convert("RGB")


@dataclass(frozen=True)
class OpenClipWeights:
    """Where an open_clip model's architecture and weights come from."""

    model: str
    pretrained: str | None
    model_config: str | None = None
    cache_dir: str | None = None

    # ---- cheap checks (constructor) ------------------------------------------------------

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model must be an open_clip architecture name, e.g. 'ViT-B-32'")
        if self.model.startswith("hf-hub:"):
            raise ValueError("model: 'hf-hub:' names download at load time; download the repo once "
                             "and use 'local-dir:/path/to/it' (or an architecture + pretrained tag)")
        if self.is_local_dir:
            if self.pretrained:
                raise ValueError("pretrained: must be null when model is 'local-dir:' "
                                 "(the folder holds the weights)")
            return
        if not self.pretrained:
            raise ValueError("pretrained must be a pretrained tag (e.g. 'laion2b_s34b_b79k') or a local "
                             "checkpoint file: models are never run with random weights")
        if self.model_config is not None and not self.model_config.endswith(".json"):
            raise ValueError(f"model_config must be a .json file, got {self.model_config!r}")

    @property
    def is_local_dir(self) -> bool:
        return self.model.startswith(LOCAL_DIR)

    @property
    def pretrained_is_path(self) -> bool:
        p = self.pretrained or ""
        return (os.sep in p or p.startswith("~") or p.lower().endswith(CHECKPOINT_SUFFIXES)
                or os.path.exists(p))

    def describe(self) -> str:
        if self.is_local_dir:
            return f"open_clip {self.model}"
        return f"open_clip {self.model} ({self.pretrained})"

    # ---- weight files (no model is built) ------------------------------------------------

    def requirements(self, step: str, what: str) -> list[WeightRequirement]:
        """The weight (and config) files this model needs and whether they are there."""
        reqs = []
        if self.model_config is not None:
            path = Path(self.model_config).expanduser()
            reqs.append(WeightRequirement(f"{step}.model_config", f"open_clip config of {self.model}",
                                          str(path), path.is_file()))
        if self.is_local_dir:
            folder = Path(self.model[len(LOCAL_DIR):]).expanduser()
            ok = (folder / "open_clip_config.json").is_file() and any(
                p.suffix in CHECKPOINT_SUFFIXES for p in folder.glob("*") if p.is_file())
            reqs.append(WeightRequirement(f"{step}.model", f"{what}: {self.describe()}", str(folder), ok,
                                          "the folder needs open_clip_config.json and a checkpoint"))
            return reqs
        what = f"{what}: {self.describe()}"
        if self.pretrained_is_path:
            path = Path(self.pretrained).expanduser()
            reqs.append(WeightRequirement(f"{step}.pretrained", what, str(path), path.is_file(),
                                          "a local checkpoint file (state dict) of this architecture"))
            return reqs
        path, location, note = self.cached_tag_file()
        reqs.append(WeightRequirement(f"{step}.pretrained", what, path or location, path is not None, note))
        return reqs

    def tag_config(self) -> dict[str, Any]:
        import open_clip

        return open_clip.get_pretrained_cfg(self.model.replace("/", "-"), self.pretrained) or {}

    def cached_tag_file(self) -> tuple[str | None, str, str]:
        """(cached file or None, where it is looked for, a note) for a pretrained tag."""
        import open_clip
        from open_clip import pretrained as oc_pretrained

        cfg = self.tag_config()
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(self.model)
            return None, f"unknown pretrained tag {self.pretrained!r} for {self.model}", (
                f"known tags: {', '.join(tags) or 'none'}; or give a local checkpoint file")
        if "file" in cfg:
            return (cfg["file"] if os.path.isfile(cfg["file"]) else None), cfg["file"], ""
        note = "fetch with `curate models download` on a connected machine"
        # open_clip prefers the Hugging Face hub when it is installed; look where it would.
        if cfg.get("hf_hub") and oc_pretrained.has_hf_hub():
            from huggingface_hub import constants, try_to_load_from_cache

            repo, filename = os.path.split(cfg["hf_hub"])
            filename = filename or oc_pretrained.HF_WEIGHTS_NAME
            for name in [*oc_pretrained._get_safe_alternatives(filename), filename]:
                found = try_to_load_from_cache(repo, name, cache_dir=self.cache_dir)
                if isinstance(found, str) and os.path.isfile(found):
                    return found, found, ""
            cache = self.cache_dir or constants.HF_HUB_CACHE
            return None, f"Hugging Face cache {cache}: {repo}/{filename}", note
        if cfg.get("url"):
            cache = self.cache_dir or os.path.expanduser("~/.cache/clip")
            target = os.path.join(cache, os.path.basename(cfg["url"]))
            return (target if os.path.isfile(target) else None), target, note
        return None, f"tag {self.pretrained!r} has no download source", ""

    def download(self, timeout_s: float) -> str:
        """Fetch a tag's weights into the cache with open_clip's own downloader."""
        from open_clip import pretrained as oc_pretrained

        if self.is_local_dir or self.pretrained_is_path:
            return ""  # a local file: nothing to fetch
        cfg = self.tag_config()
        if not cfg:
            raise ValueError(f"unknown pretrained tag {self.pretrained!r} for {self.model}")
        if cfg.get("hf_hub") and oc_pretrained.has_hf_hub():
            from huggingface_hub import constants

            check_reachable(constants.ENDPOINT, timeout_s)
        elif cfg.get("url"):
            check_reachable(cfg["url"], timeout_s)
        log.info("downloading %s (timeout %gs per request)", self.describe(), timeout_s)
        return oc_pretrained.download_pretrained(cfg, cache_dir=self.cache_dir)

    def download_errors(self, step: str, timeout_s: float) -> list[str]:
        """download(), with a failure reported as "<step>.pretrained: <error>" instead of raised."""
        try:
            self.download(timeout_s)
        except Exception as exc:  # noqa: BLE001 - `curate models download` reports every failure
            return [f"{step}.pretrained: {error_text(exc)}"]
        return []

    # ---- loading (setup) -----------------------------------------------------------------

    def register_config(self) -> None:
        """Make open_clip know `model` from model_config (copied as <model>.json)."""
        import open_clip

        if self.model_config is None:
            return
        cfg = json.loads(Path(self.model_config).expanduser().read_text())
        folder = Path(tempfile.mkdtemp(prefix="open_clip_cfg"))
        (folder / f"{self.model}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder)

    def load(self, device: str, step: str):
        """(model in eval mode on device, image preprocess, tokenizer); raises when weights are missing."""
        import open_clip

        self.register_config()
        if self.is_local_dir:
            model, _, preprocess = open_clip.create_model_and_transforms(self.model, device=device)
            return model.eval(), preprocess, open_clip.get_tokenizer(self.model)
        kwargs: dict[str, Any] = {}
        if self.pretrained_is_path:
            checkpoint = str(Path(self.pretrained).expanduser())
            if not os.path.isfile(checkpoint):
                raise FileNotFoundError(f"{step}.pretrained: checkpoint file not found: {checkpoint}")
        else:
            checkpoint, location, note = self.cached_tag_file()
            if checkpoint is None:
                raise FileNotFoundError(f"{step}.pretrained: weights of {self.describe()} not found at "
                                        f"{location} ({note})")
            tag_cfg = self.tag_config()
            # What open_clip applies for a tag but not for a bare file: keep them identical.
            kwargs["force_preprocess_cfg"] = {k: tag_cfg[k] for k in
                                              ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.model, pretrained=checkpoint, device=device, cache_dir=self.cache_dir, **kwargs)
        return model.eval(), preprocess, open_clip.get_tokenizer(self.model)


def preprocess_batch(preprocess, images: list, device: str):
    """PIL images -> one (N, 3, H, W) tensor on device."""
    import torch

    return torch.stack([preprocess(im) for im in images]).to(device)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)
