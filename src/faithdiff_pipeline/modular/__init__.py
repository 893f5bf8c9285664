"""FaithDiff in diffusers' modular pipelines: its steps as blocks, composed with SDXL's own, and the modular pipeline
that runs them (see docs/modular.md).

Importing this package imports diffusers; ``faithdiff_pipeline`` itself exports its public names lazily.
"""

from .before_denoise import (
    FaithDiffSDXLPrepareLatentsStep,
    FaithDiffSDXLPrepareTilesStep,
    FaithDiffSDXLSetTimestepsStep,
)
from .decoders import FaithDiffSDXLColorFixStep, FaithDiffSDXLPostprocessStep, FaithDiffSDXLVaeDecodeStep
from .denoise import (
    FaithDiffSDXLDenoiseLoopWrapper,
    FaithDiffSDXLDenoiseStep,
    FaithDiffSDXLLoopBlendTiles,
    FaithDiffSDXLLoopGuidance,
    FaithDiffSDXLLoopTileDenoiser,
)
from .encoders import (
    FaithDiffSDXLCaptionStep,
    FaithDiffSDXLImageStep,
    FaithDiffSDXLLQFeaturesStep,
    FaithDiffSDXLPromptEmbedsStep,
    FaithDiffSDXLPromptStep,
)
from .modular_blocks_faithdiff_sdxl import (
    FaithDiffSDXLAutoBlocks,
    FaithDiffSDXLAutoCaptionStep,
    FaithDiffSDXLAutoTextEncoderStep,
)
from .modular_pipeline import FaithDiffSDXLModularPipeline

__all__ = [
    "FaithDiffSDXLAutoBlocks",
    "FaithDiffSDXLAutoCaptionStep",
    "FaithDiffSDXLAutoTextEncoderStep",
    "FaithDiffSDXLCaptionStep",
    "FaithDiffSDXLColorFixStep",
    "FaithDiffSDXLDenoiseLoopWrapper",
    "FaithDiffSDXLDenoiseStep",
    "FaithDiffSDXLImageStep",
    "FaithDiffSDXLLQFeaturesStep",
    "FaithDiffSDXLLoopBlendTiles",
    "FaithDiffSDXLLoopGuidance",
    "FaithDiffSDXLLoopTileDenoiser",
    "FaithDiffSDXLModularPipeline",
    "FaithDiffSDXLPostprocessStep",
    "FaithDiffSDXLPrepareLatentsStep",
    "FaithDiffSDXLPrepareTilesStep",
    "FaithDiffSDXLPromptEmbedsStep",
    "FaithDiffSDXLPromptStep",
    "FaithDiffSDXLSetTimestepsStep",
    "FaithDiffSDXLVaeDecodeStep",
]
