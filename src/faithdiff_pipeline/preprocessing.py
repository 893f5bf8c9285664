"""Preparing the low-quality input as the FaithDiff release does: LANCZOS upscale, then edge padding to a multiple of 8."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import PIL.Image
import torch

from .checks import is_real
from .image_io import DEFAULT_MAX_OUTPUT_PIXELS, ImageFile, check_unit_range, from_pil, read_image

LQImage = Union[PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike, ImageFile]


@dataclass
class PreparedImages:
    """The batch of LQ inputs, upscaled.

    Attributes:
        reference: upscaled images in [0, 1], ``[B, 3, height, width]`` (float32): the colour-fix reference.
        padded: the same, edge-padded at the bottom/right to a multiple of ``multiple`` (and to the model's
            smallest side) and scaled to [-1, 1].
    """

    reference: torch.Tensor
    padded: torch.Tensor

    @property
    def size(self) -> tuple[int, int]:
        """Output ``(height, width)`` before padding."""
        return tuple(self.reference.shape[-2:])


def _as_hwc(item: LQImage, index: int) -> PIL.Image.Image | np.ndarray:
    """A PIL RGB image (8-bit input) or a float32 ``[H, W, 3]`` array in [0, 1] (16-bit or floating-point input).

    Files and PIL images go through :mod:`~faithdiff_pipeline.image_io`: upright, in sRGB, 16-bit kept, the colour
    under transparent pixels replaced by their surroundings'. An :class:`~faithdiff_pipeline.image_io.ImageFile`
    has been read so already and is taken as it is."""
    if isinstance(item, (str, os.PathLike)):
        try:
            return read_image(item).pipeline_input()
        except ValueError as error:
            raise ValueError(f"`image` {error}") from error
    if isinstance(item, ImageFile):
        return item.pipeline_input()
    if isinstance(item, PIL.Image.Image):
        return from_pil(item).pipeline_input()
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] not in (1, 3):
            raise ValueError(f"`image[{index}]` tensor must be [3, H, W] (or [1, H, W]), got {tuple(item.shape)}.")
        item = item.detach().cpu().movedim(0, -1).numpy()
    if not isinstance(item, np.ndarray):
        raise TypeError(
            f"`image[{index}]` must be a PIL image, a numpy array, a torch tensor or a path, got {type(item).__name__}."
        )
    array = item[..., None] if item.ndim == 2 else item
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"`image[{index}]` array must be [H, W, 3] (or [H, W]), got {item.shape}.")
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array
    if array.dtype == np.uint8:
        return PIL.Image.fromarray(np.ascontiguousarray(array))
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(
            f"`image[{index}]` must be uint8, uint16 or floating point in [0, 1], got dtype {array.dtype}."
        )
    array = array.astype(np.float32)
    check_unit_range(array, f"`image[{index}]`")
    return array


def _size_of(image: PIL.Image.Image | np.ndarray) -> tuple[int, int]:
    return (image.height, image.width) if isinstance(image, PIL.Image.Image) else image.shape[:2]


def _upscale(image: PIL.Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """LANCZOS resize to ``size`` = (height, width); returns float32 ``[H, W, 3]`` in [0, 1]."""
    height, width = size
    if isinstance(image, PIL.Image.Image):
        resized = image if image.size == (width, height) else image.resize((width, height), PIL.Image.LANCZOS)
        return np.asarray(resized, dtype=np.float32) / 255.0
    if image.shape[:2] == (height, width):
        return image
    return resize_float(image, size)


def resize_float(
    image: np.ndarray, size: tuple[int, int], resample: PIL.Image.Resampling = PIL.Image.LANCZOS
) -> np.ndarray:
    """Resizes float samples in [0, 1] with a PIL filter, without quantising them, and clips the result to [0, 1].

    PIL widens the filter's support by the reduction factor when it shrinks an image, so a LANCZOS (or BICUBIC)
    reduction is anti-aliased: a proper low-pass filter at the new size's Nyquist frequency. The input's LANCZOS
    upscale is this function with ``resample=LANCZOS``.

    Args:
        image: ``[H, W]`` or ``[H, W, C]`` float samples in [0, 1].
        size: The new ``(height, width)``.
        resample: A ``PIL.Image`` resampling filter.

    Returns:
        float32 ``[height, width]`` or ``[height, width, C]`` in [0, 1].
    """
    height, width = size
    array = np.asarray(image, dtype=np.float32)
    planes = array[..., None] if array.ndim == 2 else array
    # Each channel in PIL's 32-bit float mode: nothing is quantised to 8 bits.
    channels = [
        np.asarray(PIL.Image.fromarray(np.ascontiguousarray(planes[..., c])).resize((width, height), resample))
        for c in range(planes.shape[-1])
    ]
    # LANCZOS overshoots at edges; the 8-bit path clips the same way when PIL rounds.
    resized = np.stack(channels, axis=-1).clip(0.0, 1.0)
    return resized[..., 0] if array.ndim == 2 else resized


def as_image_list(image: LQImage | Sequence[LQImage]) -> list[LQImage]:
    """One LQ input or a batch, in every form diffusers' ``VaeImageProcessor`` takes for one: a 4-D array
    ``[B, H, W, C]`` or tensor ``[B, C, H, W]``, or a list of images, of 3-D arrays/tensors, or of 4-D ones (each a
    batch of its own, in order)."""
    if isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 4:
        return list(image)
    if not isinstance(image, (list, tuple)):
        return [image]
    items: list[LQImage] = []
    for item in image:
        batched = isinstance(item, (torch.Tensor, np.ndarray)) and item.ndim == 4
        items += list(item) if batched else [item]
    return items


def check_upscale(upscale: object) -> float:
    """``upscale`` as a float: any real number type (numpy's too), finite and > 0."""
    if not is_real(upscale) or upscale <= 0:
        raise ValueError(f"`upscale` must be a number > 0, got {upscale!r} (a finite real number).")
    return float(upscale)


def prepare_lq_images(
    image: LQImage | Sequence[LQImage],
    upscale: float,
    multiple: int = 8,
    min_size: int = 1,
    max_pixels: int | None = DEFAULT_MAX_OUTPUT_PIXELS,
) -> PreparedImages:
    """Upscales each LQ image by ``upscale`` with LANCZOS and pads it by edge replication to a multiple of
    ``multiple``, and to at least ``min_size`` pixels a side: the smallest image the model runs on. The pipeline crops
    the padding away again, so a result smaller than the model's minimum (a 7x13 icon) keeps its size.

    All images of a batch must have the same size after upscaling. A result of more than ``max_pixels`` pixels
    (``None``: no limit) is refused before anything is allocated.
    """
    upscale = check_upscale(upscale)
    items = [_as_hwc(item, i) for i, item in enumerate(as_image_list(image))]
    if not items:
        raise ValueError("`image` is an empty list; pass at least one image.")
    sizes = []
    for i, item in enumerate(items):
        height, width = _size_of(item)
        size = (round(height * upscale), round(width * upscale))
        if min(height, width) == 0 or min(size) == 0:
            raise ValueError(f"`image[{i}]` is empty or too small: {height}x{width} pixels, upscaled to {size}.")
        if max_pixels is not None and size[0] * size[1] > max_pixels:
            raise ValueError(
                f"`image[{i}]` ({width}x{height} pixels) upscaled by {upscale:g} gives {size[1]}x{size[0]} = "
                f"{size[0] * size[1]} pixels, more than `max_output_pixels` ({max_pixels}); lower `upscale` or raise "
                "`max_output_pixels`."
            )
        sizes.append(size)
    if len(set(sizes)) > 1:
        raise ValueError(
            f"All images of a batch must have the same size after upscaling; got sizes {sorted(set(sizes))}."
        )
    upscaled = [_upscale(item, size) for item, size in zip(items, sizes)]
    reference = torch.from_numpy(np.stack(upscaled)).permute(0, 3, 1, 2).contiguous()
    height, width = reference.shape[-2:]
    smallest = min_size + -min_size % multiple
    pad = (0, max(width + -width % multiple, smallest) - width, 0, max(height + -height % multiple, smallest) - height)
    padded = torch.nn.functional.pad(reference, pad, mode="replicate") if any(pad) else reference
    return PreparedImages(reference=reference, padded=padded * 2.0 - 1.0)
