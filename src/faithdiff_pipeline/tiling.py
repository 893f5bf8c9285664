"""Latent tiling as the FaithDiff release does it: overlapping tiles, Gaussian blending of their noise predictions."""

from __future__ import annotations

import math
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
    """

    height: int
    width: int
    tile_height: int
    tile_width: int
    stride: int

    @classmethod
    def for_latent(cls, height: int, width: int, tile: int, stride: int) -> "LatentTiling":
        return cls(height, width, min(tile, height), min(tile, width), stride)

    @cached_property
    def origins(self) -> list[tuple[int, int]]:
        """``(top, left)`` of every tile, row by row."""
        rows = tile_starts(self.height, self.tile_height, self.stride)
        cols = tile_starts(self.width, self.tile_width, self.stride)
        return [(top, left) for top in rows for left in cols]

    def __len__(self) -> int:
        return len(self.origins)

    def crop(self, tensor: torch.Tensor, indices: range | list[int]) -> torch.Tensor:
        """Tiles ``indices`` of ``tensor`` (``[B, C, height, width]``), stacked tile-major: ``[len(indices) * B, C, th, tw]``."""
        th, tw = self.tile_height, self.tile_width
        return torch.cat([tensor[..., top : top + th, left : left + tw] for top, left in (self.origins[i] for i in indices)])

    @cached_property
    def weights(self) -> torch.Tensor:
        return gaussian_weights(self.tile_height, self.tile_width)

    def weight_sum(self) -> torch.Tensor:
        """Sum of all tiles' weights over the latent, ``[height, width]`` (float64)."""
        total = torch.zeros(self.height, self.width, dtype=torch.float64)
        for top, left in self.origins:
            total[top : top + self.tile_height, left : left + self.tile_width] += self.weights
        return total

    def accumulate(self, total: torch.Tensor, tiles: torch.Tensor, indices: range | list[int]) -> None:
        """Adds the weighted ``tiles`` (tile-major, as returned by :meth:`crop`) into ``total`` in place."""
        weights = self.weights.to(device=tiles.device, dtype=total.dtype)
        per_tile = tiles.to(total.dtype).unflatten(0, (len(indices), -1))
        th, tw = self.tile_height, self.tile_width
        for tile, i in zip(per_tile, indices):
            top, left = self.origins[i]
            total[..., top : top + th, left : left + tw] += tile * weights
