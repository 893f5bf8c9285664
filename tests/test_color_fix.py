"""Colour fixes, checked against their defining properties on real photos."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from shared_data import shared_path
from faithdiff_pipeline import adain_color_fix, apply_color_fix, wavelet_color_fix
from faithdiff_pipeline.color_fix import wavelet_split


def _photo(name: str, size=(96, 64)) -> torch.Tensor:
    with PIL.Image.open(shared_path("samples") / name) as image:
        array = np.asarray(image.convert("RGB").resize(size), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def test_adain_transfers_channel_statistics() -> None:
    image, reference = _photo("astronaut.png"), _photo("coffee.png")
    fixed = adain_color_fix(image, reference)
    torch.testing.assert_close(fixed.mean(dim=(2, 3)), reference.mean(dim=(2, 3)), rtol=0, atol=1e-5)
    # unbiased std with 1e-5 added to both variances, as in the release
    expected = ((reference.flatten(2).var(2) + 1e-5) / (image.flatten(2).var(2) + 1e-5)).sqrt() * image.flatten(2).std(
        2
    )
    torch.testing.assert_close(fixed.flatten(2).std(2), expected, rtol=1e-4, atol=1e-5)


def test_wavelet_keeps_detail_and_takes_reference_low_band() -> None:
    image, reference = _photo("chelsea.png"), _photo("rocket.jpg")
    high, low = wavelet_split(image)
    torch.testing.assert_close(high + low, image, rtol=0, atol=1e-6)
    fixed = wavelet_color_fix(image, reference)
    torch.testing.assert_close(fixed - wavelet_split(reference)[1], high, rtol=0, atol=1e-6)
    assert (fixed - image).abs().mean() > 0.01


def test_fix_against_itself_is_identity_and_clamped() -> None:
    image = _photo("coffee.png")
    for method in ("adain", "wavelet"):
        torch.testing.assert_close(apply_color_fix(image, image, method), image, rtol=0, atol=1e-5)
    out = apply_color_fix(image * 3 - 1, image, "wavelet")
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="color_fix"):
        apply_color_fix(image, image, "histogram")
