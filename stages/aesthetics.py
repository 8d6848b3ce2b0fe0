"""aesthetics: CLIP image embeddings of the keyframes -> LAION aesthetic predictor score.

Reads `keyframes` (JPEG: first, middle, last); adds
  aesthetic_score   mean over the keyframes of the aesthetic head's output: a 1..10 rating,
                    on the scale of the head used (the V1 linear heads score higher than the
                    V2 MLP head that LAION-Aesthetics V2's "4.5+"/"6+" subsets are cut on;
                    pipeline.yaml's filter says where its default comes from)
  image_embedding   float32, the L2-normalised mean of the keyframes' L2-normalised CLIP
                    image embeddings (embedding width of the CLIP model)
  aesthetics_error  why a clip has no score (null when it worked)

The heads are the published LAION ones: the linear head on OpenAI CLIP ViT-B/32 (the
default: runs on CPU) and the MLP head on OpenAI CLIP ViT-L/14 (the documented choice on
GPU: `model: ViT-L-14`). Both read L2-normalised image embeddings, as they were trained.
The head's type is read from its state dict ({weight, bias}: linear; layers.N.*: MLP), and
its input width must equal the CLIP embedding width: a head for another CLIP is refused
at load, not silently applied.

All keyframes of all clips of a batch go through CLIP in one forward pass. A source-error
row gets nulls and no error; with only_kept, clips rejected by an earlier filter step get
NaN without work (their reasons already say why).
"""

from __future__ import annotations

import collections
import logging
import math
import time
from typing import Literal

import numpy as np

from stages import instrument
from stages.base import Batch, Stage
from stages.model_batch import error_text, forward_keyframes, is_clip_row, is_kept, nan_list
from stages.open_clip_loader import OpenClipWeights, decode_rgb, l2_normalize, preprocess_batch
from stages.torch_setup import resolve_device, set_torch_threads, validate_device_args
from stages.weights import (AESTHETIC_HEADS, DEFAULT_HEAD_FOR_MODEL, WeightRequirement, aesthetic_head_path,
                            download_url)

log = logging.getLogger(__name__)

Reduction = Literal["mean", "min", "max", "median"]


def build_head(state_dict: dict, where: str):
    """A torch module for a LAION aesthetic head state dict (linear or MLP)."""
    import torch
    from torch import nn

    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    keys = set(state_dict)
    if keys == {"weight", "bias"}:
        head = nn.Linear(state_dict["weight"].shape[1], 1)
    elif keys and all(k.startswith("layers.") for k in keys):
        # improved-aesthetic-predictor: Linear/Dropout stack, Linears at the indices present.
        indices = sorted({int(k.split(".")[1]) for k in keys})
        linear_at = {i: state_dict[f"layers.{i}.weight"].shape for i in indices}
        modules, previous = [], None
        for i in range(max(indices) + 1):
            if i in linear_at:
                out_f, in_f = linear_at[i]
                if previous is not None and in_f != previous:
                    raise ValueError(f"{where}: layers.{i} takes {in_f} inputs, previous layer gives {previous}")
                modules.append(nn.Linear(in_f, out_f))
                previous = out_f
            else:
                modules.append(nn.Identity())  # dropout at inference
        # Named "layers" so the published state dict's keys load unchanged.
        head = nn.Sequential(collections.OrderedDict(layers=nn.Sequential(*modules)))
    else:
        raise ValueError(f"{where}: not a LAION aesthetic head (keys {sorted(keys)[:6]})")
    head.load_state_dict(state_dict, strict=True)
    out = head(torch.zeros(1, in_features(head)))
    if out.shape != (1, 1):
        raise ValueError(f"{where}: head outputs {tuple(out.shape[1:])} values per image, expected 1")
    return head.eval()


def in_features(head) -> int:
    from torch import nn

    first = next(m for m in head.modules() if isinstance(m, nn.Linear))
    return first.in_features


def reduce_scores(values: np.ndarray, reduction: str) -> float:
    return float(getattr(np, reduction)(values))


class AestheticsStage(Stage):
    """CLIP embeddings of the keyframes and their aesthetic score."""

    name = "aesthetics"
    outputs = ("aesthetic_score", "image_embedding", "aesthetics_error")

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        head_path: str | None = None,
        model_config: str | None = None,
        cache_dir: str | None = None,
        reduction: Reduction = "mean",
        device: Literal["auto", "cpu", "cuda"] = "auto",
        torch_threads: int | None = None,
        only_kept: bool = False,
    ):
        self.clip = OpenClipWeights(model, pretrained, model_config, cache_dir)
        self.clip.validate()
        validate_device_args(device, torch_threads)
        if reduction not in ("mean", "min", "max", "median"):
            raise ValueError(f"reduction must be mean, min, max or median, got {reduction!r}")
        if head_path is None and model not in DEFAULT_HEAD_FOR_MODEL:
            raise ValueError(f"head_path: no published aesthetic head is known for model {model!r}; "
                             f"give a head file (known defaults: {', '.join(DEFAULT_HEAD_FOR_MODEL)})")
        if head_path is None:
            head = AESTHETIC_HEADS[DEFAULT_HEAD_FOR_MODEL[model]]
            if pretrained != head.clip_pretrained:
                # Same width, different embedding space: the score would look valid and be wrong.
                raise ValueError(f"head_path: the default head for {model} ({head.filename}) was trained on "
                                 f"{head.clip_model}/{head.clip_pretrained} embeddings; with pretrained="
                                 f"{pretrained!r} give a head trained on those embeddings")
        self.head_path = head_path
        self.reduction = reduction
        self.device = device
        self.torch_threads = torch_threads
        self.only_kept = only_kept
        self._model = None

    # ---- weights -------------------------------------------------------------------------

    def head_file(self) -> tuple[str, str]:
        """(path of the head file, where it comes from)."""
        from pathlib import Path

        if self.head_path is not None:
            return str(Path(self.head_path).expanduser()), "local file"
        name = DEFAULT_HEAD_FOR_MODEL[self.clip.model]
        return str(aesthetic_head_path(name)), f"{name} from {AESTHETIC_HEADS[name].url}"

    def weights(self, step: str | None = None) -> list[WeightRequirement]:
        import os

        step = step or self.name
        reqs = self.clip.requirements(step, "CLIP image encoder")
        path, source = self.head_file()
        note = ("fetch with `curate models download`" if self.head_path is None
                else "a LAION aesthetic head state dict (linear or MLP)")
        reqs.append(WeightRequirement(f"{step}.head_path", f"aesthetic head ({source})", path,
                                      os.path.isfile(path), note))
        return reqs

    def download(self, step: str | None = None, timeout_s: float = 60.0) -> list[str]:
        from pathlib import Path

        errors = self.clip.download_errors(step or self.name, timeout_s)  # then the head
        if self.head_path is None:
            name = DEFAULT_HEAD_FOR_MODEL[self.clip.model]
            target = Path(self.head_file()[0])
            if not target.is_file():
                try:
                    download_url(AESTHETIC_HEADS[name].url, target, timeout_s)
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"{step or self.name}.head_path: {AESTHETIC_HEADS[name].url}: "
                                  f"{error_text(exc)}")
        return errors

    # ---- setup and scoring ---------------------------------------------------------------

    def setup(self) -> None:
        import torch

        started = time.perf_counter()
        self.device_used = resolve_device(self.device)
        self.threads = set_torch_threads(self.torch_threads)
        self._model, self._preprocess, _ = self.clip.load(self.device_used, self.name)
        path, _ = self.head_file()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.name}.head_path: aesthetic head not found: {path}") from exc
        self._head = build_head(state, f"{self.name}.head_path={path}").to(self.device_used)
        embed_dim = self._embed_dim()
        if in_features(self._head) != embed_dim:
            raise ValueError(f"{self.name}.head_path: head reads {in_features(self._head)}-d embeddings but "
                             f"{self.clip.describe()} gives {embed_dim}-d; use the head trained on this CLIP")
        instrument.count("model_load", self.name)
        self.load_seconds = time.perf_counter() - started
        log.info("aesthetics: %s + head %s on %s (%d threads) loaded in %.1fs",
                 self.clip.describe(), path, self.device_used, self.threads, self.load_seconds)

    def _embed_dim(self) -> int:
        import torch

        with torch.no_grad():
            size = self._preprocess(decode_rgb(_BLACK_JPEG)).shape
            return int(self._model.encode_image(torch.zeros(1, *size, device=self.device_used)).shape[-1])

    def embed(self, images: list) -> np.ndarray:
        """L2-normalised CLIP image embeddings (N, D) float32, one forward pass."""
        import torch

        with torch.no_grad():
            features = self._model.encode_image(preprocess_batch(self._preprocess, images, self.device_used))
        return l2_normalize(features.float().cpu().numpy()).astype(np.float32)

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.from_numpy(embeddings).to(self.device_used)
            return self._head(x).float().cpu().numpy()[:, 0]

    def __call__(self, batch: Batch) -> Batch:
        if self._model is None:
            self.setup()
        n = len(batch["clip_id"])
        scores: list[float] = nan_list(n)
        embeddings: list[list[float] | None] = [None] * n
        errors: list[str | None] = [None] * n
        todo = [i for i in range(n) if is_clip_row(batch, i) and (not self.only_kept or is_kept(batch, i))]

        def forward(keyframes):
            emb = self.embed(keyframes.images)  # (N_images, D)
            return emb, self.score(emb)

        done = forward_keyframes(batch, todo, decode_rgb, forward, errors, "aesthetics forward pass")
        if done is not None:
            keyframes, (emb, per_image) = done
            for _, i, mine in keyframes.by_clip():
                value = reduce_scores(per_image[mine], self.reduction)
                scores[i] = value if math.isfinite(value) else math.nan
                if not math.isfinite(value):
                    errors[i] = "aesthetic head gave a non-finite score"
                embeddings[i] = l2_normalize(emb[mine].mean(axis=0)).astype(np.float32).tolist()
        return {**batch, "aesthetic_score": scores, "image_embedding": embeddings, "aesthetics_error": errors}


def _black_jpeg() -> bytes:
    import cv2

    return cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()


_BLACK_JPEG = _black_jpeg()
