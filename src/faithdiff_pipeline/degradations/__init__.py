"""A Real-ESRGAN-style second-order degradation model in torch, with FaithDiff's training settings by default.

``degrade(hq, config, generator)`` turns a batch of high-quality images into low-quality ones by two rounds of
blur, resize, noise and JPEG compression, then a resize to the target size with an optional sinc filter. See
``docs/degradations.md`` for the model, the presets and their sources.

The public names are imported on first use, so that the presets can be listed (``faithdiff-prepare-data --help``)
without loading torch.
"""

from typing import TYPE_CHECKING, Any

from .._imports import export_table, lazy_export

_import_structure = {
    "config": ["PRESET_SOURCES", "PRESETS", "RESIZE_MODES", "DegradationConfig", "StageConfig", "get_preset"],
    "jpeg": ["jpeg_compress", "jpeg_quantization_tables"],
    "kernels": [
        "KERNEL_TYPES",
        "KernelSpec",
        "gaussian_kernel",
        "generalized_gaussian_kernel",
        "plateau_kernel",
        "pulse_kernel",
        "sample_kernel_spec",
        "sample_sinc_spec",
        "sinc_kernel",
    ],
    "noise": ["gaussian_noise", "poisson_noise"],
    "pipeline": [
        "DegradationPlan",
        "NoiseSpec",
        "ResizeSpec",
        "SampleDegradation",
        "apply_degradation_plan",
        "degrade",
        "filter2d",
        "sample_degradation_plan",
        "to_pil",
    ],
}
_exports = export_table(_import_structure)

# Spelled out for static tools; tests/test_startup.py checks it against the export table.
__all__ = [
    "KERNEL_TYPES",
    "PRESETS",
    "PRESET_SOURCES",
    "RESIZE_MODES",
    "DegradationConfig",
    "DegradationPlan",
    "KernelSpec",
    "NoiseSpec",
    "ResizeSpec",
    "SampleDegradation",
    "StageConfig",
    "apply_degradation_plan",
    "degrade",
    "filter2d",
    "gaussian_kernel",
    "gaussian_noise",
    "generalized_gaussian_kernel",
    "get_preset",
    "jpeg_compress",
    "jpeg_quantization_tables",
    "plateau_kernel",
    "poisson_noise",
    "pulse_kernel",
    "sample_degradation_plan",
    "sample_kernel_spec",
    "sample_sinc_spec",
    "sinc_kernel",
    "to_pil",
]

if TYPE_CHECKING:
    from .config import PRESET_SOURCES, PRESETS, RESIZE_MODES, DegradationConfig, StageConfig, get_preset
    from .jpeg import jpeg_compress, jpeg_quantization_tables
    from .kernels import (
        KERNEL_TYPES,
        KernelSpec,
        gaussian_kernel,
        generalized_gaussian_kernel,
        plateau_kernel,
        pulse_kernel,
        sample_kernel_spec,
        sample_sinc_spec,
        sinc_kernel,
    )
    from .noise import gaussian_noise, poisson_noise
    from .pipeline import (
        DegradationPlan,
        NoiseSpec,
        ResizeSpec,
        SampleDegradation,
        apply_degradation_plan,
        degrade,
        filter2d,
        sample_degradation_plan,
        to_pil,
    )


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _exports, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_exports})
