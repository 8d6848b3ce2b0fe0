"""Generate clips from a trained checkpoint: Heun sampling with classifier-free guidance -> mp4 + GIF.

The checkpoint's EMA weights and resolved config rebuild the network (no pickled modules).
The prompt is conditioned through the same caption embedding space the shards used:
either a given embedding (.npy), or the open_clip text encoder the config names, or, for an
empty prompt, the learned null embedding (unconditional sampling, no guidance).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from PIL import Image

from training import diffusion
from training.config import TrainConfig, from_dict
from training.data import DEFAULT_FPS_ID, encode_mp4, load_autoencoder
from training.loop import load_checkpoint, model_from_config, resolve_device
from training.unet import VideoUNet

log = logging.getLogger(__name__)


def load_for_sampling(path: str, device: str = "cpu") -> tuple[VideoUNet, TrainConfig, int]:
    """(EMA network in eval mode on `device`, resolved config, input channels) from a checkpoint file.

    device: "cpu", "cuda" or "auto" (CUDA where torch sees a GPU).
    """
    ckpt = load_checkpoint(path)
    cfg = from_dict(ckpt["config"])
    model = model_from_config(cfg, int(ckpt["in_channels"]))
    model.load_state_dict(ckpt["ema"])
    model = model.to(resolve_device(replace(cfg, device=device)))
    return model.eval().requires_grad_(False), cfg, int(ckpt["in_channels"])


def embed_prompt(prompt: str, cfg: TrainConfig, prompt_embedding_path: str | None = None,
                 open_clip_model: str = "", open_clip_pretrained: str = "") -> np.ndarray | None:
    """The caption embedding of `prompt` (None = unconditional: empty prompt, no embedding given).

    Order: an explicit .npy file; else open_clip with the model/weights given here or in the
    checkpoint's config (the encoder that made the shards' caption_embedding); else an error.
    """
    if prompt_embedding_path:
        emb = np.load(prompt_embedding_path).astype(np.float32).reshape(-1)
        if emb.shape[0] != cfg.caption_dim:
            raise ValueError(f"--prompt-embedding has {emb.shape[0]} values; the model expects {cfg.caption_dim}")
        return emb
    if not prompt:
        return None
    model_name = open_clip_model or cfg.open_clip_model
    weights = open_clip_pretrained or cfg.open_clip_pretrained
    if not (model_name and weights):
        raise ValueError("no text encoder for --prompt: pass --prompt-embedding FILE.npy (a caption embedding "
                         f"of dimension {cfg.caption_dim}), or --open-clip-model NAME --open-clip-pretrained "
                         "PATH (the encoder of the shards' caption_embedding), or --prompt '' for "
                         "unconditional sampling")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"open_clip weights not found: {weights} (config key open_clip_pretrained)")
    import curation  # noqa: F401  (torchvision shim before open_clip imports torchvision)
    import open_clip

    encoder, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=weights)
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        emb = encoder.encode_text(tokenizer([prompt])).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)  # as the curation caption stage stores it (normalised)
    out = emb[0].numpy()
    if out.shape[0] != cfg.caption_dim:
        raise ValueError(f"{model_name} gives {out.shape[0]}-d embeddings; the model expects {cfg.caption_dim}")
    return out


@torch.no_grad()
def generate(model: VideoUNet, cfg: TrainConfig, in_channels: int, caption: np.ndarray | None,
             num_frames: int, num_steps: int, seed: int = 0, guidance_scale: float = 3.0,
             fps_id: int = DEFAULT_FPS_ID, motion_bucket_id: int = 127, num_samples: int = 1,
             sigma_max: float = 80.0, sigma_min: float = 0.002,
             decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Samples in [-1, 1], (N, 3, T, H, W), on the CPU. Deterministic: the noise comes from a CPU
    generator seeded by `seed` (the same noise on every device); the network runs on its own device."""
    if num_frames > 1 and not cfg.is_video:
        raise ValueError(f"the checkpoint is from the {cfg.stage} stage (images): use --frames 1")
    h, w = cfg.resolution_px, cfg.frame_width
    if cfg.latent_autoencoder:
        h, w = h // _latent_factor(cfg), w // _latent_factor(cfg)
    shape = (num_samples, in_channels, num_frames, h, w) if cfg.is_video else (num_samples, in_channels, h, w)
    device = next(model.parameters()).device
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    b = num_samples
    micro = {"fps_id": torch.full((b,), fps_id, device=device),
             "motion_bucket_id": torch.full((b,), motion_bucket_id, device=device)}
    cap = None if caption is None else torch.from_numpy(caption).to(device)[None].expand(b, -1)

    def cond(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return diffusion.denoise(model, x, sigma, cfg.sigma_data, caption=cap, **micro)

    def uncond(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return diffusion.denoise(model, x, sigma, cfg.sigma_data, caption=None, **micro)

    denoiser = cond if cap is None else diffusion.guided(cond, uncond, guidance_scale)
    sigmas = diffusion.karras_sigmas(num_steps, sigma_min, sigma_max).to(device)
    out = diffusion.heun_sample(denoiser, noise, sigmas)
    if not cfg.is_video:
        out = out[:, :, None]
    if decode is not None:
        out = decode(out)
    return out.clamp(-1, 1).cpu()


def _latent_factor(cfg: TrainConfig) -> int:
    import json

    with open(os.path.join(cfg.latent_autoencoder, "config.json")) as f:
        return 2 ** (len(json.load(f)["block_out_channels"]) - 1)


def latent_decoder(cfg: TrainConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents (N, C, T, h, w) -> pixels (N, 3, T, H, W) through the frozen autoencoder, on the latents' device."""
    vae = load_autoencoder(cfg.latent_autoencoder)
    scale = float(getattr(vae.config, "scaling_factor", 1.0))

    def decode(z: torch.Tensor) -> torch.Tensor:
        n, _, t = z.shape[:3]
        vae.to(z.device)
        frames = z.permute(0, 2, 1, 3, 4).flatten(0, 1) / scale  # (N*T, C, h, w)
        pix = vae.decode(frames).sample
        return pix.reshape(n, t, *pix.shape[1:]).permute(0, 2, 1, 3, 4)

    return decode


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    return ((video.permute(1, 2, 3, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    """uint8 (T, H, W, 3) as a looping GIF (Pillow)."""
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=int(round(1000 / fps)), loop=0)
    return buf.getvalue()


def write_outputs(frames: np.ndarray, out_path: str, fps: float) -> tuple[str, str]:
    """Write OUT.mp4 (H.264) and OUT.gif next to each other; returns both paths."""
    stem = out_path[:-4] if out_path.endswith((".mp4", ".gif")) else out_path
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    if frames.shape[1] % 2 or frames.shape[2] % 2:  # yuv420p needs even sizes
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    mp4, gif = stem + ".mp4", stem + ".gif"
    with open(mp4, "wb") as f:
        f.write(encode_mp4(frames, fps))
    with open(gif, "wb") as f:
        f.write(gif_bytes(frames, fps))
    return mp4, gif
