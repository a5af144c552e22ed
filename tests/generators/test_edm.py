"""EDM core checked against closed forms: preconditioning, the σ schedule, and sampling Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from rlsynth.generators.edm import (
    Churn,
    EDMConfig,
    EDMPrecond,
    PerSampleNoise,
    Polish,
    edm_loss,
    generate,
    karras_sigmas,
    polish,
    sample_euler,
    sample_heun,
    schedule,
)

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The ideal denoiser of N(μ, Σ): E[x0 | x0 + σn = x] = μ + Σ(Σ + σ²I)⁻¹(x − μ)."""
    out = torch.empty_like(x)
    eye = torch.eye(2, dtype=x.dtype)
    for s in sigma.unique():
        rows = sigma == s
        k = SIGMA.to(x.dtype) @ torch.linalg.inv(SIGMA.to(x.dtype) + float(s) ** 2 * eye)
        out[rows] = MU.to(x.dtype) + (x[rows] - MU.to(x.dtype)) @ k.T
    return out


def test_karras_schedule_closed_form() -> None:
    s = karras_sigmas(5, 0.002, 80.0, 7.0)
    assert len(s) == 6 and float(s[0]) == pytest.approx(80.0) and float(s[4]) == pytest.approx(0.002)
    assert float(s[5]) == 0.0 and bool((s[:-1][1:] < s[:-1][:-1]).all())
    mid = (80.0 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert float(karras_sigmas(3, 0.002, 80.0, 7.0)[1]) == pytest.approx(mid)
    linear = karras_sigmas(5, 1.0, 5.0, 1.0)
    torch.testing.assert_close(linear[:-1], torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    assert float(schedule(4, EDMConfig(), sigma_start=0.5)[0]) == pytest.approx(0.5)


def test_preconditioning_coefficients() -> None:
    """With F ≡ 1: D = c_skip x + c_out; at σ = σ_data, c_skip = 1/2 and c_out = σ_data/√2."""

    class One(torch.nn.Module):
        def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
            self.c_in_x, self.c_noise = x, c_noise
            return torch.ones_like(x)

    net = One()
    sd = 0.5
    d = EDMPrecond(net, sigma_data=sd)
    x = torch.full((1, 3), 2.0)
    out = d(x, torch.tensor([sd]))
    torch.testing.assert_close(out, 0.5 * x + sd / math.sqrt(2))
    torch.testing.assert_close(net.c_in_x, x / math.sqrt(2 * sd**2))
    torch.testing.assert_close(net.c_noise, torch.tensor([math.log(sd) / 4]))


def test_edm_loss_is_zero_for_the_identity_at_tiny_noise_and_weighted() -> None:
    x0 = torch.randn(64, 2)
    perfect = edm_loss(lambda x, s: x0, x0, EDMConfig())
    assert float(perfect) == 0.0
    mask = torch.zeros(64, 2)
    mask[:, 0] = 1
    half = edm_loss(lambda x, s: x0 + torch.tensor([0.0, 1.0]), x0, EDMConfig(), mask=mask)
    assert float(half) == 0.0  # the masked-out dimension does not count


@pytest.mark.parametrize("churn", [Churn(), Churn(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.0)])
def test_heun_reproduces_gaussian_mean_and_covariance(churn: Churn) -> None:
    n = 6000
    noise = PerSampleNoise(range(n))
    sigmas = karras_sigmas(40, 0.002, 80.0, 7.0)
    x = sample_heun(
        gaussian_denoiser,
        noise((n, 2)).double() * 80.0,
        sigmas,
        noise=lambda s: noise(s).double(),
        churn=churn,
    )
    mean, cov = x.mean(0), torch.cov(x.T)
    # Standard errors for n = 6000: mean ~0.013, covariance entries ~0.02.
    torch.testing.assert_close(mean, MU, atol=0.06, rtol=0)
    torch.testing.assert_close(cov, SIGMA, atol=0.06, rtol=0.05)


def test_euler_also_converges_with_enough_steps() -> None:
    n = 4000
    noise = PerSampleNoise(range(n))
    x = sample_euler(gaussian_denoiser, noise((n, 2)).double() * 80.0, karras_sigmas(200), noise=noise)
    torch.testing.assert_close(x.mean(0), MU, atol=0.08, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), SIGMA, atol=0.08, rtol=0.08)


def test_one_heun_step_to_zero_is_the_denoiser() -> None:
    x = torch.randn(5, 2, dtype=torch.float64)
    out = sample_heun(
        gaussian_denoiser, x, torch.tensor([3.0, 0.0], dtype=torch.float64), noise=PerSampleNoise(range(5))
    )
    torch.testing.assert_close(out, gaussian_denoiser(x, torch.full((5,), 3.0, dtype=torch.float64)))


def test_sample_i_does_not_depend_on_the_batch_split() -> None:
    cfg = EDMConfig()
    churn = Churn(s_churn=10.0)
    whole = generate(gaussian_denoiser, (6, 2), 8, cfg, PerSampleNoise(range(6)), churn=churn)
    parts = torch.cat(
        [
            generate(gaussian_denoiser, (2, 2), 8, cfg, PerSampleNoise(range(0, 2)), churn=churn),
            generate(gaussian_denoiser, (4, 2), 8, cfg, PerSampleNoise(range(2, 6)), churn=churn),
        ]
    )
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-6)


def test_refinement_from_sigma_start() -> None:
    draft = torch.randn(4, 2, dtype=torch.float64)
    same = generate(
        gaussian_denoiser, (4, 2), 5, EDMConfig(), PerSampleNoise(range(4)), x_init=draft, sigma_start=0.0
    )
    torch.testing.assert_close(same, draft, rtol=0, atol=0)
    moved = generate(
        gaussian_denoiser,
        (4, 2),
        5,
        EDMConfig(),
        lambda s: PerSampleNoise(range(4))(s).double(),
        x_init=draft,
        sigma_start=1.0,
    )
    assert not torch.equal(moved, draft)
    with pytest.raises(ValueError, match="must exceed sigma_min"):
        schedule(3, EDMConfig(), sigma_start=0.001)


def test_noise_source_checks_the_batch() -> None:
    with pytest.raises(ValueError, match="noise for 3 samples"):
        PerSampleNoise(range(2))((3, 4))


def test_polish_follows_the_gaussian_closed_form() -> None:
    """One polish iteration at σ maps N(m, V) data-relative to μ + K(x + σn − μ), K = Σ(Σ + σ²I)⁻¹: mean
    μ + K(m − μ), covariance K(V + σ²I)Kᵀ. Three iterations at σ = 0.7 from N(0, I) samples."""
    n, sig, iters = 40_000, 0.7, 3
    noise = PerSampleNoise(range(n))
    x0 = noise((n, 2)).double()
    out = polish(
        gaussian_denoiser,
        x0,
        torch.full((iters,), sig, dtype=torch.float64),
        noise=lambda s: noise(s).double(),
    )
    k = SIGMA @ torch.linalg.inv(SIGMA + sig**2 * torch.eye(2, dtype=torch.float64))
    mean, cov = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    for _ in range(iters):
        mean = MU + k @ (mean - MU)
        cov = k @ (cov + sig**2 * torch.eye(2, dtype=torch.float64)) @ k.T
    # Standard errors for n = 40,000: mean ~0.005, covariance entries ~0.005.
    torch.testing.assert_close(out.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(out.T), cov, atol=0.02, rtol=0.03)
    # Mode-seeking: the spread contracts below the data's (documented on Polish).
    assert float(torch.linalg.det(torch.cov(out.T))) < float(torch.linalg.det(SIGMA))


def test_polish_schedule_and_bad_settings() -> None:
    sig = Polish(steps=4, sigma_hi=0.5, sigma_lo=0.05).sigmas()
    torch.testing.assert_close(sig, torch.tensor([0.5, 0.5 * 10 ** (-1 / 3), 0.5 * 10 ** (-2 / 3), 0.05],
                                                 dtype=torch.float64))  # fmt: skip
    assert Polish().sigmas().numel() == 0
    with pytest.raises(ValueError, match="polish steps"):
        Polish(steps=-1)
    with pytest.raises(ValueError, match="sigma_lo <= sigma_hi"):
        Polish(steps=2, sigma_hi=0.05, sigma_lo=0.5)
    with pytest.raises(ValueError, match="sigma_lo <= sigma_hi"):
        Polish(steps=2, sigma_lo=0.0)


def test_generate_polishes_after_sampling_and_zero_is_off() -> None:
    cfg = EDMConfig()
    plain = generate(gaussian_denoiser, (6, 2), 8, cfg, PerSampleNoise(range(6)))
    off = generate(gaussian_denoiser, (6, 2), 8, cfg, PerSampleNoise(range(6)), polishing=Polish(0))
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    # By hand: the same sampler, then the polish iterations drawing from the same noise streams.
    noise = PerSampleNoise(range(6))
    sigmas = schedule(8, cfg)
    by_hand = sample_heun(gaussian_denoiser, noise((6, 2)) * float(sigmas[0]), sigmas, noise=noise)
    by_hand = polish(gaussian_denoiser, by_hand, Polish(3).sigmas(), noise=noise)
    polished = generate(gaussian_denoiser, (6, 2), 8, cfg, PerSampleNoise(range(6)), polishing=Polish(3))
    torch.testing.assert_close(polished, by_hand, rtol=0, atol=1e-6)
    assert not torch.equal(polished, plain)
    # Sample i is still independent of the batch split.
    parts = torch.cat(
        [
            generate(gaussian_denoiser, (2, 2), 8, cfg, PerSampleNoise(range(0, 2)), polishing=Polish(3)),
            generate(gaussian_denoiser, (4, 2), 8, cfg, PerSampleNoise(range(2, 6)), polishing=Polish(3)),
        ]
    )
    torch.testing.assert_close(polished, parts, rtol=0, atol=1e-6)
