"""The trainer's one config dataclass, the three stage presets, size presets and `key=value` overrides.

The presets read as diffs: VIDEO is IMAGE with frames and a noisier schedule, HQ is VIDEO on
a stricter subset with a lower learning rate. A size preset (tiny, small for CPUs and
tests; base, large for GPUs, in latent space) changes the model and run length and is applied
before the user's overrides. Every checkpoint stores the
resolved config (`asdict`), and `from_dict` rebuilds it, so a checkpoint says how it was made.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from curation.schema import SHARDS_SCHEMA

STAGES = ("image", "video", "hq")
PREVIOUS_STAGE = {"image": None, "video": "image", "hq": "video"}


@dataclass(frozen=True)
class TrainConfig:
    # Stage and data.
    stage: str = "image"
    resolution_px: int = 32  # height of the training frames (pixels, before any autoencoder)
    width_px: int = 0  # their width; 0 = resolution_px (square)
    num_frames: int = 1  # frames per sample; 1 = image stage (temporal layers bypassed)
    frame_stride: int = 2  # take every frame_stride-th source frame (fps_id is divided accordingly)
    select: dict = field(default_factory=dict)  # {column: {"min": x, "max": y}} on shard columns
    latent_autoencoder: str = ""  # local path of a diffusers AutoencoderKL; "" = pixel space
    latent_cache_dir: str = ""  # "" = <out_dir>/latent_cache
    data_workers: int = 0  # torch DataLoader worker processes (0 = decode in the training process)
    frame_cache_mb: int = 1024  # decoded, resized clips kept in memory per data process
    shuffle_buffer_rows: int = 1024  # rows per stream read and shuffled together (the memory bound)
    data_streams: int = 0  # independent row streams the global batch is drawn from; 0 = one per rank
    max_bad_row_fraction: float = 0.01  # undecodable rows skipped up to this share, then the run stops

    # Model (must agree between stages: later stages start from the earlier checkpoint).
    model_channels: int = 64
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    attention_levels: tuple = (2,)
    num_heads: int = 4
    context_tokens: int = 4
    context_dim: int = 128
    caption_dim: int = 0  # 0 = read from the shards' caption_embedding (1 if there is none)
    dropout: float = 0.0

    # Diffusion.
    sigma_data: float = 0.5  # std of the training data: 0.5 for pixels in [-1, 1], 1.0 for SVD latents
    p_mean: float = -1.2  # ln sigma ~ N(p_mean, p_std^2) (EDM's image values)
    p_std: float = 1.2
    caption_dropout_prob: float = 0.1  # replace the caption by the null embedding (for guidance)

    # Optimisation.
    batch_size: int = 8  # global batch, split over workers
    total_steps: int = 2000
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip_norm: float = 1.0
    ema_halflife_steps: float = 200.0
    mixed_precision: str = "auto"  # auto (bf16 on a GPU that supports it), bf16, no
    seed: int = 0

    # Speed and memory: these change how fast a step runs and what it holds, not what it
    # computes (beyond rounding; tests/test_training_speed.py states the tolerances).
    activation_checkpointing: bool = False  # recompute each U-Net block's activations in the backward pass
    compile: str = "auto"  # torch.compile the network: auto (on CUDA), on, off
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: graph capture only, to isolate a problem)
    optimizer_impl: str = "auto"  # AdamW kernels: auto (fused on CUDA, foreach elsewhere), fused, foreach, loop
    sharding: str = "auto"  # several ranks: ddp, fsdp (weights, gradients, AdamW state sharded), auto (training/sharding.py)

    # Bookkeeping.
    init_from: str = "auto"  # previous stage's checkpoint: auto (OUT_DIR/train/<prev>/), a path, or none
    log_every_steps: int = 10
    checkpoint_every_steps: int = 500
    device: str = "auto"  # auto, cpu, cuda

    # Text encoder used by `curate sample --prompt` (the one that made the shards' caption_embedding).
    open_clip_model: str = ""  # e.g. ViT-B-32
    open_clip_pretrained: str = ""  # local weights path for open_clip

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.num_frames < 1 or self.frame_stride < 1:
            raise ValueError("num_frames and frame_stride must be >= 1")
        if self.stage == "image" and self.num_frames != 1:
            raise ValueError("the image stage trains on single frames: num_frames must be 1")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")
        down = 2 ** (len(self.channel_mult) - 1)
        if self.resolution_px % down or self.frame_width % down or self.width_px < 0:
            raise ValueError(f"resolution_px={self.resolution_px} and width_px={self.width_px} must be "
                             f"divisible by {down} (channel_mult has {len(self.channel_mult)} levels)")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.optimizer_impl not in ("auto", "fused", "foreach", "loop"):
            raise ValueError(f"optimizer_impl must be auto, fused, foreach or loop, got {self.optimizer_impl!r}")
        if self.sharding not in ("auto", "ddp", "fsdp"):
            raise ValueError(f"sharding must be auto, ddp or fsdp, got {self.sharding!r}")
        if self.shuffle_buffer_rows < 1 or self.data_streams < 0:
            raise ValueError("shuffle_buffer_rows must be >= 1 and data_streams >= 0")
        if self.data_streams and self.batch_size % self.data_streams:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by data_streams={self.data_streams}")
        if not 0.0 <= self.max_bad_row_fraction <= 1.0:
            raise ValueError(f"max_bad_row_fraction must be in [0, 1], got {self.max_bad_row_fraction}")
        check_predicate(self.select)

    @property
    def is_video(self) -> bool:
        return self.stage != "image"

    @property
    def frame_width(self) -> int:
        return self.width_px or self.resolution_px


MODEL_FIELDS = ("model_channels", "channel_mult", "num_res_blocks", "attention_levels", "num_heads",
                "context_tokens", "context_dim", "caption_dim", "latent_autoencoder")


def check_predicate(select: dict) -> None:
    """A predicate is {column: {"min": x, "max": y}} on numeric shard columns (the filter's form)."""
    known = {f.name: f.type for f in SHARDS_SCHEMA}
    for column, bounds in select.items():
        if column not in known:
            raise ValueError(f"select: unknown shard column {column!r}")
        if not isinstance(bounds, dict) or not bounds or set(bounds) - {"min", "max"}:
            raise ValueError(f"select.{column} must be a dict with keys min and/or max, got {bounds!r}")


# ---- presets: each reads as a diff from the one before ---------------------------------

IMAGE = TrainConfig()
VIDEO = replace(IMAGE, stage="video", num_frames=8, batch_size=4, lr=1e-4,
                p_mean=-0.4, p_std=1.4)  # more noise for videos, as SVD shifts its schedule up
HQ = replace(VIDEO, stage="hq", lr=5e-5, total_steps=1000, warmup_steps=50,
             # aesthetic 5.0 is on the LAION-Aesthetics V2 scale (ViT-L/14 MLP head: "5+" is about
             # the top quarter of LAION-2B-en); with another head pick its own value from the
             # report's quantiles (--set hq.select=...). motion 2 %/s: clearly moving shots.
             select={"aesthetic_score": {"min": 5.0}, "motion_score": {"min": 2.0}})
PRESETS = {"image": IMAGE, "video": VIDEO, "hq": HQ}

# Size presets: applied on top of a stage preset, before user overrides.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "small": {"image": {}, "video": {}, "hq": {}},
    # A model that trains through all three stages in a few minutes on 2 CPU cores.
    "tiny": {
        "image": dict(resolution_px=16, model_channels=16, channel_mult=(1, 2), attention_levels=(1,),
                      context_dim=32, batch_size=8, total_steps=200, warmup_steps=10, lr=1e-3,
                      ema_halflife_steps=20.0, log_every_steps=10, checkpoint_every_steps=100),
        "video": dict(resolution_px=16, model_channels=16, channel_mult=(1, 2), attention_levels=(1,),
                      context_dim=32, num_frames=4, batch_size=4, total_steps=80, warmup_steps=10, lr=5e-4,
                      ema_halflife_steps=20.0, log_every_steps=10, checkpoint_every_steps=100),
        "hq": dict(resolution_px=16, model_channels=16, channel_mult=(1, 2), attention_levels=(1,),
                   context_dim=32, num_frames=4, batch_size=4, total_steps=40, warmup_steps=5, lr=2e-4,
                   ema_halflife_steps=20.0, log_every_steps=10, checkpoint_every_steps=100),
    },
}


# GPU sizes, in latent space at SVD's stage-II shape: 14 frames of 256x384 pixels, i.e. latents
# of 4 x 32 x 48 through SVD's autoencoder (a diffusers AutoencoderKL, factor 8; set
# latent_autoencoder=PATH, which these presets require). The image stage trains on single
# 256x384 frames. Parameter counts (video stage; the image stage lacks the temporal layers):
# base 346M, large 1.60B (SVD's U-Net: 1.5B). Heads of 64-128 channels, so SDPA can take a
# flash kernel in bf16.
_BASE_MODEL = dict(resolution_px=256, width_px=384, model_channels=192, channel_mult=(1, 2, 3, 4),
                   num_res_blocks=2, attention_levels=(1, 2, 3), num_heads=6, context_tokens=4,
                   context_dim=1024, sigma_data=1.0, log_every_steps=50, checkpoint_every_steps=2000)
_LARGE_MODEL = dict(_BASE_MODEL, model_channels=384, channel_mult=(1, 2, 4, 4), num_heads=12,
                    activation_checkpointing=True)
SIZES["base"] = {
    "image": dict(_BASE_MODEL, batch_size=64, total_steps=100_000, warmup_steps=1000, lr=1e-4),
    "video": dict(_BASE_MODEL, num_frames=14, batch_size=16, total_steps=50_000, warmup_steps=500, lr=5e-5),
    "hq": dict(_BASE_MODEL, num_frames=14, batch_size=16, total_steps=10_000, warmup_steps=200, lr=2e-5),
}
SIZES["large"] = {
    "image": dict(_LARGE_MODEL, batch_size=64, total_steps=100_000, warmup_steps=1000, lr=1e-4),
    "video": dict(_LARGE_MODEL, num_frames=14, batch_size=16, total_steps=50_000, warmup_steps=500, lr=3e-5),
    "hq": dict(_LARGE_MODEL, num_frames=14, batch_size=16, total_steps=10_000, warmup_steps=200, lr=1e-5),
}
LATENT_SIZES = ("base", "large")  # presets that train in latent space only


def preset(stage: str, size: str = "small") -> TrainConfig:
    if stage not in PRESETS:
        raise ValueError(f"unknown stage {stage!r}; choose from {sorted(PRESETS)}")
    if size not in SIZES:
        raise ValueError(f"unknown preset size {size!r}; choose from {sorted(SIZES)}")
    return replace(PRESETS[stage], **SIZES[size][stage])


# ---- overrides --------------------------------------------------------------------------

def _parse_value(key: str, text: str, default: Any) -> Any:
    """Parse `text` as the type of `default`; a value of another type is an error naming the key."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        if isinstance(default, tuple):
            return tuple(int(v) for v in text.strip("()[] ").split(",") if v.strip())
        if isinstance(default, dict):
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
    except ValueError as exc:
        raise ValueError(f"--set {key}={text}: expected a value of type "
                         f"{type(default).__name__} like the default {default!r}") from exc
    raise ValueError(f"--set {key}: cannot override a value of type {type(default).__name__}")


def apply_overrides(cfg: TrainConfig, overrides: list[str] | dict[str, Any]) -> TrainConfig:
    """Apply `key=value` strings (or a dict) to cfg; unknown keys and wrong types are errors."""
    names = {f.name for f in fields(TrainConfig)}
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    changes: dict[str, Any] = {}
    for key, value in items:
        if key not in names:
            raise ValueError(f"unknown config key {key!r} (known: {', '.join(sorted(names))})")
        default = getattr(cfg, key)
        if isinstance(value, str) and not isinstance(default, str):
            value = _parse_value(key, value, default)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        elif not isinstance(value, type(default)) and not (isinstance(default, float) and isinstance(value, int)):
            raise ValueError(f"config key {key!r}: expected {type(default).__name__}, got {value!r}")
        changes[key] = value
    return replace(cfg, **changes)


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    return key.strip(), value


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able values (stored in every checkpoint)."""
    d = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by `to_dict`; keys this version does not know are an error."""
    return apply_overrides(TrainConfig(stage=d.get("stage", "image"),
                                       num_frames=d.get("num_frames", 1)), dict(d))


__all__ = ["TrainConfig", "IMAGE", "VIDEO", "HQ", "PRESETS", "SIZES", "LATENT_SIZES", "STAGES", "PREVIOUS_STAGE",
           "MODEL_FIELDS", "preset", "apply_overrides", "to_dict", "from_dict", "check_predicate"]
