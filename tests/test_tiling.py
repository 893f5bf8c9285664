"""Latent tiling: the release's tile layout and Gaussian blending."""

from __future__ import annotations

import math

import pytest
import torch

from faithdiff_pipeline.tiling import LatentTiling, default_latent_stride, gaussian_weights, tiled_encode


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
    torch.testing.assert_close(total / tiling.weight_sum.to(total), field, rtol=1e-6, atol=1e-6)


def test_crop_is_tile_major() -> None:
    tiling = LatentTiling.for_latent(8, 12, 8, 4)
    x = torch.arange(2 * 8 * 12, dtype=torch.float32).view(2, 1, 8, 12)
    tiles = tiling.crop(x, [0, 1])
    assert torch.equal(tiles[1], x[1, :, :, 0:8]) and torch.equal(tiles[2], x[0, :, :, 4:12])


@pytest.mark.parametrize(
    ("count", "max_tiles", "sizes"),
    [(9, 4, [3, 3, 3]), (6, 6, [6]), (7, 1, [1] * 7), (49, 4, [4] * 12 + [1]), (5, 8, [5])],
)
def test_batches_are_even_and_cover_every_tile_once(count: int, max_tiles: int, sizes: list[int]) -> None:
    tiling = LatentTiling.for_latent(8, 8 + 4 * (count - 1), 8, 4)
    assert len(tiling) == count
    batches = tiling.batches(max_tiles)
    assert [len(b) for b in batches] == sizes
    assert [i for b in batches for i in b] == list(range(count))


def _local_encoder(image: torch.Tensor) -> torch.Tensor:
    """A purely local 'encoder' (8x8 average pooling and a channel mix): tiling must not change its output at all."""
    pooled = torch.nn.functional.avg_pool2d(image, 8)
    return torch.cat([pooled, pooled.sum(dim=1, keepdim=True) ** 2], dim=1)


@pytest.mark.parametrize(("height", "width", "tile"), [(96, 160, 64), (64, 64, 32), (40, 200, 48), (72, 56, 64)])
def test_tiled_encode_is_exact_for_a_local_encoder(height: int, width: int, tile: int) -> None:
    image = torch.rand(2, 3, height, width)
    calls = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape[-2:]))
        return _local_encoder(x)

    tiled = tiled_encode(encode, image, tile, overlap=0.25)
    torch.testing.assert_close(tiled, _local_encoder(image), rtol=1e-6, atol=1e-6)
    assert len(calls) > 1 and all(h <= tile and w <= tile for h, w in calls)


def test_tiled_encode_blends_a_global_encoder_without_jumps() -> None:
    """With a non-local encoder (it subtracts the tile mean) tiles disagree; the ramps must make the transition
    gradual: no step between neighbouring columns larger than the steps inside the untiled output."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 3, 256), indexing="ij")
    image = torch.stack([x, y, x * y])[None]

    def encode(tile: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(tile, 8)
        return pooled - pooled.mean(dim=(2, 3), keepdim=True)

    tiled = tiled_encode(encode, image, 64, overlap=0.5)
    column_steps = tiled.diff(dim=-1).abs().amax(dim=(0, 1, 2))
    reference_steps = encode(image).diff(dim=-1).abs().amax()
    assert column_steps.max() <= 1.5 * reference_steps


def test_image_within_one_tile_is_encoded_whole() -> None:
    image = torch.rand(1, 3, 64, 48)
    calls = []
    tiled_encode(lambda x: calls.append(x.shape) or _local_encoder(x), image, 64)
    assert calls == [image.shape]
