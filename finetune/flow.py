"""Flow-matching (rectified flow) math for FLUX.1 training, as small pure tensor functions.

Every FLUX trainer agrees on this core (reference/local-trainers.md §0): ``x_t = (1 - σ) x_0 + σ ε``, the model
predicts the velocity ``ε - x_0``, and σ is drawn logit-normal, then moved towards noise by the FLUX scheduler's
resolution-dependent shift. Sources: the SD3 paper (Esser et al., arXiv:2403.03206) and the FLUX.1 scheduler config
(``base_shift 0.5``, ``max_shift 1.15``, ``base_image_seq_len 256``, ``max_image_seq_len 4096``).
"""

from __future__ import annotations

import math
import re

import torch

__all__ = [
    "SIGMA_MODES",
    "add_noise",
    "flow_target",
    "flux_shift",
    "flux_shift_mu",
    "image_seq_len",
    "inference_sigmas",
    "sample_sigmas",
    "shift_sigmas",
]

SIGMA_MODES = ("flux_shift", "flux2_shift", "logit_normal", "uniform", "shift=N")
_FIXED_SHIFT_RE = re.compile(r"^shift=(\d+(?:\.\d+)?)$")


def image_seq_len(height_px: int, width_px: int, vae_scale_factor: int = 8) -> int:
    """Packed image tokens of an image: ``(H / 16) * (W / 16)`` for FLUX (VAE ×8, then 2×2 packing).

    Source: diffusers ``FluxPipeline.prepare_latents`` / ``_pack_latents``.
    """
    return (height_px // (vae_scale_factor * 2)) * (width_px // (vae_scale_factor * 2))


def flux_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The FLUX resolution-dependent shift exponent μ, linear in the packed token count.

    μ = 0.5 at 256 tokens (256²), 1.15 at 4096 tokens (1024²), extrapolated linearly beyond. Source: FLUX.1 scheduler
    config and diffusers ``pipeline_flux.calculate_shift``; BFL ``flux/sampling.py get_lin_function``.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux_shift(image_seq_len: int) -> float:
    """The FLUX time shift ``e^μ`` for ``image_seq_len`` tokens: 1.65 at 256², 3.158 at 1024².

    Source: diffusers ``FlowMatchEulerDiscreteScheduler.time_shift`` (exponential type, σ exponent 1), which is the
    same map as ``shift_sigmas`` with ``shift = e^μ``; kohya's ``--discrete_flow_shift 3.1582`` is this value at 1024².
    """
    return math.exp(flux_shift_mu(image_seq_len))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift noise levels towards 1: ``σ' = shift·σ / (1 + (shift - 1)·σ)``; fixes 0 and 1, identity at shift 1.

    Source: SD3 paper (arXiv:2403.03206) §5.3.2 "resolution-dependent shifting of timestep schedules".
    """
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def _fixed_shift(mode: str) -> float | None:
    match = _FIXED_SHIFT_RE.match(mode)
    return float(match.group(1)) if match else None


def sample_sigmas(mode: str, batch_size: int, image_seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Draw one training noise level per sample, shape [B], float32, on ``generator.device``.

    Modes:
        ``logit_normal``: σ = sigmoid(n), n ~ N(0, 1) (SD3 paper, arXiv:2403.03206 §3.1 "logit-normal sampling").
        ``flux_shift``: logit-normal, then ``shift_sigmas`` with the FLUX shift ``e^μ(image_seq_len)`` (the default;
            kohya ``--timestep_sampling flux_shift``). ``flux2_shift`` is the same map (musubi-tuner's name for
            FLUX.2: μ linear 0.5 → 1.15 in the packed token count, ``trainer_base.py``).
        ``shift=N``: logit-normal, then a fixed shift N (kohya ``--timestep_sampling shift``; 3.1582 = 1024²).
        ``uniform``: σ ~ U(0, 1) (diffusers ``--weighting_scheme none``).

    The draw depends only on ``generator``'s state, so a seeded generator gives the same σ on any machine.

    Raises:
        ValueError: for an unknown mode.
    """
    device = generator.device
    if mode == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    fixed = _fixed_shift(mode)
    if mode not in ("flux_shift", "flux2_shift", "logit_normal") and fixed is None:
        raise ValueError(f"unknown sigma sampling mode {mode!r}: use one of {', '.join(SIGMA_MODES)} (e.g. shift=3)")
    sigmas = torch.sigmoid(torch.randn(batch_size, generator=generator, device=device))
    if mode in ("flux_shift", "flux2_shift"):
        return shift_sigmas(sigmas, flux_shift(image_seq_len))
    if fixed is not None:
        return shift_sigmas(sigmas, fixed)
    return sigmas


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation ``x_t = (1 - σ)·x_0 + σ·noise`` (SD3, arXiv:2403.03206, eq. 3 with a_t = 1 - t).

    ``sigmas`` has shape [B] (or is a scalar); it is broadcast over the remaining dimensions of ``latents``.
    """
    sigmas = torch.as_tensor(sigmas, device=latents.device, dtype=latents.dtype)
    if sigmas.ndim > 0:
        sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - sigmas) * latents + sigmas * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the transformer learns to predict: ``d x_t / dσ = noise - x_0``.

    Source: SD3 paper (arXiv:2403.03206) eq. 6 for the rectified-flow path; diffusers
    ``train_dreambooth_lora_flux.py`` ``target = noise - model_input``.
    """
    return noise - latents


def inference_sigmas(steps: int, image_seq_len: int) -> torch.Tensor:
    """The FLUX sampling schedule: ``linspace(1, 1/steps, steps)`` shifted by ``e^μ``, then a final 0; [steps + 1].

    Source: diffusers ``FluxPipeline.__call__`` with ``FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)``.
    """
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    shifted = shift_sigmas(sigmas, flux_shift(image_seq_len)).float()
    return torch.cat([shifted, torch.zeros(1)])
