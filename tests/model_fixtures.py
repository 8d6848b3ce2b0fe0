"""Tiny model checkpoints the tests build and save, loaded like real weights.

Real CLIP/CoCa/aesthetic weights cannot be downloaded here and must never be in the repo,
so the tests write small open_clip model configs (one-layer towers, real CLIP vocabulary so
the real tokenizer works), save seeded state dicts with torch.save, and point the stages'
`model_config` / `pretrained` / `head_path` arguments at those files: the stages then load
them through open_clip.create_model_and_transforms and torch.load exactly as a user's own
checkpoint. Also JPEG keyframe helpers shared by the model-stage tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

import curation  # noqa: F401 - the torchvision import hook, before open_clip

from curation import synth

VOCAB = 49408  # the CLIP BPE tokenizer's vocabulary: text towers must match it
TINY_CLIP = "tiny-clip-test"
TINY_COCA = "tiny-coca-test"
EMBED_DIM = 16

TINY_CLIP_CONFIG = {
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": VOCAB, "width": 32, "heads": 2, "layers": 1},
}

TINY_COCA_CONFIG = {
    "embed_dim": 32,  # CoCa's decoder reads image tokens of this width: equal to the multimodal width
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 16,
                   "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": VOCAB, "width": 32, "heads": 2, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": VOCAB, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}


def write_open_clip_checkpoint(folder: Path, name: str, config: dict, seed: int = 0) -> tuple[Path, Path]:
    """Write <name>.json and a seeded state dict <name>.pt; return (config path, checkpoint path)."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    checkpoint = folder / f"{name}.pt"
    torch.save(model.state_dict(), checkpoint)
    return config_path, checkpoint


def write_linear_head(path: Path, dim: int = EMBED_DIM, seed: int = 0) -> Path:
    """A LAION-style linear aesthetic head: state dict {weight (1, dim), bias (1,)}."""
    import torch

    torch.manual_seed(seed)
    torch.save(torch.nn.Linear(dim, 1).state_dict(), path)
    return path


def write_mlp_head(path: Path, dim: int = EMBED_DIM, seed: int = 0) -> Path:
    """An improved-aesthetic-predictor style MLP head: keys layers.{0,2,4,6,7}.{weight,bias}."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = nn.Sequential(nn.Linear(dim, 24), nn.Dropout(0.2), nn.Linear(24, 12), nn.Dropout(0.2),
                           nn.Linear(12, 8), nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1))
    torch.save({f"layers.{k}": v for k, v in layers.state_dict().items()}, path)
    return path


def jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def keyframes(seed: int, size: tuple[int, int] = (96, 64), text: str | None = None,
              height_frac: float = 0.2) -> list[bytes]:
    """Three JPEG keyframes (first, middle, last) of one synthetic look."""
    frame = synth.background(seed, size)
    if text:
        frame = synth.draw_text(frame.copy(), text, height_frac)
    return [jpeg(frame)] * 3


def clip_batch(keyframe_lists: list[list[bytes] | None], keep: list[bool] | None = None,
               **extra: list) -> dict[str, list]:
    """A batch as the pipeline hands it to a model stage; None keyframes = a source-error row."""
    n = len(keyframe_lists)
    batch = {
        "clip_id": [f"c{i}" for i in range(n)],
        "split_error": [None if k is not None else "unreadable source" for k in keyframe_lists],
        "start_frame": [0 if k is not None else None for k in keyframe_lists],
        "keyframes": keyframe_lists,
    }
    if keep is not None:
        batch["keep"] = keep
    batch.update(extra)
    return batch
