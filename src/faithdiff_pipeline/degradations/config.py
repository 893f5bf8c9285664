"""Settings of the degradation model, their validation and YAML round trip, and the named presets.

A :class:`DegradationConfig` holds the settings of the model as a whole and one :class:`StageConfig` (blur, resize,
noise, JPEG) per stage. Real-ESRGAN's option files spell the second stage's settings with a ``2`` (``blur_sigma2``,
``blur_kernel_size2_minimum``); those flat names appear only in the dict and YAML forms, and in the error messages,
which name a setting as an option file spells it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..atomic_files import write_text_atomic
from ..checks import (
    check_bool,
    check_choices,
    check_distribution,
    check_integer,
    check_probability,
    check_range,
    is_number,
)

# Defined here rather than in `.kernels`, which needs torch: the settings (and the presets built from them) can then
# be imported without it.
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
"""The six shaped kernel families of Real-ESRGAN, by the names its option files use."""

RESIZE_MODES = ("area", "bilinear", "bicubic", "nearest")
_SIX_KERNEL_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
# Settings that hold names, whose items are kept as given rather than read as numbers.
_NAME_LISTS = ("kernel_list", "resize_modes")
# The settings of the model as a whole besides `two_stage`, which the dict form derives from `stage2`.
_MODEL_SETTINGS = ("scale", "resize_modes", "second_blur_prob", "final_sinc_prob", "final_resize_first_prob")
# Keys of Real-ESRGAN-style option files that switch off augmentations this model does not implement; a file may
# carry them (FaithDiff's does) as long as they are 0.
_DISABLED_EXTRAS = ("color_jitter_prob", "gray_prob")
# FaithDiff's second stage, where it differs from its first.
_FAITHDIFF_STAGE2 = {
    "blur_sigma": (0.2, 1.5),
    "resize_prob": (0.3, 0.4, 0.3),
    "resize_range": (0.6, 1.2),
    "noise_range": (1.0, 12.0),
    "poisson_scale_range": (0.05, 1.0),
    "jpeg_range": (60.0, 100.0),
}


def _normalise(settings: Any) -> None:
    # YAML and callers hand over lists and ints; storing tuples of floats makes equal settings compare equal wherever
    # they came from.
    for setting in dataclasses.fields(settings):
        value = getattr(settings, setting.name)
        if isinstance(value, (list, tuple)):
            numbers = setting.name not in _NAME_LISTS
            setattr(settings, setting.name, tuple(float(v) if numbers and is_number(v) else v for v in value))


def _option_name(setting: str, stage: int) -> str:
    """The option-file name of a stage's setting: the second stage's adds ``2`` to the setting's name, before the
    ``_minimum`` of ``blur_kernel_size_minimum`` (``blur_kernel_size2_minimum``, as Real-ESRGAN spells it)."""
    if stage == 1:
        return setting
    name, minimum, _ = setting.partition("_minimum")
    return f"{name}{stage}{minimum}"


@dataclass
class StageConfig:
    """The settings of one degradation stage: blur, random resize, noise, JPEG. Defaults are FaithDiff's first stage.

    Ranges are ``(low, high)`` pairs sampled uniformly. The settings are checked by the :class:`DegradationConfig`
    holding the stage, which names them as option files do (``resize_prob2`` for the second stage's ``resize_prob``).

    Attributes:
        blur_kernel_size, blur_kernel_size_minimum: kernel sizes are odd, uniform in [minimum, size], and zero-padded
            to ``blur_kernel_size``.
        kernel_list, kernel_prob: kernel families (see ``KERNEL_TYPES``) and their probabilities.
        sinc_prob: probability that the stage blurs with a sinc kernel instead of a ``kernel_list`` family.
        blur_sigma: range of the kernels' standard deviations, in pixels.
        betag_range, betap_range: shape ranges of the generalised Gaussian and plateau kernels.
        resize_prob, resize_range: (up, down, keep) probabilities and the range of the resize factor; up draws from
            [1, high], down from [low, 1].
        gaussian_noise_prob: probability of Gaussian noise; Poisson noise otherwise.
        noise_range: Gaussian standard deviation range on the 0-255 scale.
        poisson_scale_range: Poisson noise multiplier range.
        gray_noise_prob: probability that the noise is one grey field rather than three colour ones.
        jpeg_range: JPEG quality range.
    """

    # Blur.
    blur_kernel_size: int = 21
    blur_kernel_size_minimum: int = 7
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = _SIX_KERNEL_PROBS
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    # Resize.
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.3, 1.5)
    # Noise.
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 15.0)
    poisson_scale_range: tuple[float, float] = (0.05, 2.0)
    gray_noise_prob: float = 0.4
    # JPEG.
    jpeg_range: tuple[float, float] = (60.0, 95.0)

    def __post_init__(self) -> None:
        _normalise(self)

    @property
    def kernel_sizes(self) -> tuple[int, ...]:
        """The odd kernel sizes the stage draws from, uniformly."""
        return tuple(range(self.blur_kernel_size_minimum, self.blur_kernel_size + 1, 2))

    def validate(self, stage: int = 1) -> None:
        """Raises ValueError naming the first setting out of its domain, by its option name in stage ``stage``."""
        names = {setting.name: _option_name(setting.name, stage) for setting in dataclasses.fields(self)}
        self._validate_blur(names)
        self._validate_resize_noise_jpeg(names)

    def _validate_blur(self, names: dict[str, str]) -> None:
        size = check_integer(self.blur_kernel_size, names["blur_kernel_size"], 1, odd=True)
        minimum = check_integer(self.blur_kernel_size_minimum, names["blur_kernel_size_minimum"], 1, odd=True)
        if minimum > size:
            raise ValueError(
                f"`{names['blur_kernel_size_minimum']}` must be <= `{names['blur_kernel_size']}` ({size}), "
                f"got {minimum}."
            )
        check_choices(self.kernel_list, names["kernel_list"], KERNEL_TYPES, what="kernel types")
        check_distribution(self.kernel_prob, names["kernel_prob"], len(self.kernel_list))
        check_probability(self.sinc_prob, names["sinc_prob"])
        for setting in ("blur_sigma", "betag_range", "betap_range"):
            check_range(getattr(self, setting), names[setting], low=0.0, open_low=True)

    def _validate_resize_noise_jpeg(self, names: dict[str, str]) -> None:
        check_distribution(self.resize_prob, names["resize_prob"], 3)
        low, high = check_range(self.resize_range, names["resize_range"], low=0.0, open_low=True)
        if not low <= 1.0 <= high:
            raise ValueError(
                f"`{names['resize_range']}` must contain 1 (down draws from [low, 1], up from [1, high]), "
                f"got {[low, high]}."
            )
        check_probability(self.gaussian_noise_prob, names["gaussian_noise_prob"])
        check_range(self.noise_range, names["noise_range"], low=0.0)
        check_range(self.poisson_scale_range, names["poisson_scale_range"], low=0.0)
        check_probability(self.gray_noise_prob, names["gray_noise_prob"])
        check_range(self.jpeg_range, names["jpeg_range"], low=1.0, high=100.0)

    def to_options(self, stage: int) -> dict[str, Any]:
        """The settings under their option names in stage ``stage``, in field order."""
        return {_option_name(s.name, stage): getattr(self, s.name) for s in dataclasses.fields(self)}

    @classmethod
    def from_options(cls, options: Mapping[str, Any], stage: int, defaults: StageConfig) -> StageConfig:
        """``defaults`` with the settings of stage ``stage`` found in ``options`` (by their option names)."""
        found = {}
        for setting in dataclasses.fields(cls):
            name = _option_name(setting.name, stage)
            if name in options:
                found[setting.name] = options[name]
        return dataclasses.replace(defaults, **found)


def _faithdiff_stage2() -> StageConfig:
    return StageConfig(**_FAITHDIFF_STAGE2)


@dataclass
class DegradationConfig:
    """Every setting of the second-order (Real-ESRGAN) degradation model. Defaults are FaithDiff's training settings.

    The model runs ``stage1``, then ``stage2`` if there is one (``None`` gives DASR's one-stage levels, where
    ``second_blur_prob`` and ``final_resize_first_prob`` are unused), then the resize to the target size and the
    final sinc filter; in a two-stage model the second stage's JPEG comes before or after that last step.

    Attributes:
        scale: the downscaling factor from HQ to LQ.
        resize_modes: interpolation modes, picked uniformly for every resize.
        stage1: the first stage's settings.
        stage2: the second stage's settings, or None for a one-stage model.
        second_blur_prob: probability that the second stage blurs at all.
        final_sinc_prob: probability of the sinc filter after the resize to the target size; its size is drawn from
            the first stage's kernel sizes, and it is zero-padded to the first stage's ``blur_kernel_size``.
        final_resize_first_prob: probability that [resize to target + sinc] comes before the last JPEG, not after.
    """

    scale: int = 4
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig | None = field(default_factory=_faithdiff_stage2)
    second_blur_prob: float = 0.5
    final_sinc_prob: float = 0.8
    final_resize_first_prob: float = 0.5

    def __post_init__(self) -> None:
        _normalise(self)
        self.validate()

    @property
    def two_stage(self) -> bool:
        """Whether the second stage runs: ``stage2`` is set."""
        return self.stage2 is not None

    @property
    def stages(self) -> tuple[StageConfig, ...]:
        """The stages that run, in order."""
        return (self.stage1,) if self.stage2 is None else (self.stage1, self.stage2)

    def validate(self) -> None:
        """Raises ValueError/TypeError naming the first setting that is out of its domain."""
        check_integer(self.scale, "scale", 1)
        check_choices(self.resize_modes, "resize_modes", RESIZE_MODES)
        for number, stage in enumerate(self.stages, start=1):
            if not isinstance(stage, StageConfig):
                raise TypeError(f"`stage{number}` must be a StageConfig, got {type(stage).__name__}.")
            stage.validate(number)
        check_probability(self.second_blur_prob, "second_blur_prob")
        check_probability(self.final_sinc_prob, "final_sinc_prob")
        check_probability(self.final_resize_first_prob, "final_resize_first_prob")

    # ------------------------------------------------------------------------------------ dict / YAML I/O
    def to_dict(self) -> dict[str, Any]:
        """The settings under Real-ESRGAN's flat option names, as plain Python values (lists for the tuples), ready
        for YAML or JSON.

        ``two_stage`` tells whether there is a second stage. A one-stage config writes FaithDiff's second-stage
        settings all the same (unused), so that every config has the same keys, in the order they have always had:
        a prepared set's stored settings then compare equal to those it was made with.
        """
        stage2 = self.stage2 if self.stage2 is not None else _faithdiff_stage2()
        values = {"scale": self.scale, "two_stage": self.two_stage, "resize_modes": self.resize_modes}
        values.update(self.stage1.to_options(1))
        values["second_blur_prob"] = self.second_blur_prob
        values.update(stage2.to_options(2))
        values["final_sinc_prob"] = self.final_sinc_prob
        values["final_resize_first_prob"] = self.final_resize_first_prob
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DegradationConfig:
        """Settings from a mapping of option names (as :meth:`to_dict` writes); missing keys keep FaithDiff's
        defaults.

        Real-ESRGAN's option layout is accepted as well: kernel settings may sit under a ``kernel_info`` mapping,
        and ``color_jitter_prob``/``gray_prob`` may be present when they are 0. Any other unknown key is a
        ValueError that names it. With ``two_stage: false`` the second stage's settings are checked, then dropped.
        """
        options = _flat_options(values)
        two_stage = check_bool(options.pop("two_stage", True), "two_stage")
        model = {name: options[name] for name in _MODEL_SETTINGS if name in options}
        stage1 = StageConfig.from_options(options, 1, StageConfig())
        stage2 = StageConfig.from_options(options, 2, _faithdiff_stage2())
        config = cls(**model, stage1=stage1, stage2=stage2)
        return config if two_stage else dataclasses.replace(config, stage2=None)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> DegradationConfig:
        """Settings from a YAML file (needs ``pyyaml``); see :meth:`from_dict` for the accepted layout.

        Raises:
            ValueError: one line naming the file, and the line and column of a syntax error.
        """
        from ..yaml_files import read_yaml

        values = read_yaml(path, "Degradation settings file")
        if not isinstance(values, Mapping):
            # The file's content is wrong, not an argument's type.
            raise ValueError(  # noqa: TRY004
                f"{os.fspath(path)!r} must hold a YAML mapping of settings, got {type(values).__name__}."
            )
        return cls.from_dict(values)

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Writes every setting to a YAML file (needs ``pyyaml``) that :meth:`from_yaml` reads back unchanged."""
        import yaml

        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))


def _known_options() -> set[str]:
    stage_settings = [setting.name for setting in dataclasses.fields(StageConfig)]
    return {"two_stage", *_MODEL_SETTINGS, *(_option_name(name, stage) for name in stage_settings for stage in (1, 2))}


def _flat_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``values`` in one flat mapping: ``kernel_info`` merged in, disabled extras dropped, unknown
    keys refused."""
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
    known = _known_options()
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"Unknown degradation settings {unknown}; valid settings are {sorted(known)}.")
    return flat


# ------------------------------------------------------------------------------------------------ presets
# Real-ESRGAN x4plus's ranges, where they differ from FaithDiff's.
_REALESRGAN_STAGE1 = {
    "resize_range": (0.15, 1.5),
    "noise_range": (1.0, 30.0),
    "poisson_scale_range": (0.05, 3.0),
    "jpeg_range": (30.0, 95.0),
}
_REALESRGAN_STAGE2 = {
    **_FAITHDIFF_STAGE2,
    "resize_range": (0.3, 1.2),
    "noise_range": (1.0, 25.0),
    "poisson_scale_range": (0.05, 2.5),
    "jpeg_range": (30.0, 95.0),
}
# DASR draws only isotropic/anisotropic Gaussians and never a sinc kernel inside a stage.
_DASR_KERNELS = {"kernel_list": ("iso", "aniso"), "kernel_prob": (0.65, 0.35), "sinc_prob": 0.0}


def _dasr_one_stage(**stage: Any) -> DegradationConfig:
    """DASR's one-stage levels: one stage of Gaussian kernels, no final sinc filter."""
    first = StageConfig(**_DASR_KERNELS, gaussian_noise_prob=0.5, gray_noise_prob=0.4, **stage)
    return DegradationConfig(stage1=first, stage2=None, final_sinc_prob=0.0)


PRESETS: dict[str, DegradationConfig] = {
    "faithdiff": DegradationConfig(),
    "realesrgan": DegradationConfig(
        stage1=StageConfig(**_REALESRGAN_STAGE1), stage2=StageConfig(**_REALESRGAN_STAGE2), second_blur_prob=0.8
    ),
    "dasr-level1": _dasr_one_stage(
        blur_sigma=(0.2, 0.8),
        resize_prob=(0.1, 0.2, 0.7),
        resize_range=(0.85, 1.2),
        noise_range=(1.0, 10.0),
        poisson_scale_range=(0.05, 0.5),
        jpeg_range=(90.0, 95.0),
    ),
    "dasr-level2": _dasr_one_stage(
        blur_sigma=(0.2, 1.5),
        resize_prob=(0.3, 0.4, 0.3),
        resize_range=(0.5, 1.2),
        noise_range=(1.0, 20.0),
        poisson_scale_range=(0.05, 1.5),
        jpeg_range=(50.0, 95.0),
    ),
    "dasr-level3": DegradationConfig(
        stage1=StageConfig(**_REALESRGAN_STAGE1, **_DASR_KERNELS),
        stage2=StageConfig(**_REALESRGAN_STAGE2, **_DASR_KERNELS),
        second_blur_prob=0.8,
    ),
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


def load_degradation(spec: str | os.PathLike | None) -> DegradationConfig:
    """A degradation model from a preset name or a YAML file; ``None`` gives FaithDiff's training settings. Needs no
    torch, so that a command can check its settings before loading anything.

    Raises:
        ValueError: one line naming the file that is missing or wrong (a syntax error's line and column), or the
            name that is neither a preset nor a file.
    """
    if spec is None:
        return DegradationConfig()
    spec = os.fspath(spec)
    if os.path.isfile(spec) or spec.endswith((".yaml", ".yml")):
        if not os.path.isfile(spec):
            raise ValueError(f"Degradation settings file {spec!r} does not exist.")
        return DegradationConfig.from_yaml(spec)
    if spec not in PRESETS:
        raise ValueError(f"Degradation {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a YAML file.")
    return get_preset(spec)
