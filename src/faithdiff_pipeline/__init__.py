"""FaithDiff image restoration as a diffusers pipeline.

The public names are imported on first use, so that ``import faithdiff_pipeline`` (and every command's ``--help``)
stays fast and does not load torch, diffusers or transformers.
"""

from typing import TYPE_CHECKING, Any

from ._imports import export_table, lazy_export, quiet_diffusers_import_notices

__version__ = "0.1.0"

_import_structure = {
    "alignment": ["FaithDiffAlignmentModel", "aligned_conv_in"],
    "attention_maps": ["AttentionMapRecorder"],
    "color_fix": ["adain_color_fix", "apply_color_fix", "wavelet_color_fix"],
    "conversion": ["convert_official_release", "converted_release"],
    "fidelity": ["FidelityReport", "measure_fidelity", "restore_with_seeds"],
    "lq_features": ["FaithDiffLQEncoder", "encoder_mid_block_features"],
    "modular": ["FaithDiffSDXLAutoBlocks", "FaithDiffSDXLModularPipeline"],
    "pipeline_faithdiff_sdxl": ["FaithDiffPipelineOutput", "FaithDiffSDXLPipeline"],
}
_exports = export_table(_import_structure)

# Spelled out for static tools; tests/test_startup.py checks it against the export table.
__all__ = [
    "AttentionMapRecorder",
    "FaithDiffAlignmentModel",
    "FaithDiffLQEncoder",
    "FaithDiffPipelineOutput",
    "FaithDiffSDXLAutoBlocks",
    "FaithDiffSDXLModularPipeline",
    "FaithDiffSDXLPipeline",
    "FidelityReport",
    "adain_color_fix",
    "aligned_conv_in",
    "apply_color_fix",
    "convert_official_release",
    "converted_release",
    "encoder_mid_block_features",
    "measure_fidelity",
    "restore_with_seeds",
    "wavelet_color_fix",
]

# Before any submodule can import diffusers: whichever of them comes first, its import stays quiet.
quiet_diffusers_import_notices()

if TYPE_CHECKING:
    from .alignment import FaithDiffAlignmentModel, aligned_conv_in
    from .attention_maps import AttentionMapRecorder
    from .color_fix import adain_color_fix, apply_color_fix, wavelet_color_fix
    from .conversion import convert_official_release, converted_release
    from .fidelity import FidelityReport, measure_fidelity, restore_with_seeds
    from .lq_features import FaithDiffLQEncoder, encoder_mid_block_features
    from .modular import FaithDiffSDXLAutoBlocks, FaithDiffSDXLModularPipeline
    from .pipeline_faithdiff_sdxl import FaithDiffPipelineOutput, FaithDiffSDXLPipeline


def __getattr__(name: str) -> Any:
    return lazy_export(__name__, _exports, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_exports})
