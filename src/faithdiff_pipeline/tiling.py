"""Tiling: the release's overlapping latent tiles with Gaussian blending of their noise predictions, and image tiles
with linear blending that bound the LQ encoder's memory."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of the tiles along one axis of ``length``, the last one snapped to the edge.

    ``tile`` must already be clamped to ``length``; a single tile covers the axis when they are equal.
    """
    starts = list(range(0, max(length - tile, 0), stride))
    return starts + [length - tile]


def default_latent_stride(tile: int, overlap: float = 0.5) -> int:
    """The release's stride for a latent tile of ``tile``: ``ceil(tile * overlap)``."""
    return math.ceil(tile * overlap)


def gaussian_weights(tile_height: int, tile_width: int) -> torch.Tensor:
    """Blending weights of one tile, ``[tile_height, tile_width]`` (float64).

    The release centres the horizontal profile at ``(w - 1) / 2`` and the vertical one at ``h / 2``; both are kept,
    since they decide the blended result. The normalising constant cancels in the weighted mean and is left out.
    """
    x = torch.arange(tile_width, dtype=torch.float64)
    y = torch.arange(tile_height, dtype=torch.float64)
    gx = torch.exp(-((x - (tile_width - 1) / 2) ** 2) / tile_width**2 / 0.02)
    gy = torch.exp(-((y - tile_height / 2) ** 2) / tile_height**2 / 0.02)
    return torch.outer(gy, gx)


@dataclass(frozen=True)
class LatentTiling:
    """Overlapping tiles of a ``height`` x ``width`` latent, in latent units.

    Attributes:
        height, width: Latent size.
        tile_height, tile_width: Tile size, already clamped to the latent size.
        stride: Distance between tile starts on axes with more than one tile.
        device: Where the blending weights live: the latents' device, so that the denoising loop never copies from
            the host (a pageable host-to-device copy waits for all queued GPU work).
    """

    height: int
    width: int
    tile_height: int
    tile_width: int
    stride: int
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (a torch.device is immutable)

    @classmethod
    def for_latent(
        cls, height: int, width: int, tile: int, stride: int, device: torch.device | str = "cpu"
    ) -> LatentTiling:
        return cls(height, width, min(tile, height), min(tile, width), stride, torch.device(device))

    @cached_property
    def origins(self) -> list[tuple[int, int]]:
        """``(top, left)`` of every tile, row by row."""
        rows = tile_starts(self.height, self.tile_height, self.stride)
        cols = tile_starts(self.width, self.tile_width, self.stride)
        return [(top, left) for top in rows for left in cols]

    def __len__(self) -> int:
        return len(self.origins)

    def batches(self, max_tiles: int) -> list[range]:
        """Tile indices in consecutive groups of at most ``max_tiles``, as even as possible (so that a compiled UNet
        sees as few distinct batch sizes as possible)."""
        count = -(-len(self) // max_tiles)
        size = -(-len(self) // count)
        return [range(start, min(start + size, len(self))) for start in range(0, len(self), size)]

    def crop(self, tensor: torch.Tensor, indices: range | list[int]) -> torch.Tensor:
        """Tiles ``indices`` of ``tensor`` (``[B, C, height, width]``), stacked tile-major: ``[len(indices) * B, C, th, tw]``."""
        th, tw = self.tile_height, self.tile_width
        return torch.cat(
            [tensor[..., top : top + th, left : left + tw] for top, left in (self.origins[i] for i in indices)]
        )

    @cached_property
    def weights(self) -> torch.Tensor:
        """One tile's blending weights, float32 on ``device`` (computed in float64)."""
        return gaussian_weights(self.tile_height, self.tile_width).to(device=self.device, dtype=torch.float32)

    @cached_property
    def weight_sum(self) -> torch.Tensor:
        """Sum of all tiles' weights over the latent, ``[height, width]``, float32 on ``device``."""
        weights = gaussian_weights(self.tile_height, self.tile_width)
        total = torch.zeros(self.height, self.width, dtype=torch.float64)
        for top, left in self.origins:
            total[top : top + self.tile_height, left : left + self.tile_width] += weights
        return total.to(device=self.device, dtype=torch.float32)

    def accumulate(self, total: torch.Tensor, tiles: torch.Tensor, indices: range | list[int]) -> None:
        """Adds the weighted ``tiles`` (tile-major, as returned by :meth:`crop`) into ``total`` in place."""
        weights = self.weights.to(dtype=total.dtype)
        per_tile = tiles.to(total.dtype).unflatten(0, (len(indices), -1))
        th, tw = self.tile_height, self.tile_width
        for tile, i in zip(per_tile, indices):
            top, left = self.origins[i]
            total[..., top : top + th, left : left + tw] += tile * weights


def _edge_ramps(length: int, blend: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1-D weights: a linear ramp over ``blend`` samples at each end that meets a neighbouring tile, else 1."""
    weights = torch.ones(length, dtype=torch.float32)
    ramp = torch.arange(1, blend + 1, dtype=torch.float32) / (blend + 1)
    if ramp_start and blend:
        weights[:blend] = ramp
    if ramp_end and blend:
        weights[length - blend :] = ramp.flip(0)
    return weights


def tiled_encode(
    encode: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: int,
    overlap: float = 0.25,
    factor: int = 8,
) -> torch.Tensor:
    """Runs an image encoder (output at 1/``factor`` of the size) over overlapping ``tile``-pixel tiles and blends the
    outputs with linear ramps where tiles meet, so that memory stays bounded without visible seams.

    ``image`` sides must be multiples of ``factor``; ``tile`` is rounded down to one. An image no larger than one tile
    is encoded whole.
    """
    height, width = image.shape[-2:]
    tile = max(factor, tile - tile % factor)
    if height <= tile and width <= tile:
        return encode(image)
    stride = max(factor, tile - factor * int(tile * overlap / factor))
    blend = (tile - stride) // factor
    tile_h, tile_w = min(tile, height), min(tile, width)
    output, weight_sum = None, None
    for top in tile_starts(height, tile_h, stride):
        for left in tile_starts(width, tile_w, stride):
            features = encode(image[..., top : top + tile_h, left : left + tile_w])
            if output is None:
                output = features.new_zeros(
                    *features.shape[:2], height // factor, width // factor, dtype=torch.float32
                )
                weight_sum = torch.zeros(height // factor, width // factor, device=features.device)
            rows = _edge_ramps(features.shape[-2], blend, top > 0, top + tile_h < height).to(features.device)
            cols = _edge_ramps(features.shape[-1], blend, left > 0, left + tile_w < width).to(features.device)
            mask = torch.outer(rows, cols)
            y, x = top // factor, left // factor
            output[..., y : y + features.shape[-2], x : x + features.shape[-1]] += features.float() * mask
            weight_sum[y : y + features.shape[-2], x : x + features.shape[-1]] += mask
    return (output / weight_sum).to(features.dtype)
