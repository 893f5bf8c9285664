"""Batched JPEG compression in torch: every sample with its own quality, on whatever device the images are.

The steps are those of a baseline JFIF encoder and decoder (libjpeg's defaults): RGB -> YCbCr, 4:2:0 chroma
subsampling by 2x2 averaging, level shift, 8x8 DCT-II, quantisation with the standard tables of the JPEG
specification (Annex K) scaled by quality as the IJG library does, rounding, and the inverse of each step, with
the chroma upsampled by libjpeg's "fancy" triangle filter. Entropy coding is lossless and therefore skipped.
Unlike a real codec, the input and output are not rounded to 8 bits, so the function can sit inside a float
pipeline.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..checks import is_number

# Annex K.1 and K.2 of ITU-T T.81, in natural order: row = vertical frequency, column = horizontal frequency.
LUMA_QUANTIZATION_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_QUANTIZATION_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4

# JFIF (full-range BT.601) colour conversion.
_RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168735892, -0.331264108, 0.5),
    (0.5, -0.418687589, -0.081312411),
)
_YCBCR_TO_RGB = (
    (1.0, 0.0, 1.402),
    (1.0, -0.344136286, -0.714136286),
    (1.0, 1.772, 0.0),
)
_MCU = 16  # a 4:2:0 minimum coded unit covers 16x16 luma pixels


def _as_quality(quality: float | torch.Tensor, batch: int) -> torch.Tensor:
    if is_number(quality):
        quality = torch.full((batch,), float(quality), dtype=torch.float64)
    elif isinstance(quality, torch.Tensor):
        quality = quality.detach().to("cpu", torch.float64).reshape(-1)
        if quality.numel() == 1:
            quality = quality.expand(batch)
    else:
        raise TypeError(f"`quality` must be a number or a tensor, got {type(quality).__name__}.")
    if quality.numel() != batch:
        raise ValueError(f"`quality` must hold one value per image ({batch}), got {quality.numel()} values.")
    if not bool(((quality >= 1) & (quality <= 100)).all()):
        raise ValueError(f"`quality` must lie in [1, 100], got {quality.tolist()}.")
    return quality


def jpeg_quantization_tables(quality: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The luma and chroma quantisation tables for ``quality`` in [1, 100], each ``[N, 8, 8]`` float32.

    The IJG scaling: a percentage ``floor(5000 / q)`` below quality 50 and ``200 - 2 q`` from 50 on, applied with
    rounding and clamped to the baseline range [1, 255]; integer qualities give exactly libjpeg's (and Pillow's)
    tables. A fractional quality, as the degradation model draws, is scaled by the same formula.
    """
    quality = _as_quality(quality, 1 if not isinstance(quality, torch.Tensor) else max(quality.numel(), 1))
    # libjpeg divides 5000 by the quality in integer arithmetic; flooring keeps integer qualities bit-exact.
    percent = torch.where(quality < 50, torch.floor(5000.0 / quality), 200.0 - 2.0 * quality)[:, None, None]
    tables = []
    for base in (LUMA_QUANTIZATION_TABLE, CHROMA_QUANTIZATION_TABLE):
        scaled = torch.floor((torch.tensor(base, dtype=torch.float64) * percent + 50.0) / 100.0)
        tables.append(scaled.clamp(1.0, 255.0).to(torch.float32))
    return tables[0], tables[1]


def _dct_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The orthonormal 8-point DCT-II matrix; JPEG's 2-D DCT is ``D @ block @ D.T`` with it."""
    k = torch.arange(8, dtype=torch.float64)
    matrix = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    matrix[0] /= math.sqrt(2)
    return matrix.to(dtype=dtype, device=device)


def _quantize_planes(planes: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """DCT, quantise, dequantise and inverse DCT every 8x8 block of ``planes`` ``[B, C, H, W]``."""
    b, c, h, w = planes.shape
    dct = _dct_matrix(planes.dtype, planes.device)
    # kron(D, D) maps a row-major flattened block to its flattened 2-D DCT, so one GEMM transforms every block.
    dct2 = torch.kron(dct, dct)
    blocks = planes.reshape(b, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(b, c, -1, 64)
    step = tables.to(planes).reshape(b, 1, 1, 64)
    coeffs = torch.round(blocks @ dct2.T / step) * step
    blocks = (coeffs @ dct2).reshape(b, c, h // 8, w // 8, 8, 8).permute(0, 1, 2, 4, 3, 5)
    return blocks.reshape(b, c, h, w)


def _color_transform(x: torch.Tensor, matrix: tuple) -> torch.Tensor:
    weights = torch.tensor(matrix, dtype=x.dtype, device=x.device)
    return (weights @ x.flatten(2)).reshape(x.shape)


def jpeg_compress(images: torch.Tensor, quality: float | torch.Tensor) -> torch.Tensor:
    """JPEG-compresses and decompresses ``images`` ``[B, 3, H, W]`` in [0, 1] at ``quality`` (one value or ``[B]``).

    Returns the decoded images in [0, 1], same shape, dtype and device. Any size works: the image is padded to a
    multiple of 16 by repeating its last row and column, as libjpeg does, and cropped back afterwards.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"`images` must be a torch.Tensor, got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"`images` must be [B, 3, H, W], got shape {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise TypeError(f"`images` must be floating point in [0, 1], got dtype {images.dtype}.")
    b, _, h, w = images.shape
    quality = _as_quality(quality, b)
    luma_table, chroma_table = jpeg_quantization_tables(quality)
    work_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(work_dtype).clamp(0, 1) * 255.0
    x = F.pad(x, (0, -w % _MCU, 0, -h % _MCU), mode="replicate")
    ycbcr = _color_transform(x, _RGB_TO_YCBCR)
    # Level shift: every plane centred on 0 before the DCT (chroma is already centred, the luma is not).
    luma = ycbcr[:, :1] - 128.0
    chroma = F.avg_pool2d(ycbcr[:, 1:], kernel_size=2)
    luma = _quantize_planes(luma, luma_table)
    chroma = _quantize_planes(chroma, chroma_table)
    # Bilinear 2x with half-pixel centres and edge clamping is libjpeg's h2v2 "fancy" upsampling.
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    rgb = _color_transform(torch.cat([luma + 128.0, chroma], dim=1), _YCBCR_TO_RGB)
    return (rgb[..., :h, :w].clamp(0, 255) / 255.0).to(images.dtype)
