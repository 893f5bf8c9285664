"""Settings of the degradation model, their validation and YAML round trip, and the named presets."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

# Defined here rather than in `.kernels`, which needs torch: the settings (and the presets built from them) can then
# be imported without it.
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
"""The six shaped kernel families of Real-ESRGAN, by the names its option files use."""

RESIZE_MODES = ("area", "bilinear", "bicubic", "nearest")
_ALL_KERNELS = KERNEL_TYPES
_SIX_KERNEL_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
# Keys of Real-ESRGAN-style option files that switch off augmentations this model does not implement; a file may
# carry them (FaithDiff's does) as long as they are 0.
_DISABLED_EXTRAS = ("color_jitter_prob", "gray_prob")
_PROB_SUM_TOLERANCE = 1e-6


@dataclass
class DegradationConfig:
    """Every setting of the second-order (Real-ESRGAN) degradation model. Defaults are FaithDiff's training settings.

    Field names follow Real-ESRGAN's option files (``...2`` is the second stage). Ranges are ``(low, high)`` pairs
    sampled uniformly; three-way ``resize_prob*`` are the probabilities of (up, down, keep). With
    ``two_stage=False`` (DASR's one-stage levels) every ``...2`` field and ``final_resize_first_prob`` are unused:
    the model is blur, resize, noise, JPEG, then the resize to the target size and the final sinc filter.

    Attributes:
        scale: the downscaling factor from HQ to LQ.
        two_stage: whether the second degradation stage runs.
        resize_modes: interpolation modes, picked uniformly for every resize.
        blur_kernel_size, blur_kernel_size_minimum: kernel sizes are odd, uniform in [minimum, size], and zero-padded
            to ``blur_kernel_size`` (likewise ``blur_kernel_size2*`` for the second stage).
        kernel_list, kernel_prob: kernel families (see ``KERNEL_TYPES``) and their probabilities.
        sinc_prob: probability that a stage blurs with a sinc kernel instead of a ``kernel_list`` family.
        blur_sigma: range of the kernels' standard deviations, in pixels.
        betag_range, betap_range: shape ranges of the generalised Gaussian and plateau kernels.
        resize_prob, resize_range: (up, down, keep) probabilities and the range of the resize factor; up draws from
            [1, high], down from [low, 1].
        gaussian_noise_prob: probability of Gaussian noise; Poisson noise otherwise.
        noise_range: Gaussian standard deviation range on the 0-255 scale.
        poisson_scale_range: Poisson noise multiplier range.
        gray_noise_prob: probability that the noise is one grey field rather than three colour ones.
        jpeg_range: JPEG quality range.
        second_blur_prob: probability that the second stage blurs at all.
        final_sinc_prob: probability of the sinc filter after the resize to the target size.
        final_resize_first_prob: probability that [resize to target + sinc] comes before the last JPEG, not after.
    """

    scale: int = 4
    two_stage: bool = True
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")

    # First stage.
    blur_kernel_size: int = 21
    blur_kernel_size_minimum: int = 7
    kernel_list: tuple[str, ...] = _ALL_KERNELS
    kernel_prob: tuple[float, ...] = _SIX_KERNEL_PROBS
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.3, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 15.0)
    poisson_scale_range: tuple[float, float] = (0.05, 2.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (60.0, 95.0)

    # Second stage.
    second_blur_prob: float = 0.5
    blur_kernel_size2: int = 21
    blur_kernel_size2_minimum: int = 7
    kernel_list2: tuple[str, ...] = _ALL_KERNELS
    kernel_prob2: tuple[float, ...] = _SIX_KERNEL_PROBS
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.6, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 12.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 1.0)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (60.0, 100.0)

    # Last step.
    final_sinc_prob: float = 0.8
    final_resize_first_prob: float = 0.5

    def __post_init__(self) -> None:
        self._normalise()
        self.validate()

    # ----------------------------------------------------------------------------------------- normalisation
    def _normalise(self) -> None:
        # YAML and callers hand over lists and ints; store tuples of floats so that equality and hashing of the
        # values do not depend on where they came from.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = tuple(value)
            if isinstance(value, tuple) and f.name not in ("kernel_list", "kernel_list2", "resize_modes"):
                value = tuple(float(v) if _is_number(v) else v for v in value)
            setattr(self, f.name, value)

    # ------------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raises ValueError/TypeError naming the first setting that is out of its domain."""
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"`scale` must be a positive integer, got {self.scale!r}.")
        if not isinstance(self.two_stage, bool):
            raise TypeError(f"`two_stage` must be a bool, got {self.two_stage!r}.")
        _check_modes(self.resize_modes)
        for suffix in ("", "2"):
            self._validate_blur(suffix)
            self._validate_stage(suffix)
        _check_probability(self.final_sinc_prob, "final_sinc_prob")
        _check_probability(self.final_resize_first_prob, "final_resize_first_prob")

    def _validate_blur(self, suffix: str) -> None:
        size_name = "blur_kernel_size" + suffix
        size, minimum = getattr(self, size_name), getattr(self, size_name + "_minimum")
        _check_odd(size, size_name)
        _check_odd(minimum, size_name + "_minimum")
        if minimum > size:
            raise ValueError(f"`{size_name}_minimum` must be <= `{size_name}` ({size}), got {minimum}.")
        _check_kernel_list(getattr(self, "kernel_list" + suffix), "kernel_list" + suffix)
        probs = getattr(self, "kernel_prob" + suffix)
        _check_distribution(probs, "kernel_prob" + suffix, len(getattr(self, "kernel_list" + suffix)))
        _check_probability(getattr(self, "sinc_prob" + suffix), "sinc_prob" + suffix)
        _check_range(getattr(self, "blur_sigma" + suffix), "blur_sigma" + suffix, low=0.0, open_low=True)
        _check_range(getattr(self, "betag_range" + suffix), "betag_range" + suffix, low=0.0, open_low=True)
        _check_range(getattr(self, "betap_range" + suffix), "betap_range" + suffix, low=0.0, open_low=True)
        if suffix == "2":
            _check_probability(self.second_blur_prob, "second_blur_prob")

    def _validate_stage(self, suffix: str) -> None:
        _check_distribution(getattr(self, "resize_prob" + suffix), "resize_prob" + suffix, 3)
        name = "resize_range" + suffix
        low, high = _check_range(getattr(self, name), name, low=0.0, open_low=True)
        if not low <= 1.0 <= high:
            raise ValueError(
                f"`{name}` must contain 1 (down draws from [low, 1], up from [1, high]), got {[low, high]}."
            )
        _check_probability(getattr(self, "gaussian_noise_prob" + suffix), "gaussian_noise_prob" + suffix)
        _check_range(getattr(self, "noise_range" + suffix), "noise_range" + suffix, low=0.0)
        _check_range(getattr(self, "poisson_scale_range" + suffix), "poisson_scale_range" + suffix, low=0.0)
        _check_probability(getattr(self, "gray_noise_prob" + suffix), "gray_noise_prob" + suffix)
        _check_range(getattr(self, "jpeg_range" + suffix), "jpeg_range" + suffix, low=1.0, high=100.0)

    # ------------------------------------------------------------------------------------ dict / YAML I/O
    def to_dict(self) -> dict[str, Any]:
        """The settings as plain Python values (lists for the tuples), ready for YAML or JSON."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DegradationConfig":
        """Settings from a mapping; missing keys keep FaithDiff's defaults.

        Real-ESRGAN's option layout is accepted as well: kernel settings may sit under a ``kernel_info`` mapping,
        and ``color_jitter_prob``/``gray_prob`` may be present when they are 0. Any other unknown key is a
        ValueError that names it.
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"`values` must be a mapping, got {type(values).__name__}.")
        flat = {k: v for k, v in values.items() if k != "kernel_info"}
        nested = values.get("kernel_info", {}) or {}
        if not isinstance(nested, Mapping):
            raise TypeError(f"`kernel_info` must be a mapping, got {type(nested).__name__}.")
        clashes = sorted(set(flat) & set(nested))
        if clashes:
            raise ValueError(f"Keys given both at the top level and under `kernel_info`: {clashes}.")
        flat.update(nested)
        for key in _DISABLED_EXTRAS:
            if key in flat:
                if flat[key] not in (0, 0.0):
                    raise ValueError(
                        f"`{key}` is not supported by this degradation model; it must be 0, got {flat[key]!r}."
                    )
                del flat[key]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"Unknown degradation settings {unknown}; valid settings are {sorted(known)}.")
        return cls(**flat)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "DegradationConfig":
        """Settings from a YAML file (needs ``pyyaml``); see :meth:`from_dict` for the accepted layout."""
        import yaml

        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
        if not isinstance(values, Mapping):
            raise ValueError(f"{os.fspath(path)!r} must hold a YAML mapping of settings, got {type(values).__name__}.")
        return cls.from_dict(values)

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Writes every setting to a YAML file (needs ``pyyaml``) that :meth:`from_yaml` reads back unchanged."""
        import yaml

        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.to_dict(), handle, sort_keys=False, default_flow_style=None)


# ------------------------------------------------------------------------------------------------- checks
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_probability(value: Any, name: str) -> None:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be a probability in [0, 1], got {value!r}.")


def _check_distribution(values: Any, name: str, length: int) -> None:
    if not isinstance(values, tuple) or len(values) != length:
        raise ValueError(f"`{name}` must be a list of {length} probabilities, got {values!r}.")
    for value in values:
        _check_probability(value, name)
    if abs(math.fsum(values) - 1.0) > _PROB_SUM_TOLERANCE:
        raise ValueError(f"`{name}` must sum to 1, got {list(values)} (sum {math.fsum(values):g}).")


def _check_range(
    value: Any, name: str, low: float | None = None, high: float | None = None, open_low: bool = False
) -> tuple[float, float]:
    if not isinstance(value, tuple) or len(value) != 2 or not all(_is_number(v) and math.isfinite(v) for v in value):
        raise ValueError(f"`{name}` must be a (low, high) pair of finite numbers, got {value!r}.")
    if value[0] > value[1]:
        raise ValueError(f"`{name}` must have low <= high, got {list(value)}.")
    if low is not None and (value[0] < low or (open_low and value[0] == low)):
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        raise ValueError(f"`{name}` must lie {bound}, got {list(value)}.")
    if high is not None and value[1] > high:
        raise ValueError(f"`{name}` must lie <= {high:g}, got {list(value)}.")
    return value


def _check_odd(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"`{name}` must be a positive odd integer, got {value!r}.")


def _check_kernel_list(values: Any, name: str) -> None:
    if not isinstance(values, tuple) or not values or any(v not in KERNEL_TYPES for v in values):
        raise ValueError(f"`{name}` must be a non-empty list of kernel types from {KERNEL_TYPES}, got {values!r}.")


def _check_modes(values: Any) -> None:
    if not isinstance(values, tuple) or not values or any(v not in RESIZE_MODES for v in values):
        raise ValueError(f"`resize_modes` must be a non-empty list from {RESIZE_MODES}, got {values!r}.")


# ------------------------------------------------------------------------------------------------ presets
_REALESRGAN = dict(
    resize_range=(0.15, 1.5),
    noise_range=(1.0, 30.0),
    poisson_scale_range=(0.05, 3.0),
    jpeg_range=(30.0, 95.0),
    second_blur_prob=0.8,
    resize_range2=(0.3, 1.2),
    noise_range2=(1.0, 25.0),
    poisson_scale_range2=(0.05, 2.5),
    jpeg_range2=(30.0, 95.0),
)
# DASR draws only isotropic/anisotropic Gaussians and never a sinc kernel inside a stage.
_DASR_KERNELS = dict(kernel_list=("iso", "aniso"), kernel_prob=(0.65, 0.35), sinc_prob=0.0)
_DASR_KERNELS2 = dict(kernel_list2=("iso", "aniso"), kernel_prob2=(0.65, 0.35), sinc_prob2=0.0)
_DASR_ONE_STAGE = dict(two_stage=False, final_sinc_prob=0.0, gaussian_noise_prob=0.5, gray_noise_prob=0.4)

PRESETS: dict[str, DegradationConfig] = {
    "faithdiff": DegradationConfig(),
    "realesrgan": DegradationConfig(**_REALESRGAN),
    "dasr-level1": DegradationConfig(
        **_DASR_ONE_STAGE,
        **_DASR_KERNELS,
        blur_sigma=(0.2, 0.8),
        resize_prob=(0.1, 0.2, 0.7),
        resize_range=(0.85, 1.2),
        noise_range=(1.0, 10.0),
        poisson_scale_range=(0.05, 0.5),
        jpeg_range=(90.0, 95.0),
    ),
    "dasr-level2": DegradationConfig(
        **_DASR_ONE_STAGE,
        **_DASR_KERNELS,
        blur_sigma=(0.2, 1.5),
        resize_prob=(0.3, 0.4, 0.3),
        resize_range=(0.5, 1.2),
        noise_range=(1.0, 20.0),
        poisson_scale_range=(0.05, 1.5),
        jpeg_range=(50.0, 95.0),
    ),
    "dasr-level3": DegradationConfig(**_REALESRGAN, **_DASR_KERNELS, **_DASR_KERNELS2),
}
"""Named settings. Use :func:`get_preset` for a copy you may modify; see :data:`PRESET_SOURCES` for provenance."""

PRESET_SOURCES: dict[str, str] = {
    "faithdiff": "FaithDiff's training settings: dataloader/train_kernel.yml of github.com/JyChen9811/FaithDiff.",
    "realesrgan": "Real-ESRGAN x4plus: options/train_realesrgan_x4plus.yml of github.com/xinntao/Real-ESRGAN.",
    "dasr-level1": (
        "DASR Level-I (weak, one stage): scripts/data_preparation/create_realsr_validation_set_type1.py of "
        "github.com/csjliang/DASR, equal to `*_weak1` in its options/train/DASR/train_DASR.yml."
    ),
    "dasr-level2": (
        "DASR Level-II (standard, one stage): scripts/data_preparation/create_realsr_validation_set_type2.py of "
        "github.com/csjliang/DASR, equal to `*_standard1` in its options/train/DASR/train_DASR.yml."
    ),
    "dasr-level3": (
        "DASR Level-III (severe, two stages): scripts/data_preparation/create_realsr_validation_set_type3.py of "
        "github.com/csjliang/DASR: Real-ESRGAN x4plus ranges with iso/aniso Gaussian kernels only (0.65/0.35) and "
        "no sinc kernel inside the stages."
    ),
}


def get_preset(name: str) -> DegradationConfig:
    """A fresh copy of the preset ``name`` (one of ``PRESETS``'s keys)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown degradation preset {name!r}; valid presets are {sorted(PRESETS)}.")
    return copy.deepcopy(PRESETS[name])
