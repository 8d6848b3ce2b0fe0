"""Diffusion math of the trainer: pure functions on tensors, no I/O, no model code.

What is computed (Karras et al. 2022, "EDM", with the v-prediction-style scalings that
Stable Video Diffusion uses, `VScalingWithEDMcNoise` + `EDMWeighting` in
Stability-AI/generative-models):

    x_sigma  = x0 + sigma * noise                                  (forward process)
    c_skip   = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out    = -sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)  (minus sign: v-prediction)
    c_in     = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise  = 0.25 * ln(sigma)
    D(x; s)  = c_skip * x + c_out * F(c_in * x, c_noise)            (denoiser)
    lambda   = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2   (= 1 / c_out^2)
    loss     = lambda * ||D(x_sigma; sigma) - x0||^2
    ln sigma ~ Normal(P_mean, P_std^2)                              (training noise levels)

With sigma_data = 1 the network's regression target (x0 - c_skip x) / c_out is exactly the
velocity v = alpha * eps - s * x0 of the variance-preserving process with alpha = 1/sqrt(1+sigma^2),
s = sigma/sqrt(1+sigma^2) (see `velocity_from_vp`, computed independently for the tests).

Every function takes per-sample sigma of shape (B,) and broadcasts it with `append_dims`, so
images (B, C, H, W) and videos (B, C, T, H, W) share one code path.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch


def append_dims(x: torch.Tensor, target_ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a (B,) tensor broadcasts against a rank-`target_ndim` one."""
    missing = target_ndim - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_ndim is {target_ndim}")
    return x[(...,) + (None,) * missing]


# ---- preconditioning --------------------------------------------------------------------

def preconditioning(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) for per-sample noise levels sigma (B,)."""
    sd2 = sigma_data ** 2
    c_skip = sd2 / (sigma ** 2 + sd2)
    c_out = -sigma * sigma_data / (sigma ** 2 + sd2).sqrt()
    c_in = 1.0 / (sigma ** 2 + sd2).sqrt()
    c_noise = 0.25 * sigma.log()
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 = 1 / c_out^2."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


class Network(Protocol):
    def __call__(self, x: torch.Tensor, c_noise: torch.Tensor, **cond) -> torch.Tensor: ...


def denoise(net: Network, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float,
            **cond) -> torch.Tensor:
    """The preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, cond)."""
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
    n = x.ndim
    f = net(append_dims(c_in, n) * x, c_noise, **cond)
    return append_dims(c_skip, n) * x + append_dims(c_out, n) * f.to(x.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = x0 + sigma * noise (the EDM / variance-exploding forward process)."""
    return x0 + append_dims(sigma, x0.ndim) * noise


def network_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                   sigma_data: float) -> torch.Tensor:
    """The value of F for which D(x_sigma) == x0 exactly: (x0 - c_skip x_sigma) / c_out."""
    c_skip, c_out, _, _ = preconditioning(sigma, sigma_data)
    x = add_noise(x0, noise, sigma)
    return (x0 - append_dims(c_skip, x0.ndim) * x) / append_dims(c_out, x0.ndim)


def denoised_to_noise(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """eps = (x_sigma - D) / sigma: the noise a denoised estimate implies."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def velocity_from_vp(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """v = alpha eps - s x0 of the variance-preserving process with the same signal-to-noise ratio.

    alpha = 1/sqrt(1 + sigma^2), s = sigma/sqrt(1 + sigma^2) (Salimans & Ho 2022). Written from
    the VP side on purpose: the tests compare it with `network_target` at sigma_data = 1.
    """
    alpha = append_dims(1.0 / torch.sqrt(1.0 + sigma ** 2), x0.ndim)
    s = append_dims(sigma / torch.sqrt(1.0 + sigma ** 2), x0.ndim)
    return alpha * noise - s * x0


def edm_loss(net: Network, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
             sigma_data: float, **cond) -> torch.Tensor:
    """Per-sample weighted loss lambda(sigma) * mean ||D(x0 + sigma noise; sigma) - x0||^2, shape (B,)."""
    denoised = denoise(net, add_noise(x0, noise, sigma), sigma, sigma_data, **cond)
    dtype = torch.promote_types(denoised.dtype, torch.float32)  # bf16 (autocast) up, float64 kept
    per_sample = (denoised.to(dtype) - x0.to(dtype)).pow(2).flatten(1).mean(1)
    return loss_weight(sigma, sigma_data) * per_sample


# ---- noise levels -----------------------------------------------------------------------

def sample_training_sigmas(batch_size: int, p_mean: float, p_std: float,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Log-normal training noise levels: ln sigma ~ N(p_mean, p_std^2), shape (B,)."""
    return torch.exp(p_mean + p_std * torch.randn(batch_size, generator=generator))


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> torch.Tensor:
    """Karras et al. eq. 5: num_steps decreasing noise levels from sigma_max to sigma_min, then 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    if num_steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


# ---- sampling ---------------------------------------------------------------------------

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma (B,)) -> D(x)


@torch.no_grad()
def heun_sample(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Deterministic Heun (2nd order) sampler, EDM Algorithm 1 without churn.

    noise: standard normal (B, C, [T,] H, W); it is scaled by sigmas[0]. sigmas end with 0.
    The result depends only on `noise`, so a seeded noise tensor gives a reproducible sample.
    """
    x = noise * sigmas[0]
    b = noise.shape[0]
    for i in range(len(sigmas) - 1):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        d_cur = (x - denoiser(x, s_cur.expand(b))) / s_cur
        x_next = x + (s_next - s_cur) * d_cur
        # Heun correction, except on the last step to sigma = 0 (Euler there, as in EDM).
        if s_next > 0:
            d_next = (x_next - denoiser(x_next, s_next.expand(b))) / s_next
            x_next = x + (s_next - s_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x


def guided(denoise_cond: Denoiser, denoise_uncond: Denoiser, guidance_scale: float) -> Denoiser:
    """Classifier-free guidance: D_u + w (D_c - D_u); w = 1 is the conditional model alone."""
    if guidance_scale == 1.0:
        return denoise_cond

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        d_u = denoise_uncond(x, sigma)
        d_c = denoise_cond(x, sigma)
        return d_u + guidance_scale * (d_c - d_u)

    return fn


def lr_at_step(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from 0 to base_lr over warmup_steps, then constant (SVD trains at constant lr)."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def ema_decay(ema_halflife_steps: float) -> float:
    """Per-step EMA decay whose weight on an old step halves every ema_halflife_steps steps."""
    if ema_halflife_steps <= 0:
        return 0.0
    return 0.5 ** (1.0 / ema_halflife_steps)

