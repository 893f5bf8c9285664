"""Latent tiling: the release's tile layout and Gaussian blending."""

from __future__ import annotations

import math

import pytest
import torch

from faithdiff_pipeline.tiling import LatentTiling, default_latent_stride, gaussian_weights


def _release_starts(length: int, kernel: int, overlap: float) -> list[int]:
    """The release's while-loop, restated: step by ceil(k * overlap) and snap the last tile to the edge."""
    k = min(kernel, length)
    step = k if (length - 1) // k + 1 == 1 else math.ceil(k * overlap)
    starts, i = [], 0
    while i < length:
        if i + k >= length:
            starts.append(length - k)
            break
        starts.append(i)
        i += step
    return starts


@pytest.mark.parametrize("length", [5, 8, 12, 16, 17, 31, 64, 128, 129, 300])
@pytest.mark.parametrize("kernel", [8, 16, 128])
def test_tile_origins_follow_the_release(length: int, kernel: int) -> None:
    tiling = LatentTiling.for_latent(length, 7, kernel, default_latent_stride(kernel))
    assert sorted({top for top, _ in tiling.origins}) == _release_starts(length, kernel, 0.5)


def test_six_tile_layout() -> None:
    tiling = LatentTiling.for_latent(12, 16, 8, 4)
    assert tiling.origins == [(0, 0), (0, 4), (0, 8), (4, 0), (4, 4), (4, 8)]


def test_gaussian_weights_centres() -> None:
    weights = gaussian_weights(8, 7)
    assert weights.shape == (8, 7)
    assert torch.argmax(weights[4]).item() == 3  # horizontal centre (w - 1) / 2
    assert torch.argmax(weights[:, 3]).item() == 4  # vertical centre h / 2, as in the release
    assert math.isclose(weights[4, 3].item(), 1.0)


def test_blending_identical_predictions_reproduces_them() -> None:
    tiling = LatentTiling.for_latent(13, 19, 8, 3)
    field = torch.randn(2, 4, 13, 19)
    total = torch.zeros_like(field)
    indices = range(len(tiling))
    tiling.accumulate(total, tiling.crop(field, indices), indices)
    torch.testing.assert_close(total / tiling.weight_sum().to(total), field, rtol=1e-6, atol=1e-6)


def test_crop_is_tile_major() -> None:
    tiling = LatentTiling.for_latent(8, 12, 8, 4)
    x = torch.arange(2 * 8 * 12, dtype=torch.float32).view(2, 1, 8, 12)
    tiles = tiling.crop(x, [0, 1])
    assert torch.equal(tiles[1], x[1, :, :, 0:8]) and torch.equal(tiles[2], x[0, :, :, 4:12])
