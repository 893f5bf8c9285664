"""FaithDiff image restoration as a diffusers pipeline."""

from .alignment import FaithDiffAlignmentModel, aligned_conv_in
from .color_fix import adain_color_fix, apply_color_fix, wavelet_color_fix
from .conversion import convert_official_release, converted_release
from .lq_features import FaithDiffLQEncoder, encoder_mid_block_features
from .pipeline_faithdiff_sdxl import FaithDiffPipelineOutput, FaithDiffSDXLPipeline

__all__ = [
    "FaithDiffAlignmentModel",
    "FaithDiffLQEncoder",
    "FaithDiffPipelineOutput",
    "FaithDiffSDXLPipeline",
    "adain_color_fix",
    "aligned_conv_in",
    "apply_color_fix",
    "convert_official_release",
    "converted_release",
    "encoder_mid_block_features",
    "wavelet_color_fix",
]
__version__ = "0.1.0"
