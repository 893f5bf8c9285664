"""Image-quality metrics: PSNR and SSIM written here, the learned and no-reference ones through pyiqa (optional).

Conventions (those of IQA-PyTorch, ``pyiqa``, with the Y channel of BasicSR's ``rgb2ycbcr(y_only=True)``):

* images are ``[B, 3, H, W]`` tensors in [0, 1]; the data range is 1 for PSNR and 255 for SSIM (SSIM is scale-free
  once its constants follow the range, so this only matters through the 8-bit rounding below);
* the Y channel is ITU-R BT.601 studio swing: ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255`` in [16/255, 235/255];
* PSNR: ``10 log10(1 / MSE)``, the MSE taken over every channel and pixel, in float64, without rounding;
* SSIM: in float64 on the image rounded to 8-bit levels (``round(255 x)``, as MATLAB's ``ssim`` sees a uint8 image),
  11 x 11 Gaussian window of sigma 1.5, only the positions where the window lies inside the image ("valid"), no
  downsampling, the contrast-structure term clipped at 0, averaged over channels and positions;
* ``crop_border`` pixels are removed from every edge before either metric;
* LR-PSNR and LR-SSIM measure consistency with the LQ input: the restored image reduced to the LQ size with PIL's
  anti-aliased LANCZOS filter (as :mod:`faithdiff_pipeline.fidelity` reduces it), then PSNR and SSIM as above against
  the LQ image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from ..preprocessing import resize_float
from .metric_specs import BUILTIN_METRICS, EVAL_EXTRA, METRICS, PYIQA_METRICS, MetricSpec, MetricUnavailableError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_RANGE = 255.0
# BT.601 RGB -> Y, studio swing, for RGB in [0, 1] and Y in [0, 255] (as in BasicSR and pyiqa's ``rgb2ycbcr``).
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


def rgb_to_y(image: torch.Tensor) -> torch.Tensor:
    """The BT.601 luma (studio swing) of ``image`` (``[B, 3, H, W]`` in [0, 1]), as ``[B, 1, H, W]`` in [0, 1]."""
    _check_batch(image, "image")
    weights = torch.tensor(_Y_WEIGHTS, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return ((image * weights).sum(dim=1, keepdim=True) + _Y_OFFSET) / 255.0


def psnr(
    restored: torch.Tensor, reference: torch.Tensor, y_channel: bool = False, crop_border: int = 0
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image of a batch (``[B]``, float64).

    Args:
        restored, reference: ``[B, 3, H, W]`` in [0, 1], the same shape.
        y_channel: Compare the BT.601 luma only, instead of all three RGB channels.
        crop_border: Pixels left out at every edge.

    Returns:
        ``10 log10(1 / MSE)`` per image; ``inf`` for identical images.
    """
    restored, reference = _prepare(restored, reference, y_channel, crop_border)
    mse = (restored - reference).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / mse)


def ssim(
    restored: torch.Tensor, reference: torch.Tensor, y_channel: bool = False, crop_border: int = 0
) -> torch.Tensor:
    """Structural similarity of each image of a batch (``[B]``, float64), with the conventions of the module docstring.

    Args:
        restored, reference: ``[B, 3, H, W]`` in [0, 1], the same shape, at least 11 x 11 after ``crop_border``.
        y_channel: Compare the BT.601 luma only, instead of averaging over the three RGB channels.
        crop_border: Pixels left out at every edge.
    """
    restored, reference = _prepare(restored, reference, y_channel, crop_border)
    height, width = restored.shape[-2:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (after crop_border={crop_border}), "
            f"got {height}x{width}."
        )
    # pyiqa (like MATLAB on uint8 input) measures SSIM on 8-bit levels; for 8-bit RGB images this changes nothing.
    x = (restored * SSIM_RANGE).round()
    y = (reference * SSIM_RANGE).round()
    c1 = (0.01 * SSIM_RANGE) ** 2
    c2 = (0.03 * SSIM_RANGE) ** 2
    mu_x, mu_y, xx, yy, xy = _gaussian_filter(torch.stack([x, y, x * x, y * y, x * y]))
    var_x = xx - mu_x.pow(2)
    var_y = yy - mu_y.pow(2)
    cov = xy - mu_x * mu_y
    contrast_structure = ((2 * cov + c2) / (var_x + var_y + c2)).clamp(min=0)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x.pow(2) + mu_y.pow(2) + c1)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3))


def lr_psnr(restored: torch.Tensor, low_quality: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each restored image, reduced to the LQ size, against its LQ input (``[B]``, float64).

    Args:
        restored: ``[B, 3, H, W]`` in [0, 1].
        low_quality: ``[B, 3, h, w]`` in [0, 1], no larger than ``restored``.
    """
    return psnr(reduce_to(restored, low_quality), low_quality)


def lr_ssim(restored: torch.Tensor, low_quality: torch.Tensor) -> torch.Tensor:
    """SSIM of each restored image, reduced to the LQ size, against its LQ input (``[B]``, float64); the LQ image
    must be at least 11 x 11.

    Args:
        restored: ``[B, 3, H, W]`` in [0, 1].
        low_quality: ``[B, 3, h, w]`` in [0, 1], no larger than ``restored``.
    """
    return ssim(reduce_to(restored, low_quality), low_quality)


def reduce_to(restored: torch.Tensor, low_quality: torch.Tensor) -> torch.Tensor:
    """``restored`` (``[B, 3, H, W]`` in [0, 1]) reduced to the size of ``low_quality`` (``[B, 3, h, w]``) with PIL's
    LANCZOS filter, whose support widens with the reduction (anti-aliased), in float32, clipped to [0, 1]."""
    _check_batch(restored, "restored")
    _check_batch(low_quality, "low_quality")
    size = tuple(low_quality.shape[-2:])
    if len(restored) != len(low_quality) or restored.shape[-2] < size[0] or restored.shape[-1] < size[1]:
        raise ValueError(
            f"`restored` {tuple(restored.shape)} must be the batch of `low_quality` {tuple(low_quality.shape)} at "
            "its size or larger."
        )
    images = restored.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    reduced = np.stack([resize_float(image, size) for image in images])
    return torch.from_numpy(reduced).permute(0, 3, 1, 2)


def _gaussian_filter(image: torch.Tensor) -> torch.Tensor:
    """Normalised 11 x 11 Gaussian (sigma 1.5) over each channel, "valid" positions only.

    The 2-D window is the outer product of the normalised 1-D one, so two 1-D passes give the same result; they are
    weighted sums of shifted slices because float64 convolutions are many times slower on CPUs.
    """
    radius = SSIM_WINDOW // 2
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-offsets.pow(2) / (2 * SSIM_SIGMA**2))
    kernel = (kernel / kernel.sum()).tolist()
    height, width = image.shape[-2:]
    rows = _weighted_slices(image, kernel, dim=-2, length=height - 2 * radius)
    return _weighted_slices(rows, kernel, dim=-1, length=width - 2 * radius)


def _weighted_slices(image: torch.Tensor, weights: list[float], dim: int, length: int) -> torch.Tensor:
    total = weights[0] * image.narrow(dim, 0, length)
    for offset, weight in enumerate(weights[1:], start=1):
        total.add_(image.narrow(dim, offset, length), alpha=weight)
    return total


def _check_batch(image: torch.Tensor, name: str) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"`{name}` must be an RGB batch [B, 3, H, W] in [0, 1], got {shape}.")


def _prepare(
    restored: torch.Tensor, reference: torch.Tensor, y_channel: bool, crop_border: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images in float64, cropped, and reduced to the luma when asked."""
    _check_batch(restored, "restored")
    _check_batch(reference, "reference")
    if restored.shape != reference.shape:
        raise ValueError(
            f"`restored` {tuple(restored.shape)} and `reference` {tuple(reference.shape)} must have the same shape."
        )
    height, width = restored.shape[-2:]
    if (
        isinstance(crop_border, bool)
        or not isinstance(crop_border, int)
        or crop_border < 0
        or 2 * crop_border >= min(height, width)
    ):
        raise ValueError(
            f"`crop_border` must be an integer >= 0 leaving some of the {height}x{width} image, got {crop_border!r}."
        )
    restored, reference = restored.double().contiguous(), reference.double().contiguous()
    if crop_border:
        restored = restored[..., crop_border:-crop_border, crop_border:-crop_border]
        reference = reference[..., crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        restored, reference = rgb_to_y(restored), rgb_to_y(reference)
    return restored, reference


# A loaded metric: (restored, reference) -> one score per image; reference is None for no-reference metrics.
ScoreFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def parse_metric_names(text: str) -> list[str]:
    """The metric names of a comma-separated list (``--metrics``), validated and without duplicates."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError(
            f"`--metrics` {text!r} names no metric; expected a comma-separated list of {', '.join(METRICS)}."
        )
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(
            f"`--metrics` names unknown metric(s) {', '.join(unknown)}; expected some of {', '.join(METRICS)}."
        )
    return list(dict.fromkeys(names))


def pyiqa_available() -> bool:
    """Whether pyiqa can be imported (it is an optional extra)."""
    try:
        import pyiqa  # noqa: F401
    except ImportError:
        return False
    return True


def default_metric_names() -> tuple[list[str], str | None]:
    """The metrics used when none are asked for, and a note when the pyiqa ones are left out."""
    if pyiqa_available():
        return list(METRICS), None
    note = (
        f"note: {', '.join(PYIQA_METRICS)} skipped: they need pyiqa, which is not installed ({EVAL_EXTRA}); "
        f"computing {', '.join(BUILTIN_METRICS)}."
    )
    return list(BUILTIN_METRICS), note


def load_metric(name: str, device: str | torch.device = "cpu") -> ScoreFn:
    """A scoring function for the metric ``name`` (one of :data:`METRICS`).

    The pyiqa metrics are created here, on ``device``, which downloads their weights on first use.

    Raises:
        MetricUnavailableError: pyiqa is not installed or the metric's weights cannot be loaded.
    """
    if name not in METRICS:
        raise ValueError(f"`metric` {name!r} is unknown; expected one of {', '.join(METRICS)}.")
    spec = METRICS[name]
    if spec.pyiqa_name is None:
        if spec.reference == "lq":
            return _lq_scorer(name, lr_psnr if name == "lr-psnr" else lr_ssim)
        score = psnr if name.startswith("psnr") else ssim
        y_channel = name.endswith("-y")
        return lambda restored, reference: score(restored, reference, y_channel=y_channel)
    return _load_pyiqa_metric(spec, device)


def _lq_scorer(name: str, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> ScoreFn:
    def scorer(restored: torch.Tensor, low_quality: torch.Tensor | None) -> torch.Tensor:
        if low_quality is None:
            raise ValueError(f"metric {name!r} compares with the LQ image; it was given none (see score_result).")
        return score(restored, low_quality)

    return scorer


def score_result(
    scorers: Mapping[str, ScoreFn],
    restored: torch.Tensor,
    hq: torch.Tensor | None,
    lq: torch.Tensor | None,
) -> dict[str, float]:
    """The score of one restored image by each metric of ``scorers``, each given the reference its
    :class:`MetricSpec` names (the HQ image, the LQ input, or none).

    Args:
        scorers: Loaded metrics by name, from :func:`load_metric`.
        restored: ``[1, 3, H, W]`` in [0, 1].
        hq: The HQ image, ``[1, 3, H, W]``; ``None`` only when no metric compares with it.
        lq: The LQ input, ``[1, 3, h, w]``; ``None`` only when no metric compares with it.
    """
    references = {"hq": hq, "lq": lq, None: None}
    scores = {}
    for name, scorer in scorers.items():
        reference = METRICS[name].reference
        if reference is not None and references[reference] is None:
            raise ValueError(f"metric {name!r} compares with the {reference.upper()} image; `{reference}` is None.")
        scores[name] = float(scorer(restored, references[reference])[0])
    return scores


def _load_pyiqa_metric(spec: MetricSpec, device: str | torch.device) -> ScoreFn:
    try:
        import pyiqa
    except ImportError as error:
        raise MetricUnavailableError(
            f"metric {spec.name!r} needs pyiqa, which is not installed: {EVAL_EXTRA} ({error})."
        ) from error
    try:
        model = pyiqa.create_metric(spec.pyiqa_name, device=torch.device(device), as_loss=False)
    except Exception as error:  # pyiqa raises many kinds of errors when its weights cannot be fetched
        raise MetricUnavailableError(
            f"metric {spec.name!r} could not be created by pyiqa (are its weights downloadable or cached? "
            f"a complete install is {EVAL_EXTRA}): {type(error).__name__}: {error}"
        ) from error

    def score(restored: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        restored = restored.to(device=device, dtype=torch.float32)
        with torch.no_grad():
            if spec.full_reference:
                values = model(restored, reference.to(device=device, dtype=torch.float32))
            else:
                values = model(restored)
        return values.detach().double().reshape(-1).cpu()

    return score
