"""The diffusion objective of both stages: epsilon prediction at a uniform timestep, offset noise, an L1 loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


@dataclass(frozen=True)
class NoisedLatents:
    """A training batch's diffusion inputs: ``noisy`` = ``add_noise(latents, noise, timesteps)``; ``noise`` is the
    target of the epsilon prediction."""

    noisy: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def offset_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard-normal noise shaped like ``latents``, plus ``noise_offset`` times a per-sample, per-channel normal
    offset (constant over the image), which lets the model learn to change an image's mean brightness
    (crosslabs.org/blog/diffusion-with-offset-noise; the release uses 0.02). The noise is drawn first, then the
    offset, both from ``generator``."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn(
            latents.shape[:2] + (1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
        noise = noise + noise_offset * offset
    return noise


def noise_latents(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise_offset: float, generator: torch.Generator | None = None
) -> NoisedLatents:
    """Draws the noise (see :func:`offset_noise`) and one timestep per sample, uniform in
    ``[0, num_train_timesteps)``, and noises ``latents`` with the scheduler's forward process."""
    noise = offset_noise(latents, noise_offset, generator)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
    )
    return NoisedLatents(scheduler.add_noise(latents, noise, timesteps), noise, timesteps)


def epsilon_loss(noise_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The release's loss: the mean absolute error between the predicted and the true noise, in float32."""
    return F.l1_loss(noise_pred.float(), noise.float(), reduction="mean")
