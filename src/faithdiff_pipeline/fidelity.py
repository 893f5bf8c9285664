"""Where a restoration departs from its input: consistency with the low-quality image, detail the input does not
carry, and the spread across seeds (see ``docs/fidelity.md``).

A super-resolution result ``R`` of a low-quality input ``L`` is ``L``'s size times the scale (not necessarily an
integer multiple). Three measures are made, all on float RGB in [0, 1]:

* **Consistency** (LR-PSNR, LR-SSIM, an error map): ``R`` reduced to ``L``'s size with PIL's LANCZOS filter (Lanczos,
  a = 3, its support widened by the reduction factor, so anti-aliased) and compared with ``L`` by the evaluation
  harness's :func:`~faithdiff_pipeline.evaluation.metrics.psnr` and :func:`~faithdiff_pipeline.evaluation.metrics.ssim`.
  A faithful restoration, seen at the input's resolution, is the input.
* **Added detail** (a map and a share): where ``R`` holds more fine detail than ``U``, the LANCZOS upscale of ``L``
  to ``R``'s size (what the pipeline starts from). Fine detail is the local RMS of a high-pass band, measured at the
  scale of one input pixel.
* **Seed spread** (a map and its mean): the per-pixel standard deviation across restorations of ``L`` made with
  different seeds: what the model draws rather than reads from the input.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import torch
import torch.nn.functional as F

from .checks import is_real
from .evaluation.metrics import psnr, reduce_to, ssim
from .image_io import check_unit_range, save_image, save_result
from .preprocessing import resize_float

if TYPE_CHECKING:
    from .pipeline_faithdiff_sdxl import FaithDiffSDXLPipeline

# The reduction filter of the consistency measure, and the upscale the added detail is measured against.
DOWNSCALE_FILTER = "lanczos"
# Local RMS of the high-pass band, in units of the [0, 1] sample range, that makes 1 in the added-detail map: 0.05 is
# about 13 8-bit levels, a strong fine texture (the sample photos' true detail over their x2 LANCZOS upscale reaches it
# in at most 5 % of their pixels).
DETAIL_FULL_SCALE = 0.05
# A pixel counts towards `added_detail_share` above this value of the map: a local RMS excess of 0.01 of the range,
# about 2.5 8-bit levels (visible), about ten times the 8-bit rounding noise of an upscale.
DEFAULT_DETAIL_THRESHOLD = 0.2
# Widths of the added-detail measure, in input pixels: the high-pass subtracts a blur of sigma half an input pixel,
# keeping what is finer than the input's pixels, and its energy is averaged over a window of sigma 0.75 input pixel:
# wide enough for a steady map, narrow enough that a patch's map overruns its edges by only 2-3 result pixels at x2.
_HIGH_PASS_SIGMA = 0.5
_WINDOW_SIGMA = 0.75
# What 1 (full red) means in the heat maps: an error or a spread of 0.1 of the sample range (about 26 8-bit levels);
# the added-detail map is already normalised.
HEAT_FULL_SCALE = {"consistency": 0.1, "added_detail": 1.0, "spread": 0.1}
MAP_NAMES = tuple(HEAT_FULL_SCALE)
# What a map's values are, stored in its files (a raw map's sample is the value x 65535).
MAP_VALUES = {
    "consistency": "absolute error of the reduced result against the input, mean of the channels, 1 = full range",
    "added_detail": f"local RMS fine detail of the result above the upscaled input's, 1 = {DETAIL_FULL_SCALE}",
    "spread": "standard deviation across seeds, mean of the channels, 1 = full range",
}


@dataclass(frozen=True)
class FidelityReport:
    """The fidelity of one restored image to its low-quality input (see :func:`measure_fidelity`).

    Attributes:
        lr_psnr: PSNR in dB of the result reduced to the input's size against the input (``inf`` when they are equal).
        lr_ssim: SSIM of the same pair, with the evaluation harness's conventions.
        added_detail_share: The fraction of the result's pixels whose ``added_detail_map`` exceeds
            ``detail_threshold``.
        spread_mean: The mean of ``spread_map``, or ``None`` without restorations from several seeds.
        consistency_map: ``[h, w]`` float32 at the input's size: the absolute difference between the reduced result and
            the input, averaged over the three channels, in [0, 1].
        consistency_map_upsampled: ``consistency_map`` resized (bilinear) to the result's ``[H, W]``, for display.
        added_detail_map: ``[H, W]`` float32 in [0, 1]: the local RMS of the result's high-pass band minus the
            upscaled input's, divided by :data:`DETAIL_FULL_SCALE` and clipped to [0, 1] (0 where the result has no
            more fine detail than the upscale; 1 for an excess of 0.05 of the sample range or more).
        spread_map: ``[H, W]`` float32: the standard deviation across seeds of each sample, averaged over the channels
            (in [0, 0.5]), or ``None``.
        detail_threshold: The threshold ``added_detail_share`` was counted with.
        seed_count: How many restorations ``spread_map`` was measured on (0 without).
    """

    lr_psnr: float
    lr_ssim: float
    added_detail_share: float
    spread_mean: float | None
    consistency_map: np.ndarray
    consistency_map_upsampled: np.ndarray
    added_detail_map: np.ndarray
    spread_map: np.ndarray | None
    detail_threshold: float = DEFAULT_DETAIL_THRESHOLD
    seed_count: int = 0

    def as_metadata(self) -> dict[str, Any]:
        """The numbers as a JSON-able dict, for a result's metadata and a job's summary.

        Scores are rounded to 4 decimals. An infinite LR-PSNR (the reduced result equals the input) is the string
        ``"inf"``, which ``float()`` reads back, since JSON has no infinity. ``spread_mean`` and ``seed_count`` are
        present only when the spread was measured.
        """
        metadata: dict[str, Any] = {
            "lr_psnr": round(self.lr_psnr, 4) if math.isfinite(self.lr_psnr) else "inf",
            "lr_ssim": round(self.lr_ssim, 4),
            "added_detail_share": round(self.added_detail_share, 4),
            "detail_threshold": self.detail_threshold,
            "downscale_filter": DOWNSCALE_FILTER,
        }
        if self.spread_mean is not None:
            metadata.update(spread_mean=round(self.spread_mean, 6), seed_count=self.seed_count)
        return metadata

    def maps(self) -> dict[str, np.ndarray]:
        """The maps at the result's size, by name (``"consistency"``, ``"added_detail"`` and, when measured,
        ``"spread"``), as :func:`save_fidelity_maps` writes them."""
        maps = {"consistency": self.consistency_map_upsampled, "added_detail": self.added_detail_map}
        if self.spread_map is not None:
            maps["spread"] = self.spread_map
        return maps


def measure_fidelity(
    result: np.ndarray | PIL.Image.Image,
    low_quality: np.ndarray | PIL.Image.Image,
    *,
    seeds_results: Sequence[np.ndarray | PIL.Image.Image] | None = None,
    detail_threshold: float = DEFAULT_DETAIL_THRESHOLD,
) -> FidelityReport:
    """Measures how faithful a restoration is to its low-quality input: consistency, added detail and, given
    restorations from several seeds, their spread (see the module docstring and ``docs/fidelity.md``).

    Consistency cannot see what lies below the input's resolution: a result that invents fine detail can still be
    perfectly consistent. The added-detail map shows where such detail is; the seed spread shows only what changes
    with the seed, not what the model invents the same way every time.

    Args:
        result: The restored image: float ``[H, W, 3]`` in [0, 1] (the pipeline's ``output_type="np"``) or an RGB PIL
            image, at least the input's size in each direction, the two scales agreeing up to rounding.
        low_quality: The input it was restored from, float ``[h, w, 3]`` in [0, 1] or an RGB PIL image (in sRGB, as
            the pipeline took it: ``ImageFile.as_float()``), at least 11 x 11 pixels (SSIM's window).
        seeds_results: Restorations of the same input with different seeds, each like ``result`` and of its size (at
            least two; ``result`` itself may be one of them), e.g. from :func:`restore_with_seeds`; ``None`` skips the
            spread.
        detail_threshold: The value of the added-detail map above which a pixel counts towards
            ``added_detail_share``, in (0, 1).

    Returns:
        A :class:`FidelityReport`.
    """
    restored = _rgb(result, "result")
    source = _rgb(low_quality, "low_quality")
    _check_sizes(restored.shape[:2], source.shape[:2])
    if not is_real(detail_threshold) or not 0.0 < detail_threshold < 1.0:
        raise ValueError(f"`detail_threshold` must be a number in (0, 1), got {detail_threshold!r}.")
    spread_map = None
    if seeds_results is not None:
        spread_map = seed_spread(seeds_results, expected_shape=restored.shape)

    pair = reduce_to(_batch(restored), _batch(source)), _batch(source)
    error = (pair[0] - pair[1]).abs().mean(dim=1)[0].numpy()
    detail = added_detail(restored, source)
    return FidelityReport(
        lr_psnr=float(psnr(*pair)[0]),
        lr_ssim=float(ssim(*pair)[0]),
        added_detail_share=float((detail > detail_threshold).mean()),
        spread_mean=None if spread_map is None else float(spread_map.mean(dtype=np.float64)),
        consistency_map=error.astype(np.float32),
        consistency_map_upsampled=resize_float(error, restored.shape[:2], PIL.Image.BILINEAR),
        added_detail_map=detail,
        spread_map=spread_map,
        detail_threshold=float(detail_threshold),
        seed_count=0 if seeds_results is None else len(seeds_results),
    )


def added_detail(result: np.ndarray, low_quality: np.ndarray) -> np.ndarray:
    """The added-detail map of ``result`` (float ``[H, W, 3]``) over ``low_quality`` (float ``[h, w, 3]``), both in
    [0, 1]: ``clip((rms(R) - rms(U)) / DETAIL_FULL_SCALE, 0, 1)``, ``[H, W]`` float32.

    ``U`` is ``low_quality`` upscaled to the result's size with LANCZOS (as the pipeline upscales it). ``rms(X)`` is
    the local RMS of ``X``'s fine band: ``X - G(X)``, ``G`` a Gaussian blur of sigma half an input pixel (so what is
    left is finer than the input's pixels), squared, averaged over the channels and over a Gaussian window of sigma
    0.75 input pixel, square-rooted. Where the result is smoother than the upscale (noise removed), the map is 0.
    """
    scale = result.shape[1] / low_quality.shape[1]
    upscaled = resize_float(low_quality, result.shape[:2])
    # One image at a time: at 4096 x 4096 each of these float32 stacks is 200 MB.
    result_rms, upscaled_rms = (_fine_band_rms(image, scale) for image in (result, upscaled))
    return ((result_rms - upscaled_rms) / DETAIL_FULL_SCALE).clamp(0.0, 1.0).numpy()


def _fine_band_rms(image: np.ndarray, scale: float) -> torch.Tensor:
    """The local RMS of the fine band of ``image`` (``[H, W, 3]``), as :func:`added_detail` defines it: ``[H, W]``."""
    planes = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    band = planes - _gaussian_blur(planes, _HIGH_PASS_SIGMA * scale)
    energy = _gaussian_blur(band.pow(2).mean(dim=1, keepdim=True), _WINDOW_SIGMA * scale)
    # A blur of non-negative values can round a hair below 0.
    return energy[0, 0].clamp_min(0.0).sqrt()


def seed_spread(
    seeds_results: Sequence[np.ndarray | PIL.Image.Image], expected_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """The per-pixel spread of restorations made with different seeds: the standard deviation (over the
    restorations, not their sample's estimate: divided by N) of each sample, averaged over the channels.

    Args:
        seeds_results: At least two restorations of the same input, float ``[H, W, 3]`` in [0, 1] or RGB PIL images,
            all of one size.
        expected_shape: The ``[H, W, 3]`` they must have (the result's), or ``None``.

    Returns:
        ``[H, W]`` float32 in [0, 0.5]; 0 where every seed gives the same value.
    """
    if isinstance(seeds_results, (np.ndarray, PIL.Image.Image, str, bytes)) or not isinstance(seeds_results, Sequence):
        raise TypeError(
            f"`seeds_results` must be a list of restored images, got {type(seeds_results).__name__}; an array of "
            "several images is passed as list(array)."
        )
    if len(seeds_results) < 2:
        raise ValueError(f"`seeds_results` must hold at least 2 restorations to spread, got {len(seeds_results)}.")
    images = [_rgb(image, f"seeds_results[{index}]") for index, image in enumerate(seeds_results)]
    shape = expected_shape or images[0].shape
    for index, image in enumerate(images):
        if image.shape != tuple(shape):
            raise ValueError(
                f"`seeds_results[{index}]` has shape {image.shape}; every restoration must have the result's shape "
                f"{tuple(shape)}."
            )
    # Two passes over the images with float64 sums instead of one stack of them all (1.6 GB for four 4096 x 4096
    # results); the mean of equal float32 values is exact, so where every seed agrees the spread is exactly 0.
    mean = sum(image.astype(np.float64) for image in images) / len(images)
    variance = sum(np.square(image - mean) for image in images) / len(images)
    return np.sqrt(variance).mean(axis=-1).astype(np.float32)


def restore_with_seeds(
    pipeline: FaithDiffSDXLPipeline,
    image: Any,
    seeds: Sequence[int],
    **call_arguments: Any,
) -> list[np.ndarray]:
    """Restores ``image`` once per seed, each with its own ``torch.Generator("cpu").manual_seed(seed)``, for
    :func:`measure_fidelity`'s ``seeds_results``.

    This costs one full restoration per seed: N seeds take N times the time of one restoration. The first seed's
    restoration is the one ``pipeline(image, generator=torch.Generator("cpu").manual_seed(seeds[0]), ...)`` gives,
    so a caller can keep it as its result instead of restoring once more.

    Args:
        pipeline: The pipeline to restore with (or any callable with the pipeline's ``image``, ``generator`` and
            ``output_type`` arguments).
        image: The low-quality input, in any form the pipeline takes (one image, not a batch).
        seeds: At least two distinct integer seeds, e.g. ``range(42, 46)``.
        call_arguments: The other arguments of every call (``prompt``, ``upscale``, ``num_inference_steps``, ...);
            not ``generator``, ``latents``, ``output_type`` or ``num_images_per_prompt``, which this function sets.

    Returns:
        One float32 ``[H, W, 3]`` array in [0, 1] per seed, in the order of ``seeds``.
    """
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"`seeds` must be a sequence of integers such as range(42, 46), got {type(seeds).__name__}.")
    seeds = list(seeds)
    integers = all(isinstance(seed, numbers.Integral) and not isinstance(seed, bool) for seed in seeds)
    if len(seeds) < 2 or not integers or len(set(seeds)) != len(seeds):
        raise ValueError(f"`seeds` must be at least 2 distinct integers, got {seeds!r}.")
    taken = sorted({"generator", "latents", "output_type", "num_images_per_prompt"} & set(call_arguments))
    if taken:
        raise TypeError(
            f"`{taken[0]}` is set by restore_with_seeds (one generator per seed, output_type='np', one image per "
            "call); leave it out of the call arguments."
        )
    restorations = []
    for seed in seeds:
        output = pipeline(
            image,
            generator=torch.Generator("cpu").manual_seed(int(seed)),
            output_type="np",
            num_images_per_prompt=1,
            **call_arguments,
        )
        images = output.images if hasattr(output, "images") else output[0]
        if len(images) != 1:
            raise ValueError(f"`image` must be one image, not a batch; the pipeline returned {len(images)} images.")
        restorations.append(np.asarray(images[0], dtype=np.float32))
    return restorations


# ---------------------------------------------------------------------------------------------------------- writing


def fidelity_heat_map(
    result: np.ndarray | PIL.Image.Image, values: np.ndarray, full_scale: float = 1.0, opacity: float = 0.75
) -> np.ndarray:
    """A map laid over the result, readable by eye: the result in grey, coloured with the "jet" colours of
    :func:`faithdiff_pipeline.attention_maps.heat_colours` (blue, cyan, yellow, red, dark red for ``full_scale`` or
    more), each pixel's colour the more opaque the higher its value, so that the photo shows where the map is 0.

    Args:
        result: The restored image, float ``[H, W, 3]`` in [0, 1] or an RGB PIL image.
        values: ``[H, W]`` map at the result's size, e.g. one of :meth:`FidelityReport.maps`.
        full_scale: The value shown as full red: :data:`HEAT_FULL_SCALE` holds the ones :func:`save_fidelity_maps`
            uses (0.1 for the consistency error and the spread, 1 for the added detail).
        opacity: The colour's weight at full scale, from 0 (the grey image alone) to 1; a value ``v`` of the map is
            coloured with weight ``opacity * sqrt(v / full_scale)``, which shows small values too.

    Returns:
        ``[H, W, 3]`` float32 in [0, 1].
    """
    # Imported here: the attention-map module imports diffusers, which measuring fidelity does not need.
    from .attention_maps import heat_colours

    image = _rgb(result, "result")
    heat = np.asarray(values, dtype=np.float32)
    if heat.shape != image.shape[:2]:
        raise ValueError(f"`values` must be [H, W] = {image.shape[:2]} like `result`, got shape {heat.shape}.")
    if not is_real(full_scale) or full_scale <= 0:
        raise ValueError(f"`full_scale` must be a number > 0, got {full_scale!r}.")
    if not is_real(opacity) or not 0.0 <= opacity <= 1.0:
        raise ValueError(f"`opacity` must be a number from 0 to 1, got {opacity!r}.")
    level = np.clip(np.nan_to_num(heat) / full_scale, 0.0, 1.0)
    # Grey, and kept off pure black and white, so that no colour of the scale is lost in the photo's own colours.
    grey = 0.1 + 0.8 * image.mean(axis=-1, keepdims=True)
    weight = (opacity * np.sqrt(level))[..., None]
    return ((1.0 - weight) * grey + weight * heat_colours(level)).astype(np.float32)


def save_heat_map(
    result: np.ndarray | PIL.Image.Image,
    values: np.ndarray,
    target: str | os.PathLike,
    full_scale: float = 1.0,
    opacity: float = 0.75,
    text: Mapping[str, str] | None = None,
) -> Path:
    """Writes :func:`fidelity_heat_map` as an 8-bit sRGB PNG (by ``image_io.save_result``, atomically).

    Args:
        result, values, full_scale, opacity: As for :func:`fidelity_heat_map`.
        target: The ``.png`` file to write.
        text: Parameters stored with the image (PNG text chunks), as ``save_result`` stores a result's.
    """
    _check_png(target)
    return save_result(fidelity_heat_map(result, values, full_scale, opacity), target, text=text)


def save_raw_map(values: np.ndarray, target: str | os.PathLike, text: Mapping[str, str] | None = None) -> Path:
    """Writes a map as a 16-bit greyscale PNG (by ``image_io.save_image``, atomically): sample = round(value x 65535),
    so the map's values in [0, 1] are kept to 1/65535 (values outside are clipped).

    Args:
        values: ``[H, W]`` map, e.g. one of :meth:`FidelityReport.maps`.
        target: The ``.png`` file to write.
        text: PNG text chunks to store beside it (what the map is, its units).
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"`values` must be an [H, W] map, got shape {array.shape}.")
    _check_png(target)
    samples = (np.nan_to_num(array).clip(0.0, 1.0) * 65535.0).round().astype("<u2")
    return save_image(PIL.Image.fromarray(samples), target, text=dict(text or {}))


def fidelity_map_paths(result_path: str | os.PathLike, spread: bool = False, raw: bool = False) -> dict[str, Path]:
    """Where :func:`save_fidelity_maps` writes the maps of the result at ``result_path``: beside it,
    ``NAME_consistency.png``, ``NAME_added_detail.png`` and, with ``spread``, ``NAME_spread.png`` (heat maps); with
    ``raw``, also ``NAME_consistency_raw.png``, ... (16-bit greyscale). Keys: the map name, ``+ "_raw"`` for raw ones.

    Args:
        result_path: The restored image's file.
        spread: Whether the spread map is written (restorations from several seeds were measured).
        raw: Whether the 16-bit raw maps are written too.
    """
    result_path = Path(result_path)
    names = [name for name in MAP_NAMES if spread or name != "spread"]
    paths = {name: result_path.with_name(f"{result_path.stem}_{name}.png") for name in names}
    if raw:
        paths.update({f"{name}_raw": result_path.with_name(f"{result_path.stem}_{name}_raw.png") for name in names})
    return paths


def save_fidelity_maps(
    report: FidelityReport,
    result: np.ndarray | PIL.Image.Image,
    result_path: str | os.PathLike,
    raw: bool = False,
    text: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Writes the maps of ``report`` beside the result, at :func:`fidelity_map_paths`: heat maps over the result
    (full red at :data:`HEAT_FULL_SCALE`) and, with ``raw``, the maps themselves as 16-bit greyscale.

    Args:
        report: The result's :class:`FidelityReport`.
        result: The restored image the report measured (float ``[H, W, 3]`` in [0, 1] or an RGB PIL image).
        result_path: The result's file; the maps are named after it.
        raw: Also write the raw 16-bit maps.
        text: Parameters stored in every map file (e.g. the result's), beside the map's name.

    Returns:
        The paths written, by the keys of :func:`fidelity_map_paths`.
    """
    if not isinstance(report, FidelityReport):
        raise TypeError(f"`report` must be a FidelityReport (from measure_fidelity), got {type(report).__name__}.")
    maps = report.maps()
    paths = fidelity_map_paths(result_path, spread="spread" in maps, raw=raw)
    for name, values in maps.items():
        about = {**(text or {}), "fidelity_map": name, "fidelity_map_values": MAP_VALUES[name]}
        save_heat_map(result, values, paths[name], HEAT_FULL_SCALE[name], text=about)
        if raw:
            save_raw_map(values, paths[f"{name}_raw"], text=about)
    return paths


# ---------------------------------------------------------------------------------------------------------- helpers


def _rgb(image: Any, name: str) -> np.ndarray:
    """``image`` as float32 ``[H, W, 3]`` in [0, 1], or an error naming ``name``."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"`{name}` must be a float [H, W, 3] array in [0, 1] or a PIL image, got {type(image).__name__}."
        )
    if image.ndim != 3 or image.shape[-1] != 3 or not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"`{name}` must be a float [H, W, 3] array in [0, 1], got {image.dtype} of shape {image.shape}."
        )
    check_unit_range(image, f"`{name}`")
    return image.astype(np.float32, copy=False)


def _check_sizes(result: tuple[int, int], source: tuple[int, int]) -> None:
    """The result must be the input scaled by one factor (each side rounded), never smaller."""
    (height, width), (low_height, low_width) = result, source
    if min(low_height, low_width) < 11:
        raise ValueError(
            f"`low_quality` is {low_width}x{low_height} pixels; LR-SSIM needs at least 11x11 (its window)."
        )
    # One factor must fit both sides, with either image's sides rounded: the result upscaled from the input (the
    # pipeline's), or the input reduced from a larger image (an evaluation set's).
    lowest = max((height - 0.5) / (low_height + 0.5), (width - 0.5) / (low_width + 0.5))
    highest = min((height + 0.5) / (low_height - 0.5), (width + 0.5) / (low_width - 0.5))
    if height < low_height or width < low_width or lowest > highest:
        raise ValueError(
            f"`result` is {width}x{height} pixels; expected `low_quality` ({low_width}x{low_height}) upscaled by one "
            "factor >= 1 (each side rounded)."
        )


def _check_png(target: str | os.PathLike) -> None:
    if Path(target).suffix.lower() != ".png":
        raise ValueError(f"`target` {os.fspath(target)!r} must end in .png: the maps are written as PNG.")


def _batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of ``[B, C, H, W]`` (edges replicated), each channel on its own."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-offsets.pow(2) / (2.0 * sigma**2))
    kernel = kernel / kernel.sum()
    batch, channels, height, width = images.shape
    planes = images.reshape(batch * channels, 1, height, width)
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return planes.reshape(batch, channels, height, width)
