"""Blur kernels of the Real-ESRGAN degradation model: Gaussian, generalised Gaussian, plateau and sinc.

Every kernel is built in float64 on a centred integer grid, normalised to sum to 1 and returned as float32. The
shaped kernels depend on the grid point only through the quadratic form ``q = p^T Sigma^-1 p`` of a rotated
covariance ``Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T`` (``p = (column, row)`` offset), so all of them
are point-symmetric, and the isotropic ones are also invariant under 90-degree rotation and transposition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_choice, check_integer, check_positive, check_range
from . import _random
from .config import KERNEL_TYPES

SPECIAL_KERNELS = ("sinc", "pulse")
ROTATION_RANGE = (-math.pi, math.pi)
# Real-ESRGAN lets small sinc kernels cut off less: a low cut-off on a short support rings too much.
SINC_OMEGA_SMALL = (math.pi / 3, math.pi)
SINC_OMEGA_LARGE = (math.pi / 5, math.pi)
SINC_LARGE_FROM = 13


def _finish(kernel: torch.Tensor, pad_to: int | None) -> torch.Tensor:
    kernel = (kernel / kernel.sum()).to(torch.float32)
    if pad_to is None:
        return kernel
    check_integer(pad_to, "pad_to", 1, odd=True)
    if pad_to < kernel.shape[-1]:
        raise ValueError(f"`pad_to` must be at least the kernel size {kernel.shape[-1]}, got {pad_to}.")
    margin = (pad_to - kernel.shape[-1]) // 2
    return F.pad(kernel, (margin,) * 4)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    axis = torch.arange(size, dtype=torch.float64) - size // 2
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    return cols, rows


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    check_integer(size, "size", 1, odd=True)
    check_positive(sigma_x, "sigma_x")
    check_positive(sigma_y, "sigma_y")
    x, y = _grid(size)
    cos, sin = math.cos(theta), math.sin(theta)
    # Coordinates in the frame of the covariance's principal axes, where Sigma is diagonal.
    u = cos * x + sin * y
    v = -sin * x + cos * y
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0, pad_to: int | None = None
) -> torch.Tensor:
    """A bivariate Gaussian kernel ``exp(-q / 2)``, isotropic when ``sigma_y`` is None.

    Args:
        size: odd side length of the support.
        sigma_x, sigma_y: standard deviations along the principal axes, in pixels.
        theta: rotation of the first principal axis, in radians.
        pad_to: odd side length to zero-pad the kernel to, centred; None keeps ``size``.
    """
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _finish(torch.exp(-0.5 * q), pad_to)


def generalized_gaussian_kernel(
    size: int,
    sigma_x: float,
    sigma_y: float | None = None,
    theta: float = 0.0,
    beta: float = 1.0,
    pad_to: int | None = None,
) -> torch.Tensor:
    """A generalised Gaussian kernel ``exp(-q^beta / 2)``: flatter top for ``beta > 1``, heavier tails below 1."""
    check_positive(beta, "beta")
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _finish(torch.exp(-0.5 * q.pow(beta)), pad_to)


def plateau_kernel(
    size: int,
    sigma_x: float,
    sigma_y: float | None = None,
    theta: float = 0.0,
    beta: float = 1.0,
    pad_to: int | None = None,
) -> torch.Tensor:
    """A plateau kernel ``1 / (1 + q^beta)``: a flat top with polynomially decaying tails."""
    check_positive(beta, "beta")
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _finish(1.0 / (1.0 + q.pow(beta)), pad_to)


def sinc_kernel(size: int, omega_c: float, pad_to: int | None = None) -> torch.Tensor:
    """The circular low-pass ("sinc") kernel with cut-off ``omega_c`` radians per pixel (``pi`` is Nyquist).

    It is the ideal 2-D low-pass impulse response ``omega_c * J1(omega_c * r) / (2 * pi * r)`` sampled on the grid
    and truncated to ``size``; it has negative lobes, which is what produces ringing and overshoot artefacts.
    """
    check_integer(size, "size", 1, odd=True)
    check_positive(omega_c, "omega_c")
    x, y = _grid(size)
    r = torch.sqrt(x**2 + y**2)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    kernel = omega_c * torch.special.bessel_j1(omega_c * safe_r) / (2 * math.pi * safe_r)
    # The limit of J1(w r) / r at r = 0 is w / 2.
    kernel = torch.where(r == 0, torch.full_like(r, omega_c**2 / (4 * math.pi)), kernel)
    return _finish(kernel, pad_to)


def pulse_kernel(size: int = 1, pad_to: int | None = None) -> torch.Tensor:
    """The identity kernel: a single 1 at the centre."""
    check_integer(size, "size", 1, odd=True)
    kernel = torch.zeros(size, size, dtype=torch.float64)
    kernel[size // 2, size // 2] = 1.0
    return _finish(kernel, pad_to)


@dataclass(frozen=True)
class KernelSpec:
    """The drawn parameters of one kernel, so that a degradation can be planned without building any tensor.

    ``kind`` is one of :data:`KERNEL_TYPES`, ``"sinc"`` or ``"pulse"``; ``beta`` is used by the generalised and plateau
    kinds, ``omega_c`` by ``"sinc"``.
    """

    kind: str
    size: int
    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    beta: float = 1.0
    omega_c: float = 0.0

    def build(self, pad_to: int | None = None) -> torch.Tensor:
        """The kernel as a float32 ``[k, k]`` tensor on CPU, zero-padded to ``pad_to`` when given."""
        if self.kind == "pulse":
            return pulse_kernel(self.size, pad_to)
        if self.kind == "sinc":
            return sinc_kernel(self.size, self.omega_c, pad_to)
        shape = {
            "size": self.size,
            "sigma_x": self.sigma_x,
            "sigma_y": self.sigma_y,
            "theta": self.theta,
            "pad_to": pad_to,
        }
        if self.kind in ("iso", "aniso"):
            return gaussian_kernel(**shape)
        if self.kind in ("generalized_iso", "generalized_aniso"):
            return generalized_gaussian_kernel(**shape, beta=self.beta)
        if self.kind in ("plateau_iso", "plateau_aniso"):
            return plateau_kernel(**shape, beta=self.beta)
        raise ValueError(f"`kind` must be one of {KERNEL_TYPES + SPECIAL_KERNELS}, got {self.kind!r}.")


def _sample_beta(generator: torch.Generator | None, beta_range: tuple[float, float]) -> float:
    low, high = beta_range
    if not low <= 1.0 <= high:
        return _random.uniform(generator, low, high)
    # As in Real-ESRGAN: shapes below and above beta = 1 are equally likely however lopsided the range is, so with
    # a range starting at 1 half the draws are exactly 1.
    if _random.bernoulli(generator, 0.5):
        return _random.uniform(generator, low, 1.0)
    return _random.uniform(generator, 1.0, high)


def sample_kernel_spec(
    kind: str,
    size: int,
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float] = (0.5, 4.0),
    betap_range: tuple[float, float] = (1.0, 2.0),
    generator: torch.Generator | None = None,
    rotation_range: tuple[float, float] = ROTATION_RANGE,
) -> KernelSpec:
    """Draws the parameters of a kernel of family ``kind`` (one of :data:`KERNEL_TYPES`).

    ``sigma_x`` (and for the anisotropic kinds ``sigma_y`` and the rotation) are uniform in their ranges; the shape
    ``beta`` comes from ``betag_range`` for the generalised kinds and ``betap_range`` for the plateau ones.
    """
    check_choice(kind, "kind", KERNEL_TYPES)
    check_integer(size, "size", 1, odd=True)
    sigma_range = check_range(sigma_range, "sigma_range")
    sigma_x = _random.uniform(generator, *sigma_range)
    sigma_y, theta = sigma_x, 0.0
    if kind.endswith("aniso"):
        sigma_y = _random.uniform(generator, *sigma_range)
        theta = _random.uniform(generator, *check_range(rotation_range, "rotation_range"))
    beta = 1.0
    if kind.startswith("generalized"):
        beta = _sample_beta(generator, check_range(betag_range, "betag_range"))
    elif kind.startswith("plateau"):
        beta = _sample_beta(generator, check_range(betap_range, "betap_range"))
    return KernelSpec(kind, size, sigma_x, sigma_y, theta, beta)


def sample_sinc_spec(
    size: int, generator: torch.Generator | None = None, omega_range: tuple[float, float] | None = None
) -> KernelSpec:
    """Draws a sinc kernel's cut-off, by default from [pi/3, pi] below size 13 and [pi/5, pi] from 13 on."""
    check_integer(size, "size", 1, odd=True)
    if omega_range is None:
        omega_range = SINC_OMEGA_SMALL if size < SINC_LARGE_FROM else SINC_OMEGA_LARGE
    omega_range = check_range(omega_range, "omega_range")
    return KernelSpec("sinc", size, omega_c=_random.uniform(generator, *omega_range))
