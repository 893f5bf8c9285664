"""Colour correction of the restored image against the upscaled input, as in the FaithDiff release."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .release_settings import COLOR_FIXES


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Gives each channel of ``image`` the mean and standard deviation of ``reference`` (both ``[B, C, H, W]``).

    Statistics are per image and channel; the standard deviation is the unbiased one with ``eps`` added to the
    variance, as the release computes it.
    """
    image_mean, image_std = _channel_mean_std(image, eps)
    ref_mean, ref_std = _channel_mean_std(reference, eps)
    return (image - image_mean) / image_std * ref_std + ref_mean


def _channel_mean_std(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2) + eps).sqrt()[..., None, None]
    return mean, std


def _wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device) / 16
    channels = x.shape[1]
    kernel = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=dilation)


def wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """À-trous decomposition: returns (sum of the ``levels`` high-frequency bands, the remaining low band)."""
    low = x
    for level in range(levels):
        low = _wavelet_blur(low, 2**level)
    return x - low, low


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Keeps the high-frequency bands of ``image`` and takes the low band (colour, shading) from ``reference``."""
    high, _ = wavelet_split(image, levels)
    _, reference_low = wavelet_split(reference, levels)
    return high + reference_low


def apply_color_fix(image: torch.Tensor, reference: torch.Tensor, method: str | None) -> torch.Tensor:
    """Applies colour fix ``method`` (``"adain"``, ``"wavelet"`` or ``None``) and clamps to [0, 1]."""
    if method is None:
        return image
    if method not in COLOR_FIXES:
        raise ValueError(f"`color_fix` must be one of {COLOR_FIXES} or None, got {method!r}.")
    reference = reference.to(device=image.device, dtype=image.dtype)
    fixed = adain_color_fix(image, reference) if method == "adain" else wavelet_color_fix(image, reference)
    return fixed.clamp(0.0, 1.0)
