"""The SVD-style space-time U-Net F(c_in x, c_noise, conditioning) used inside the EDM denoiser.

Shape contract (einops patterns are the contract, as in lucidrains/video-diffusion-pytorch):
- spatial layers (ResBlock, SpatialTransformer) see frames as images: 'b c t h w -> (b t) c h w';
- temporal layers see every pixel over time: '(b t) c h w -> (b h w) c t' for the temporal
  convolution and '(b h w) t c' for temporal attention.

Each temporal layer sits after a spatial one and returns an update `delta`; the two are mixed
by a learned alpha = sigmoid(mix_logit) as SVD's AlphaBlender does:
    out = alpha * h + (1 - alpha) * (h + delta) = h + (1 - alpha) * delta.
(SVD's temporal ResBlock is residual, so the two forms are the same; writing it as an update
makes "delta = 0 gives exactly the image model" hold bit for bit.)

Image mode: a 4-D input (B, C, H, W) bypasses every temporal layer, so the image stage trains
only spatial weights. The temporal layers and the micro-conditioning embedding exist only when
`temporal=True`; their last projection is zero-initialised, so a video model extended from an
image checkpoint (`extend_to_video`) computes, frame by frame, exactly the image model's output.

Conditioning:
- noise level: sinusoidal embedding of c_noise -> MLP -> added in every ResBlock;
- caption: the shards' pooled caption embedding (B, D) is projected to `context_tokens` tokens
  that every SpatialTransformer cross-attends to (a single pooled token would make the
  attention weights trivially 1). Rows without a caption (null in the shards, or dropped for
  classifier-free guidance) use a learned null embedding instead;
- fps_id and motion_bucket_id (SVD micro-conditioning): sinusoidal embeddings -> MLP with a
  zero-initialised output -> added to the noise embedding, in video mode only (a single frame
  has no motion or frame rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

NORM_GROUPS = 8


def timestep_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) of real or integer values."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(NORM_GROUPS, channels), channels)


@dataclass
class Ctx:
    """What every layer may read besides its input (built once per forward)."""

    emb: torch.Tensor  # (B*T, E) noise (+ micro-conditioning) embedding per frame
    context: torch.Tensor  # (B*T, K, Dc) caption tokens per frame
    emb_video: torch.Tensor  # (B, E) per clip, for temporal layers
    num_frames: int
    temporal_on: bool


# ---- spatial layers ---------------------------------------------------------------------

class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2, self.conv2 = norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # x (N, C, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if kv is None else kv  # (N, L, D), (N, S, Dkv)
        q = rearrange(self.q(x), "n l (h d) -> n h l d", h=self.heads)
        k, v = rearrange(self.kv(kv), "n s (two h d) -> two n h s d", two=2, h=self.heads)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(rearrange(o, "n h l d -> n l (h d)"))


class SpatialTransformer(nn.Module):
    """Self-attention over the pixels of a frame, cross-attention to the caption tokens, MLP."""

    def __init__(self, ch: int, heads: int, context_dim: int):
        super().__init__()
        self.norm = norm(ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.ln1, self.self_attn = nn.LayerNorm(ch), Attention(ch, heads)
        self.ln2, self.cross_attn = nn.LayerNorm(ch), Attention(ch, heads, kv_dim=context_dim)
        self.ln3 = nn.LayerNorm(ch)
        self.ff = nn.Sequential(nn.Linear(ch, 2 * ch), nn.GELU(), nn.Linear(2 * ch, ch))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        t = rearrange(self.proj_in(self.norm(x)), "n c h w -> n (h w) c")
        t = t + self.self_attn(self.ln1(t))
        t = t + self.cross_attn(self.ln2(t), context)
        t = t + self.ff(self.ln3(t))
        return x + self.proj_out(rearrange(t, "n (h w) c -> n c h w", h=h, w=w))


# ---- temporal layers --------------------------------------------------------------------

def mix_parameter(merge_factor: float, module: nn.Module) -> nn.Parameter:
    """The mix logit, a 1-element vector (parameter sharding takes no 0-d tensors); checkpoints
    written when it was a 0-d tensor load into it."""
    def reshape(state_dict, prefix, *args) -> None:
        value = state_dict.get(prefix + "mix_logit")
        if value is not None and value.dim() == 0:
            state_dict[prefix + "mix_logit"] = value.reshape(1)

    module._register_load_state_dict_pre_hook(reshape)
    return nn.Parameter(torch.tensor([float(merge_factor)]))


class TemporalResBlock(nn.Module):
    """Temporal convolution (kernel 3 over time) with the noise embedding; returns an update."""

    def __init__(self, ch: int, emb_dim: int, merge_factor: float = 0.5):
        super().__init__()
        self.norm1, self.conv1 = norm(ch), nn.Conv1d(ch, ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, ch)
        self.norm2, self.conv2 = norm(ch), zero_(nn.Conv1d(ch, ch, 3, padding=1))
        self.mix_logit = mix_parameter(merge_factor, self)

    def forward(self, x: torch.Tensor, emb_video: torch.Tensor, num_frames: int) -> torch.Tensor:
        hh, ww = x.shape[-2:]
        # Normalise over the whole clip (as SVD does), convolve each pixel's series over time.
        y = F.silu(self.norm1(rearrange(x, "(b t) c h w -> b c t h w", t=num_frames)))
        y = self.conv1(rearrange(y, "b c t h w -> (b h w) c t"))
        y = y + repeat(self.emb_proj(F.silu(emb_video)), "b c -> (b hw) c 1", hw=hh * ww)
        y = F.silu(self.norm2(rearrange(y, "(b h w) c t -> b c t h w", h=hh, w=ww)))
        y = self.conv2(rearrange(y, "b c t h w -> (b h w) c t"))
        delta = rearrange(y, "(b h w) c t -> (b t) c h w", h=hh, w=ww)
        return x + (1 - torch.sigmoid(self.mix_logit)) * delta


class TemporalAttention(nn.Module):
    """Self-attention of every pixel over the clip's frames; returns x + (1 - alpha) * update."""

    def __init__(self, ch: int, heads: int, merge_factor: float = 0.5):
        super().__init__()
        self.ch = ch
        self.ln = nn.LayerNorm(ch)
        self.attn = Attention(ch, heads)
        zero_(self.attn.out)
        self.mix_logit = mix_parameter(merge_factor, self)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        hh, ww = x.shape[-2:]
        y = rearrange(x, "(b t) c h w -> (b h w) t c", t=num_frames)
        pos = timestep_embedding(torch.arange(num_frames, device=x.device), self.ch).to(y.dtype)
        y = self.attn(self.ln(y) + pos[None])
        delta = rearrange(y, "(b h w) t c -> (b t) c h w", h=hh, w=ww)
        return x + (1 - torch.sigmoid(self.mix_logit)) * delta


# ---- space-time blocks ------------------------------------------------------------------

class VideoResBlock(nn.Module):
    """Spatial ResBlock, then (video mode only) the temporal ResBlock, as SVD's VideoResBlock."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, temporal: bool, dropout: float):
        super().__init__()
        self.spatial = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.temporal = TemporalResBlock(out_ch, emb_dim) if temporal else None

    def forward(self, x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        x = self.spatial(x, ctx.emb)
        if ctx.temporal_on and self.temporal is not None:
            x = self.temporal(x, ctx.emb_video, ctx.num_frames)
        return x


class VideoTransformer(nn.Module):
    """SpatialTransformer, then (video mode only) temporal attention."""

    def __init__(self, ch: int, heads: int, context_dim: int, temporal: bool):
        super().__init__()
        self.spatial = SpatialTransformer(ch, heads, context_dim)
        self.temporal = TemporalAttention(ch, heads) if temporal else None

    def forward(self, x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        x = self.spatial(x, ctx.context)
        if ctx.temporal_on and self.temporal is not None:
            x = self.temporal(x, ctx.num_frames)
        return x


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.ModuleList):
    def forward(self, x: torch.Tensor, ctx: Ctx) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, ctx)
        return x


# ---- the network ------------------------------------------------------------------------

class VideoUNet(nn.Module):
    """F(x, c_noise, caption, caption_valid, fps_id, motion_bucket_id) for images or videos.

    x: (B, C, H, W) image mode, or (B, C, T, H, W); returns a tensor of the same shape.
    H and W must be divisible by 2 ** (len(channel_mult) - 1).
    """

    def __init__(self, in_channels: int = 3, model_channels: int = 32,
                 channel_mult: tuple[int, ...] = (1, 2), num_res_blocks: int = 1,
                 attention_levels: tuple[int, ...] = (1,), num_heads: int = 4,
                 caption_dim: int = 512, context_tokens: int = 4, context_dim: int = 64,
                 temporal: bool = False, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.temporal = in_channels, temporal
        # Activation checkpointing per block (each Stage of down, mid, up): while training, a
        # block keeps only its input and recomputes the rest in the backward pass.
        self.checkpointing = False
        self.model_channels, self.caption_dim = model_channels, caption_dim
        self.context_tokens, self.context_dim = context_tokens, context_dim
        emb_dim = 4 * model_channels
        mc = model_channels

        # Conditioning embeddings.
        self.noise_mlp = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.null_caption = nn.Parameter(torch.zeros(caption_dim))
        self.caption_proj = nn.Sequential(nn.LayerNorm(caption_dim),
                                          nn.Linear(caption_dim, context_tokens * context_dim))
        if temporal:
            self.micro = nn.Sequential(nn.Linear(2 * mc, emb_dim), nn.SiLU(),
                                       zero_(nn.Linear(emb_dim, emb_dim)))

        # Encoder.
        self.conv_in = nn.Conv2d(in_channels, mc, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [VideoResBlock(ch, mult * mc, emb_dim, temporal, dropout)]
                ch = mult * mc
                if level in attention_levels:
                    layers.append(VideoTransformer(ch, num_heads, context_dim, temporal))
                self.down.append(Stage(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Stage([Downsample(ch)]))
                skip_channels.append(ch)

        # Middle.
        self.mid = Stage([VideoResBlock(ch, ch, emb_dim, temporal, dropout),
                          VideoTransformer(ch, num_heads, context_dim, temporal),
                          VideoResBlock(ch, ch, emb_dim, temporal, dropout)])

        # Decoder: every encoder output comes back through a skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [VideoResBlock(ch + skip_channels.pop(), mult * mc, emb_dim, temporal, dropout)]
                ch = mult * mc
                if level in attention_levels:
                    layers.append(VideoTransformer(ch, num_heads, context_dim, temporal))
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(Stage(layers))
        self.norm_out = norm(ch)
        # Zero output: a fresh model predicts F = 0, i.e. D(x) = c_skip x (EDM does the same).
        self.conv_out = zero_(nn.Conv2d(ch, in_channels, 3, padding=1))

    def caption_tokens(self, caption: torch.Tensor | None, caption_valid: torch.Tensor | None,
                       batch: int) -> torch.Tensor:
        """(B, K, Dc) caption tokens; rows with caption_valid False use the learned null embedding."""
        null = self.null_caption[None].expand(batch, -1)
        if caption is None:
            cap = null
        else:
            if caption.shape[-1] != self.caption_dim:
                raise ValueError(f"caption embedding has dimension {caption.shape[-1]}, "
                                 f"the model was built for {self.caption_dim}")
            valid = torch.ones(batch, dtype=torch.bool, device=caption.device) \
                if caption_valid is None else caption_valid
            cap = torch.where(valid[:, None], caption.to(null.dtype), null)
        return rearrange(self.caption_proj(cap), "b (k d) -> b k d", k=self.context_tokens)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, caption: torch.Tensor | None = None,
                caption_valid: torch.Tensor | None = None, fps_id: torch.Tensor | None = None,
                motion_bucket_id: torch.Tensor | None = None) -> torch.Tensor:
        image_mode = x.ndim == 4
        if image_mode:
            x = x[:, :, None]  # (B, C, 1, H, W)
        b, _, t = x.shape[:3]
        temporal_on = not image_mode and self.temporal

        # Per-clip embeddings, then repeated for every frame the spatial layers see.
        emb_video = self.noise_mlp(timestep_embedding(c_noise.reshape(-1).expand(b) * 100.0,
                                                      self.model_channels))  # (B, E)
        if temporal_on:
            fps = torch.full((b,), 6, device=x.device) if fps_id is None else fps_id
            mot = torch.full((b,), 127, device=x.device) if motion_bucket_id is None else motion_bucket_id
            micro = torch.cat([timestep_embedding(fps, self.model_channels),
                               timestep_embedding(mot, self.model_channels)], dim=1)
            emb_video = emb_video + self.micro(micro)
        context = self.caption_tokens(caption, caption_valid, b)  # (B, K, Dc)
        ctx = Ctx(emb=repeat(emb_video, "b e -> (b t) e", t=t),
                  context=repeat(context, "b k d -> (b t) k d", t=t),
                  emb_video=emb_video, num_frames=t, temporal_on=temporal_on)

        h = self.conv_in(rearrange(x, "b c t h w -> (b t) c h w"))
        skips = [h]
        for stage in self.down:
            h = self._block(stage, h, ctx)
            skips.append(h)
        h = self._block(self.mid, h, ctx)
        for stage in self.up:
            h = self._block(stage, torch.cat([h, skips.pop()], dim=1), ctx)
        out = self.conv_out(F.silu(self.norm_out(h)))
        out = rearrange(out, "(b t) c h w -> b c t h w", t=t)
        return out[:, :, 0] if image_mode else out


    def _block(self, stage: Stage, h: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, h, ctx, use_reentrant=False)
        return stage(h, ctx)


def is_temporal_key(name: str) -> bool:
    """Whether a state-dict key belongs to the video-only part (temporal layers, micro-conditioning)."""
    return ".temporal." in name or name.startswith("micro.")


def extend_to_video(image_state: dict[str, torch.Tensor], video_model: VideoUNet) -> VideoUNet:
    """Load an image model's weights into a video model; temporal layers keep their zero init.

    Fails if anything other than temporal weights is missing or left over, so an architecture
    mismatch between stages is an error rather than a silently re-initialised layer.
    """
    result = video_model.load_state_dict(image_state, strict=False)
    bad_missing = [k for k in result.missing_keys if not is_temporal_key(k)]
    if bad_missing or result.unexpected_keys:
        raise ValueError(f"image checkpoint does not match the video model: missing {bad_missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return video_model
