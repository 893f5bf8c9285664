"""Planning and applying the second-order degradation: ``degrade = apply_degradation_plan(sample_degradation_plan())``.

A plan holds every random choice except the noise fields, so the statistics of the choices can be checked (and
logged) without touching an image. What is per image and what is per batch:

* per image: the three kernels (first blur, second blur or none, final sinc or none), the noise type, strength and
  colour/grey choice of both stages, both JPEG qualities, and the order of [resize to target + sinc] and the last JPEG;
* per batch (the images must keep one size): the two random resizes (direction, factor, mode) and the mode of the
  resize to the target size, as in Real-ESRGAN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..checks import check_integer
from . import _random
from .config import DegradationConfig, StageConfig
from .jpeg import jpeg_compress
from .kernels import KernelSpec, sample_kernel_spec, sample_sinc_spec
from .noise import gaussian_noise, poisson_noise

_DIRECTIONS = ("up", "down", "keep")
# Real-ESRGAN's final sinc filter always cuts off between pi/3 and pi, whatever its size.
_FINAL_SINC_OMEGA = (torch.pi / 3, torch.pi)


@dataclass(frozen=True)
class ResizeSpec:
    """One random resize: ``direction`` is "up", "down" or "keep"; ``factor`` multiplies the size."""

    direction: str
    factor: float
    mode: str


@dataclass(frozen=True)
class NoiseSpec:
    """One image's noise: ``kind`` "gaussian" (``strength`` = sigma on 0-255) or "poisson" (``strength`` = scale)."""

    kind: str
    strength: float
    gray: bool


@dataclass(frozen=True)
class SampleDegradation:
    """The random choices for one image. Second-stage fields are None when the plan is one-stage."""

    blur1: KernelSpec
    noise1: NoiseSpec
    jpeg_quality1: float
    final_sinc: KernelSpec
    blur2: KernelSpec | None = None
    noise2: NoiseSpec | None = None
    jpeg_quality2: float | None = None
    final_resize_first: bool = True


@dataclass(frozen=True)
class DegradationPlan:
    """Every random choice of one :func:`degrade` call except the noise fields (see the module docstring).

    ``kernel_pad`` and ``kernel_pad2`` are the sizes the kernels of each stage are zero-padded to; ``resize2`` and
    ``kernel_pad2`` are None for a one-stage plan.
    """

    scale: int
    kernel_pad: int
    kernel_pad2: int | None
    resize1: ResizeSpec
    resize2: ResizeSpec | None
    final_resize_mode: str
    samples: tuple[SampleDegradation, ...]

    @property
    def two_stage(self) -> bool:
        """Whether the plan has a second stage."""
        return self.resize2 is not None


# ------------------------------------------------------------------------------------------------ sampling
def _sample_resize(generator: torch.Generator, stage: StageConfig, modes: tuple[str, ...]) -> ResizeSpec:
    direction = _random.choice(generator, _DIRECTIONS, stage.resize_prob)
    low, high = stage.resize_range
    factor = {
        "up": lambda: _random.uniform(generator, 1.0, high),
        "down": lambda: _random.uniform(generator, low, 1.0),
    }
    value = factor[direction]() if direction in factor else 1.0
    return ResizeSpec(direction, value, _random.choice(generator, modes))


def _sample_blur(generator: torch.Generator, stage: StageConfig) -> KernelSpec:
    size = _random.choice(generator, stage.kernel_sizes)
    if _random.bernoulli(generator, stage.sinc_prob):
        return sample_sinc_spec(size, generator)
    kind = _random.choice(generator, stage.kernel_list, stage.kernel_prob)
    return sample_kernel_spec(kind, size, stage.blur_sigma, stage.betag_range, stage.betap_range, generator)


def _sample_noise(generator: torch.Generator, stage: StageConfig) -> NoiseSpec:
    if _random.bernoulli(generator, stage.gaussian_noise_prob):
        kind, strength = "gaussian", _random.uniform(generator, *stage.noise_range)
    else:
        kind, strength = "poisson", _random.uniform(generator, *stage.poisson_scale_range)
    return NoiseSpec(kind, strength, _random.bernoulli(generator, stage.gray_noise_prob))


def _sample_final_sinc(generator: torch.Generator, config: DegradationConfig) -> KernelSpec:
    if not _random.bernoulli(generator, config.final_sinc_prob):
        return KernelSpec("pulse", 1)
    return sample_sinc_spec(_random.choice(generator, config.stage1.kernel_sizes), generator, _FINAL_SINC_OMEGA)


def _sample_image(generator: torch.Generator, config: DegradationConfig) -> SampleDegradation:
    blur1 = _sample_blur(generator, config.stage1)
    noise1 = _sample_noise(generator, config.stage1)
    quality1 = _random.uniform(generator, *config.stage1.jpeg_range)
    if config.stage2 is None:
        return SampleDegradation(blur1, noise1, quality1, _sample_final_sinc(generator, config))
    blur2 = _sample_blur(generator, config.stage2)
    if not _random.bernoulli(generator, config.second_blur_prob):
        blur2 = KernelSpec("pulse", 1)
    noise2 = _sample_noise(generator, config.stage2)
    quality2 = _random.uniform(generator, *config.stage2.jpeg_range)
    final_sinc = _sample_final_sinc(generator, config)
    resize_first = _random.bernoulli(generator, config.final_resize_first_prob)
    return SampleDegradation(blur1, noise1, quality1, final_sinc, blur2, noise2, quality2, resize_first)


def sample_degradation_plan(
    config: DegradationConfig, batch_size: int, generator: torch.Generator | None = None
) -> DegradationPlan:
    """Draws every random choice for a batch of ``batch_size`` images, without touching any image.

    ``generator`` must be a CPU generator or None (torch's global CPU generator); :func:`degrade` takes care of
    accelerator generators.
    """
    if not isinstance(config, DegradationConfig):
        raise TypeError(f"`config` must be a DegradationConfig, got {type(config).__name__}.")
    check_integer(batch_size, "batch_size", 1)
    _random.check_generator(generator)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"`generator` must be on the CPU for planning, got one on {generator.device}.")
    config.validate()
    resize1 = _sample_resize(generator, config.stage1, config.resize_modes)
    resize2, kernel_pad2 = None, None
    if config.stage2 is not None:
        resize2 = _sample_resize(generator, config.stage2, config.resize_modes)
        kernel_pad2 = config.stage2.blur_kernel_size
    final_mode = _random.choice(generator, config.resize_modes)
    samples = tuple(_sample_image(generator, config) for _ in range(batch_size))
    return DegradationPlan(
        config.scale, config.stage1.blur_kernel_size, kernel_pad2, resize1, resize2, final_mode, samples
    )


# ------------------------------------------------------------------------------------------------ applying
def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filters each image of ``images`` ``[B, C, H, W]`` with its own odd kernel from ``kernels`` ``[B, k, k]``.

    Borders are reflected (replicated when the image is too small to reflect). The kernels are applied as a
    correlation, which equals convolution for the point-symmetric kernels of this model.
    """
    b, c, h, w = images.shape
    if kernels.ndim != 3 or kernels.shape[0] != b or kernels.shape[1] != kernels.shape[2] or kernels.shape[1] % 2 == 0:
        raise ValueError(f"`kernels` must be [B={b}, k, k] with odd k, got shape {tuple(kernels.shape)}.")
    pad = kernels.shape[-1] // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    padded = F.pad(images, (pad,) * 4, mode=mode)
    weight = kernels.to(images).repeat_interleave(c, dim=0)[:, None]
    out = F.conv2d(padded.reshape(1, b * c, h + 2 * pad, w + 2 * pad), weight, groups=b * c)
    return out.reshape(b, c, h, w)


def _blur(x: torch.Tensor, specs: list[KernelSpec], pad_to: int) -> torch.Tensor:
    if all(spec.kind == "pulse" for spec in specs):
        return x
    return filter2d(x, torch.stack([spec.build(pad_to) for spec in specs]))


def _interpolate(x: torch.Tensor, size: tuple[int, int], mode: str, factor: float | None = None) -> torch.Tensor:
    size = (max(1, size[0]), max(1, size[1]))
    if tuple(x.shape[-2:]) == size and factor in (None, 1.0):
        return x
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    if factor is not None and all(s >= 1 for s in (int(x.shape[-2] * factor), int(x.shape[-1] * factor))):
        # Real-ESRGAN resizes the first stage by factor, which maps coordinates with the factor itself rather than
        # with the ratio of the rounded sizes.
        return F.interpolate(x, scale_factor=factor, mode=mode, **kwargs)
    return F.interpolate(x, size=size, mode=mode, **kwargs)


def _noise(x: torch.Tensor, specs: list[NoiseSpec], generator: torch.Generator) -> torch.Tensor:
    fields = []
    for i, spec in enumerate(specs):
        make = gaussian_noise if spec.kind == "gaussian" else poisson_noise
        fields.append(make(x[i : i + 1], spec.strength, spec.gray, generator))
    return (x + torch.cat(fields)).clamp(0.0, 1.0)


def _final_step(x: torch.Tensor, plan: DegradationPlan, target: tuple[int, int]) -> torch.Tensor:
    """[resize to target + sinc] and the last JPEG, in each image's own order."""
    out = x.new_empty(x.shape[0], x.shape[1], *target)
    for resize_first in (True, False):
        index = [i for i, s in enumerate(plan.samples) if s.final_resize_first == resize_first]
        if not index:
            continue
        part, samples = x[index], [plan.samples[i] for i in index]
        quality = torch.tensor([s.jpeg_quality2 for s in samples], dtype=torch.float64)
        if not resize_first:
            part = jpeg_compress(part.clamp(0, 1), quality)
        part = _interpolate(part, target, plan.final_resize_mode)
        part = _blur(part, [s.final_sinc for s in samples], plan.kernel_pad)
        if resize_first:
            part = jpeg_compress(part.clamp(0, 1), quality)
        out[index] = part
    return out


def _check_hq(hq: torch.Tensor, scale: int) -> None:
    if not isinstance(hq, torch.Tensor):
        raise TypeError(f"`hq` must be a torch.Tensor, got {type(hq).__name__}.")
    if hq.ndim != 4 or hq.shape[1] != 3:
        raise ValueError(f"`hq` must be a [B, 3, H, W] tensor, got shape {tuple(hq.shape)}.")
    if not hq.is_floating_point():
        raise TypeError(f"`hq` must be a floating-point tensor in [0, 1], got dtype {hq.dtype}.")
    h, w = hq.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"`hq` height and width must be divisible by scale {scale}, got {h}x{w}.")


@torch.no_grad()
def apply_degradation_plan(
    hq: torch.Tensor, plan: DegradationPlan, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Degrades ``hq`` ``[B, 3, H, W]`` in [0, 1] by ``plan``, drawing the noise fields from ``generator``.

    Returns the LQ images ``[B, 3, H / scale, W / scale]`` rounded to 8-bit levels, in ``hq``'s dtype and device.
    """
    if not isinstance(plan, DegradationPlan):
        raise TypeError(f"`plan` must be a DegradationPlan, got {type(plan).__name__}.")
    _check_hq(hq, plan.scale)
    _random.check_generator(generator)
    if len(plan.samples) != hq.shape[0]:
        raise ValueError(f"`plan` was drawn for {len(plan.samples)} images, but `hq` holds {hq.shape[0]}.")
    h, w = hq.shape[-2:]
    target = (h // plan.scale, w // plan.scale)
    x = hq.to(torch.float64 if hq.dtype == torch.float64 else torch.float32)
    s = plan.samples

    x = _blur(x, [p.blur1 for p in s], plan.kernel_pad)
    f = plan.resize1.factor
    x = _interpolate(x, (int(x.shape[-2] * f), int(x.shape[-1] * f)), plan.resize1.mode, factor=f)
    x = _noise(x, [p.noise1 for p in s], generator)
    x = jpeg_compress(x.clamp(0, 1), torch.tensor([p.jpeg_quality1 for p in s], dtype=torch.float64))
    if plan.two_stage:
        x = _blur(x, [p.blur2 for p in s], plan.kernel_pad2)
        f = plan.resize2.factor
        x = _interpolate(x, (int(h / plan.scale * f), int(w / plan.scale * f)), plan.resize2.mode)
        x = _noise(x, [p.noise2 for p in s], generator)
        x = _final_step(x, plan, target)
    else:
        x = _interpolate(x, target, plan.final_resize_mode)
        x = _blur(x, [p.final_sinc for p in s], plan.kernel_pad)
    levels = torch.round(x * 255.0).clamp(0, 255)
    # Dividing in float64 gives the correctly rounded k / 255 on every device (CUDA divides by a scalar through its
    # reciprocal, which can be one float32 ulp off).
    exact = torch.float32 if levels.device.type == "mps" else torch.float64  # MPS has no float64
    return (levels.to(exact) / 255.0).to(hq.dtype)


def degrade(hq: torch.Tensor, config: DegradationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Synthesises low-quality images from ``hq`` with the second-order degradation model ``config``.

    Args:
        hq: ``[B, 3, H, W]`` float images in [0, 1] on any device; H and W divisible by ``config.scale``.
        config: the settings, e.g. ``DegradationConfig()`` (FaithDiff's) or ``get_preset("realesrgan")``.
        generator: the source of every random draw. With a CPU generator the parameters and the noise fields are
            drawn on the CPU (the fields are then copied to ``hq``'s device); with an accelerator generator the
            parameters come from a CPU generator seeded by one draw from it, and the noise fields from it directly.
            None uses torch's global CPU generator, so ``torch.manual_seed`` makes the call reproducible.

    Returns:
        ``[B, 3, H / scale, W / scale]`` LQ images in [0, 1] on the 8-bit grid (``round(x * 255) / 255``), in ``hq``'s
        dtype and device. The same generator state gives the same result, bit for bit, on the same device.
    """
    if not isinstance(config, DegradationConfig):
        raise TypeError(f"`config` must be a DegradationConfig, got {type(config).__name__}.")
    _check_hq(hq, config.scale)
    params, noise = _random.split_generators(generator, hq.device)
    plan = sample_degradation_plan(config, hq.shape[0], params)
    return apply_degradation_plan(hq, plan, noise)


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """An image tensor in [0, 1], ``[1, 3, H, W]`` or ``[3, H, W]`` (such as one image of :func:`degrade`'s
    output), as an 8-bit RGB PIL image (rounded to the nearest level, clipped): to save it, or to crop and resize it
    as PIL does."""
    image = image[0] if image.ndim == 4 else image
    array = (image.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(np.ascontiguousarray(array))
