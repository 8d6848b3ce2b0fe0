"""Tests of training/diffusion.py: preconditioning identities, v-target, schedules, Heun sampler, guidance."""

import math

import pytest
import torch

from training import diffusion as d

SHAPES = [(3, 2, 4, 4), (3, 2, 5, 4, 4)]  # images (B, C, H, W) and videos (B, C, T, H, W)


def fixed_net(x: torch.Tensor, c_noise: torch.Tensor, **cond) -> torch.Tensor:
    """A deterministic non-trivial 'network' of any rank."""
    return torch.tanh(2 * x + d.append_dims(c_noise, x.ndim)) + 0.3


@pytest.mark.parametrize("shape", SHAPES)
def test_denoiser_tends_to_input_as_sigma_goes_to_zero(shape):
    x = torch.randn(shape)
    errors = []
    for s in (1e-1, 1e-2, 1e-3, 1e-4):
        out = d.denoise(fixed_net, x, torch.full((shape[0],), s), sigma_data=0.5)
        errors.append((out - x).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:]))  # shrinks with sigma
    assert errors[-1] < 1e-3


def test_loss_weight_matches_formula_and_inverse_c_out():
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)
    for sd in (0.5, 1.0):
        expected = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        assert torch.allclose(d.loss_weight(sigma, sd), expected)
        _, c_out, _, _ = d.preconditioning(sigma, sd)
        assert torch.allclose(d.loss_weight(sigma, sd), 1 / c_out ** 2)


@pytest.mark.parametrize("shape", SHAPES)
def test_network_target_is_the_vp_velocity_at_unit_sigma_data(shape):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    assert torch.allclose(d.network_target(x0, eps, sigma, 1.0), d.velocity_from_vp(x0, eps, sigma))


@pytest.mark.parametrize("shape", SHAPES)
def test_perfect_network_gives_zero_loss_and_recovers_noise(shape):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1, 2.0, 30.0], dtype=torch.float64)
    target = d.network_target(x0, eps, sigma, 0.5)

    def oracle(x, c_noise, **cond):
        return target

    assert d.edm_loss(oracle, x0, sigma, eps, 0.5).abs().max() < 1e-18
    x = d.add_noise(x0, eps, sigma)
    denoised = d.denoise(oracle, x, sigma, 0.5)
    assert torch.allclose(d.denoised_to_noise(x, denoised, sigma), eps)


def test_loss_of_zero_network_is_weighted_c_skip_error():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigma = torch.tensor([0.5, 3.0])
    loss = d.edm_loss(lambda x, c, **k: torch.zeros_like(x), x0, sigma, eps, 0.5)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    manual = ((c_skip[:, None, None, None] * (x0 + sigma[:, None, None, None] * eps) - x0) ** 2).flatten(1).mean(1)
    assert torch.allclose(loss, d.loss_weight(sigma, 0.5) * manual, rtol=1e-5)


def test_lognormal_sigmas_have_requested_log_mean_and_std():
    s = d.sample_training_sigmas(40000, -0.4, 1.4, torch.Generator().manual_seed(0))
    assert abs(s.log().mean().item() + 0.4) < 0.03
    assert abs(s.log().std().item() - 1.4) < 0.03


def test_karras_schedule_endpoints_and_monotone():
    s = d.karras_sigmas(10, 0.002, 80.0)
    assert len(s) == 11 and s[-1] == 0
    assert math.isclose(s[0].item(), 80.0, rel_tol=1e-5) and math.isclose(s[-2].item(), 0.002, rel_tol=1e-4)
    assert torch.all(s[:-1] > s[1:])


def test_heun_sampler_reaches_a_gaussian_data_distribution():
    # For data ~ N(0, sd^2 I) the exact denoiser is D(x; s) = x sd^2 / (sd^2 + s^2): the sampled
    # distribution must have standard deviation sd.
    sd = 0.7
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = lambda x, s: x * sd ** 2 / (sd ** 2 + d.append_dims(s, x.ndim) ** 2)  # noqa: E731
    out = d.heun_sample(exact, noise, d.karras_sigmas(30).double())
    assert abs(out.std().item() - sd) < 0.03


def test_heun_sampler_is_deterministic_and_lands_on_a_point_mass():
    target = torch.randn(1, 2, 3, 4, 4)
    point = lambda x, s: target.expand_as(x)  # noqa: E731  data = one point: D is constant
    noise = torch.randn(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    a = d.heun_sample(point, noise, d.karras_sigmas(8))
    b = d.heun_sample(point, noise.clone(), d.karras_sigmas(8))
    assert torch.equal(a, b)
    assert torch.allclose(a, target.expand_as(a), atol=1e-5)


def test_classifier_free_guidance_extrapolates():
    cond = lambda x, s: x + 1.0  # noqa: E731
    uncond = lambda x, s: x  # noqa: E731
    x, s = torch.zeros(2, 3), torch.ones(2)
    assert d.guided(cond, uncond, 1.0) is cond
    assert torch.allclose(d.guided(cond, uncond, 3.0)(x, s), torch.full((2, 3), 3.0))
    assert torch.allclose(d.guided(cond, uncond, 0.0)(x, s), uncond(x, s))


def test_warmup_and_ema_halflife():
    assert d.lr_at_step(0, 1.0, 10) == pytest.approx(0.1)
    assert d.lr_at_step(50, 1.0, 10) == 1.0
    assert d.ema_decay(20.0) ** 20 == pytest.approx(0.5)
