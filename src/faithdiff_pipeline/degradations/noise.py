"""Additive Gaussian and Poisson (shot) noise, per image, colour or grey, drawn from an explicit generator."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# The release converts to grey with torchvision's rgb_to_grayscale, whose red weight is 0.2989 (BT.601's 0.299
# truncated); using its weights keeps grey Poisson noise identical to the release's at the same draw.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"`images` must be a torch.Tensor, got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`images` must be [B, 3, H, W], got shape {tuple(images.shape)}.")


def _per_image(value, batch: int, name: str) -> list:
    values = list(value) if isinstance(value, (Sequence, torch.Tensor)) else [value] * batch
    if len(values) != batch:
        raise ValueError(f"`{name}` must hold one value per image ({batch}), got {len(values)}.")
    return [v.item() if isinstance(v, torch.Tensor) else v for v in values]


def _noise_device(generator: torch.Generator | None, images: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else images.device


def gaussian_noise(
    images: torch.Tensor,
    sigma: float | Sequence[float] | torch.Tensor,
    gray: bool | Sequence[bool] | torch.Tensor = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zero-mean Gaussian noise for ``images`` ``[B, 3, H, W]``: standard deviation ``sigma`` on the 0-255 scale.

    ``sigma`` and ``gray`` are scalars or one value per image; grey noise is one field shared by the three channels.
    The fields are drawn on the generator's device (the images' without one) and returned on the images' device.
    """
    _check_images(images)
    b, _, h, w = images.shape
    sigmas, grays = _per_image(sigma, b, "sigma"), _per_image(gray, b, "gray")
    device = _noise_device(generator, images)
    fields = []
    for s, g in zip(sigmas, grays):
        field = torch.randn((1 if g else 3, h, w), generator=generator, device=device, dtype=torch.float32)
        fields.append(field.expand(3, h, w) * (s / 255.0))
    return torch.stack(fields).to(device=images.device, dtype=images.dtype)


def _shot_noise(plane: torch.Tensor, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Poisson noise of one ``[C, H, W]`` image at the photon count implied by its number of grey levels."""
    levels_image = torch.round(plane.clamp(0, 1) * 255.0) / 255.0
    # As in scikit-image and Real-ESRGAN: the "photon count" of a full-scale pixel is the number of distinct
    # levels in the image rounded up to a power of two, so that the noise strength adapts to the image content.
    levels = torch.unique(levels_image).numel()
    counts = 2.0 ** math.ceil(math.log2(levels))
    rates = (levels_image * counts).to(device=device, dtype=torch.float32)
    noisy = torch.poisson(rates, generator=generator).to(plane) / counts
    return noisy - levels_image


def poisson_noise(
    images: torch.Tensor,
    scale: float | Sequence[float] | torch.Tensor,
    gray: bool | Sequence[bool] | torch.Tensor = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Signal-dependent shot noise for ``images`` ``[B, 3, H, W]`` in [0, 1], multiplied by ``scale``.

    Grey noise is computed on the image's luma and shared by the three channels. ``scale`` and ``gray`` are
    scalars or one value per image.
    """
    _check_images(images)
    b = images.shape[0]
    scales, grays = _per_image(scale, b, "scale"), _per_image(gray, b, "gray")
    device = _noise_device(generator, images)
    weights = torch.tensor(_GRAY_WEIGHTS, dtype=images.dtype, device=images.device)[:, None, None]
    fields = []
    for image, s, g in zip(images, scales, grays):
        plane = (image * weights).sum(0, keepdim=True) if g else image
        fields.append(_shot_noise(plane, generator, device).expand(3, -1, -1) * s)
    return torch.stack(fields)
