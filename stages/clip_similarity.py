"""clip_similarity: cosine similarity between a clip's caption and its keyframes in CLIP space.

Reads `caption` and `keyframes`; adds
  clip_similarity        cosine similarity (-1..1, not x100 as in CLIPScore) between the
                         L2-normalised CLIP text embedding of the caption and each keyframe's
                         L2-normalised image embedding, reduced over the keyframes (mean by
                         default). Model-specific: OpenAI ViT-B/32 matching pairs score about
                         0.25-0.35; LAION-5B kept English pairs above 0.28 with that model.
  caption_embedding      float32, the caption's L2-normalised CLIP text embedding: the
                         trainer's text conditioning
  clip_similarity_error  why a kept clip has no score (e.g. its caption failed)

Only kept clips with a caption are scored: rejected clips were not captioned and get null.
All captions of a batch go through the text tower in one pass and all their keyframes
through the image tower in one pass.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal

import numpy as np

from stages import instrument
from stages.base import Batch, Stage
from stages.model_batch import forward_keyframes, is_clip_row, is_kept, nan_list
from stages.open_clip_loader import OpenClipWeights, decode_rgb, l2_normalize, preprocess_batch
from stages.torch_setup import resolve_device, set_torch_threads, validate_device_args
from stages.weights import WeightRequirement

log = logging.getLogger(__name__)


class ClipSimilarityStage(Stage):
    """Caption-keyframe CLIP similarity and the caption's CLIP text embedding."""

    name = "clip_similarity"
    outputs = ("clip_similarity", "caption_embedding", "clip_similarity_error")
    requires = ("caption",)  # a pipeline without a caption step cannot run this one

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        model_config: str | None = None,
        cache_dir: str | None = None,
        reduction: Literal["mean", "max", "min"] = "mean",
        device: Literal["auto", "cpu", "cuda"] = "auto",
        torch_threads: int | None = None,
    ):
        self.clip = OpenClipWeights(model, pretrained, model_config, cache_dir)
        self.clip.validate()
        if reduction not in ("mean", "max", "min"):
            raise ValueError(f"reduction must be mean, max or min, got {reduction!r}")
        validate_device_args(device, torch_threads)
        self.reduction = reduction
        self.device, self.torch_threads = device, torch_threads
        self._model = None

    def weights(self, step: str | None = None) -> list[WeightRequirement]:
        return self.clip.requirements(step or self.name, "CLIP text and image encoders")

    def download(self, step: str | None = None, timeout_s: float = 60.0) -> list[str]:
        return self.clip.download_errors(step or self.name, timeout_s)

    def setup(self) -> None:
        started = time.perf_counter()
        self.device_used = resolve_device(self.device)
        self.threads = set_torch_threads(self.torch_threads)
        self._model, self._preprocess, self._tokenizer = self.clip.load(self.device_used, self.name)
        instrument.count("model_load", self.name)
        self.load_seconds = time.perf_counter() - started
        log.info("clip_similarity: %s on %s (%d threads) loaded in %.1fs", self.clip.describe(),
                 self.device_used, self.threads, self.load_seconds)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            tokens = self._tokenizer(texts).to(self.device_used)
            return l2_normalize(self._model.encode_text(tokens).float().cpu().numpy()).astype(np.float32)

    def encode_images(self, images: list) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = preprocess_batch(self._preprocess, images, self.device_used)
            return l2_normalize(self._model.encode_image(x).float().cpu().numpy()).astype(np.float32)

    def __call__(self, batch: Batch) -> Batch:
        if self._model is None:
            self.setup()
        n = len(batch["clip_id"])
        scores: list[float] = nan_list(n)
        text_embeddings: list[list[float] | None] = [None] * n
        errors: list[str | None] = [None] * n
        captions = batch.get("caption") or [None] * n
        captioned = []
        for i in range(n):
            if not is_clip_row(batch, i) or not is_kept(batch, i):
                continue  # rejected clips have no caption by design: nothing failed
            if not captions[i]:
                errors[i] = "no caption to compare" + ("" if "caption" in batch else
                                                       " (no caption step before clip_similarity)")
                continue
            captioned.append(i)
        done = forward_keyframes(
            batch, captioned, decode_rgb,
            lambda keyframes: (self.encode_texts([captions[i] for i in keyframes.rows]),  # (R, D)
                               self.encode_images(keyframes.images)),  # (N_images, D)
            errors, "clip_similarity forward pass")
        if done is not None:
            keyframes, (text, image) = done
            for r, i, mine in keyframes.by_clip():
                cosines = image[mine] @ text[r]
                value = float(getattr(np, self.reduction)(cosines))
                scores[i] = value if math.isfinite(value) else math.nan
                text_embeddings[i] = text[r].tolist()
        return {**batch, "clip_similarity": scores, "caption_embedding": text_embeddings,
                "clip_similarity_error": errors}
