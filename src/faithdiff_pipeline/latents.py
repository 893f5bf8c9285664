"""The latents a restoration starts from (noise, or the release's noised VAE latent of the input) and the decoding of
the final ones into images.

[`FaithDiffSDXLPipeline`] and the modular blocks (``faithdiff_pipeline.modular``) both compute through these
functions, so that the two give the same numbers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from .release_settings import START_POINTS

Generators = torch.Generator | list[torch.Generator] | None


def check_start_point(start_point: object) -> None:
    if start_point not in START_POINTS:
        raise ValueError(f"`start_point` must be one of {START_POINTS}, got {start_point!r}.")


def start_latents(
    vae: Any,
    scheduler: Any,
    image: torch.Tensor,
    batch_size: int,
    start_point: str,
    generator: Generators,
    latents: torch.Tensor | None,
    device: torch.device,
    vae_scale_factor: int,
) -> torch.Tensor:
    """Initial latents ``[batch_size, C, H/8, W/8]`` (float32) for ``image`` (padded, in [-1, 1]).

    ``"noise"``: ε · init_noise_sigma. ``"lr"`` (the release's default): the VAE latent of the input, noised by a
    DDPM ``add_noise`` at t = 999 with that same ε · init_noise_sigma.

    Args:
        vae (`AutoencoderKL`): Gives the latent shape, and encodes the input for ``"lr"``.
        scheduler (`SchedulerMixin`): The sampler, for its ``init_noise_sigma`` and its training schedule.
        image (`torch.Tensor`): The padded LQ images, ``[images, 3, H, W]`` in [-1, 1].
        batch_size (`int`): Outputs: images x ``num_images_per_prompt``.
        start_point (`str`): ``"lr"`` or ``"noise"``.
        generator (`torch.Generator` or `list[torch.Generator]`, *optional*): One, or one per output.
        latents (`torch.Tensor`, *optional*): The standard-normal ε to use instead of drawing it.
        device (`torch.device`): Where the latents are made.
        vae_scale_factor (`int`): Pixels per latent.
    """
    repeats = batch_size // image.shape[0]
    shape = (
        batch_size,
        vae.config.latent_channels,
        image.shape[-2] // vae_scale_factor,
        image.shape[-1] // vae_scale_factor,
    )
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(
            f"`generator` is a list of {len(generator)} generators, expected {batch_size} "
            "(images x num_images_per_prompt)."
        )
    if latents is None:
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    elif tuple(latents.shape) != shape:
        raise ValueError(
            f"`latents` must have shape {shape} (batch x channels x padded size / 8), got {tuple(latents.shape)}."
        )
    else:
        noise = latents.to(device=device, dtype=torch.float32)
    noise = noise * scheduler.init_noise_sigma
    if start_point == "noise":
        return noise
    encoded = image_latents(vae, image, repeats, generator, device) * vae.config.scaling_factor
    ddpm = DDPMScheduler.from_config(scheduler.config)
    start = torch.full((batch_size,), ddpm.config.num_train_timesteps - 1, device=device, dtype=torch.long)
    return ddpm.add_noise(encoded, noise, start)


def image_latents(
    vae: Any, image: torch.Tensor, repeats: int, generator: Generators, device: torch.device
) -> torch.Tensor:
    """The VAE latents of ``image`` (unscaled, float32), each repeated ``repeats`` times, as diffusers' img2img
    pipelines retrieve them: a sample of the latent distribution, or the latents of a VAE that has none (e.g.
    ``AutoencoderTiny``)."""
    encoded = vae.encode(image.to(device=device, dtype=vae.dtype))
    if hasattr(encoded, "latent_dist"):
        # The sample drawn in float32 after repeating, one draw per output: the release's numbers exactly.
        posterior = encoded.latent_dist
        mean = posterior.mean.float().repeat_interleave(repeats, dim=0)
        std = posterior.std.float().repeat_interleave(repeats, dim=0)
        return mean + std * randn_tensor(mean.shape, generator=generator, device=device, dtype=torch.float32)
    if hasattr(encoded, "latents"):
        return encoded.latents.float().repeat_interleave(repeats, dim=0)
    raise ValueError(
        f"`vae` ({type(vae).__name__}) returned neither `latent_dist` nor `latents` from `encode`; "
        'use start_point="noise" or a diffusers VAE.'
    )


def decode_latents(vae: Any, latents: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """VAE decode to images in [0, 1], ``[B, 3, H, W]`` float32 (upcasting a float16 VAE that asks for it).
    ``generator`` seeds a VAE whose decoder samples (``ConsistencyDecoderVAE``)."""
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    vae_dtype = vae.dtype
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        config = vae.config
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        sampled = "generator" in inspect.signature(vae.decode).parameters
        extra = {"generator": generator} if sampled else {}
        image = vae.decode(latents.to(vae.dtype), return_dict=False, **extra)[0]
    finally:
        if upcast:
            vae.to(dtype=vae_dtype)
    return (image.float() / 2 + 0.5).clamp(0, 1)
