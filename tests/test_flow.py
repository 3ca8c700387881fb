"""Flow-matching math against hand-computed values (reference/local-trainers.md §0) and diffusers' scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from finetune import flow


@pytest.mark.parametrize(
    ("tokens", "mu"),
    [(256, 0.5), (1024, 0.5 + 0.65 * 768 / 3840), (2304, 0.5 + 0.65 * 2048 / 3840), (4096, 1.15)],
)
def test_flux_shift_mu_is_linear_from_256_to_4096_tokens(tokens, mu):
    assert flow.flux_shift_mu(tokens) == pytest.approx(mu, abs=1e-12)


def test_flux_shift_mu_matches_rounded_reference_table():
    # reference/local-trainers.md §0: 512² -> 0.63, 768² -> 0.847, 1024² -> 1.15; e^mu at 1024² = 3.158
    assert round(flow.flux_shift_mu(1024), 2) == 0.63
    assert round(flow.flux_shift_mu(2304), 3) == 0.847
    assert flow.flux_shift(4096) == pytest.approx(3.158, abs=1e-3)
    assert flow.flux_shift(1024) == pytest.approx(1.88, abs=5e-3)
    assert flow.flux_shift(256) == pytest.approx(math.exp(0.5))


def test_flux_shift_mu_matches_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for tokens in (16, 256, 1000, 4096, 9216):
        assert flow.flux_shift_mu(tokens) == pytest.approx(calculate_shift(tokens), abs=1e-12)


def test_image_seq_len_counts_packed_tokens():
    assert flow.image_seq_len(1024, 1024) == 4096
    assert flow.image_seq_len(512, 768) == 32 * 48
    assert flow.image_seq_len(256, 256) == 256


def test_shift_sigmas_at_known_points():
    sigmas = torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=torch.float64)
    shifted = flow.shift_sigmas(sigmas, 3.0)
    # 3*0.5 / (1 + 2*0.5) = 0.75 ; 3*0.25 / (1 + 2*0.25) = 0.5
    torch.testing.assert_close(shifted, torch.tensor([0.0, 0.75, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(flow.shift_sigmas(sigmas, 1.0), sigmas)


def test_add_noise_is_identity_at_sigma_zero_and_noise_at_sigma_one():
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 4, 4, generator=gen)
    noise = torch.randn(2, 16, 4, 4, generator=gen)
    out = flow.add_noise(latents, noise, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], latents[0])
    torch.testing.assert_close(out[1], noise[1])
    half = flow.add_noise(latents, noise, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(half, 0.5 * (latents + noise))


def test_flow_target_is_the_derivative_of_add_noise():
    gen = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(3, 64, 8, generator=gen), torch.randn(3, 64, 8, generator=gen)
    s = torch.full((3,), 0.3)
    finite_diff = (flow.add_noise(latents, noise, s + 1e-3) - flow.add_noise(latents, noise, s)) / 1e-3
    torch.testing.assert_close(finite_diff, flow.flow_target(latents, noise), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("mode", ["flux_shift", "logit_normal", "uniform", "shift=3", "shift=3.1582"])
def test_sample_sigmas_is_deterministic_and_inside_open_interval(mode):
    a = flow.sample_sigmas(mode, 4096, 4096, torch.Generator().manual_seed(7))
    b = flow.sample_sigmas(mode, 4096, 4096, torch.Generator().manual_seed(7))
    c = flow.sample_sigmas(mode, 4096, 4096, torch.Generator().manual_seed(8))
    assert a.shape == (4096,) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool((a > 0).all()) and bool((a < 1).all())


def test_sample_sigmas_distributions():
    def mean(mode: str, tokens: int = 4096) -> float:
        return flow.sample_sigmas(mode, 20000, tokens, torch.Generator().manual_seed(0)).mean().item()

    assert mean("uniform") == pytest.approx(0.5, abs=0.01)
    assert mean("logit_normal") == pytest.approx(0.5, abs=0.01)  # symmetric around 0.5
    assert mean("flux_shift", 4096) > mean("logit_normal") + 0.1  # shifted towards noise at 1024²
    assert mean("flux_shift", 256) < mean("flux_shift", 4096)  # less shift at low resolution
    # a fixed shift of e^mu(4096) is the same draw as flux_shift at 4096 tokens
    torch.testing.assert_close(
        flow.sample_sigmas(f"shift={flow.flux_shift(4096)}", 64, 1, torch.Generator().manual_seed(3)),
        flow.sample_sigmas("flux_shift", 64, 4096, torch.Generator().manual_seed(3)),
    )


def test_sample_sigmas_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown sigma sampling mode 'sigmoid'"):
        flow.sample_sigmas("sigmoid", 2, 256, torch.Generator())


def test_inference_sigmas_match_the_flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    steps, tokens = 8, 1024
    sigmas = [1.0 - i * (1.0 - 1.0 / steps) / (steps - 1) for i in range(steps)]
    scheduler.set_timesteps(sigmas=sigmas, mu=flow.flux_shift_mu(tokens))
    torch.testing.assert_close(flow.inference_sigmas(steps, tokens), scheduler.sigmas.float(), atol=1e-6, rtol=0)
