"""FaithDiff's blocks composed: the optional caption, prompts or given embeddings, and the whole restoration."""

from __future__ import annotations

import os
from typing import Any

from diffusers.modular_pipelines import AutoPipelineBlocks, ConditionalPipelineBlocks, SequentialPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import OutputParam
from diffusers.modular_pipelines.stable_diffusion_xl.before_denoise import StableDiffusionXLInputStep
from diffusers.modular_pipelines.stable_diffusion_xl.encoders import StableDiffusionXLTextEncoderStep

from .before_denoise import (
    FaithDiffSDXLPrepareLatentsStep,
    FaithDiffSDXLPrepareTilesStep,
    FaithDiffSDXLSetTimestepsStep,
)
from .decoders import FaithDiffSDXLColorFixStep, FaithDiffSDXLPostprocessStep, FaithDiffSDXLVaeDecodeStep
from .denoise import FaithDiffSDXLDenoiseStep
from .encoders import (
    FaithDiffSDXLCaptionStep,
    FaithDiffSDXLImageStep,
    FaithDiffSDXLLQFeaturesStep,
    FaithDiffSDXLPromptEmbedsStep,
    FaithDiffSDXLPromptStep,
)
from .pipeline_facts import REQUIREMENTS


class FaithDiffSDXLAutoCaptionStep(ConditionalPipelineBlocks):
    block_classes = [FaithDiffSDXLCaptionStep]
    block_names = ["caption"]
    block_trigger_inputs = ["prompt", "prompt_embeds"]

    @property
    def description(self) -> str:
        return (
            "Captions the images when neither `prompt` nor `prompt_embeds` is given (with the pipeline's captioner, "
            "if it has one); skipped otherwise.\n"
            " - `FaithDiffSDXLCaptionStep` (caption) runs when neither is given."
        )

    def select_block(self, prompt: object = None, prompt_embeds: object = None) -> str | None:
        return "caption" if prompt is None and prompt_embeds is None else None


class FaithDiffSDXLAutoTextEncoderStep(AutoPipelineBlocks):
    block_classes = [FaithDiffSDXLPromptEmbedsStep, StableDiffusionXLTextEncoderStep]
    block_names = ["prompt_embeds", "text_encoder"]
    block_trigger_inputs = ["prompt_embeds", None]

    @property
    def description(self) -> str:
        return (
            "Text embeddings of the prompts.\n"
            " - `FaithDiffSDXLPromptEmbedsStep` (prompt_embeds) takes given `prompt_embeds`.\n"
            " - `StableDiffusionXLTextEncoderStep` (text_encoder), SDXL's own, encodes the prompts otherwise."
        )


class FaithDiffSDXLAutoBlocks(SequentialPipelineBlocks):
    """
    FaithDiff image restoration and super-resolution with SDXL, block by block: the LQ images prepared as the release
    prepares them, optionally captioned, the prompts encoded by SDXL's text encoder step, the LQ features, the start
    latents, the tiled denoising loop with the alignment module, and the decoding with the colour fix.

    Its inputs are [`FaithDiffSDXLPipeline`]'s arguments, under their names; the restored images are ``images``.
    """

    block_classes = [
        FaithDiffSDXLImageStep,
        FaithDiffSDXLAutoCaptionStep,
        FaithDiffSDXLPromptStep,
        FaithDiffSDXLAutoTextEncoderStep,
        StableDiffusionXLInputStep,
        FaithDiffSDXLLQFeaturesStep,
        FaithDiffSDXLSetTimestepsStep,
        FaithDiffSDXLPrepareLatentsStep,
        FaithDiffSDXLPrepareTilesStep,
        FaithDiffSDXLDenoiseStep,
        FaithDiffSDXLVaeDecodeStep,
        FaithDiffSDXLColorFixStep,
        FaithDiffSDXLPostprocessStep,
    ]
    block_names = [
        "image",
        "caption",
        "prompt",
        "text_encoder",
        "input",
        "lq_features",
        "set_timesteps",
        "prepare_latents",
        "prepare_tiles",
        "denoise",
        "decode",
        "color_fix",
        "postprocess",
    ]
    _requirements = REQUIREMENTS
    # The trigger inputs of each workflow: a caption when no prompt is given, the prompts encoded, or given embeddings.
    _workflow_map = {
        "captioned": {"image": True},
        "prompted": {"image": True, "prompt": True},
        "embeddings": {"image": True, "prompt_embeds": True},
    }

    @property
    def description(self) -> str:
        return (
            "FaithDiff image restoration and super-resolution with SDXL: prepare the LQ images, caption them "
            "(optional), encode the prompts (SDXL's text encoder step), LQ features, start latents, the tiled "
            "denoising loop with the alignment module, decoding and the colour fix"
        )

    @property
    def outputs(self) -> list[OutputParam]:
        return [OutputParam.template("images", note="restored, in `output_type`")]

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        r"""
        Writes ``modular_config.json`` as [`~ConfigMixin.save_config`] does, with the module its ``auto_map`` names
        beside it: a few lines that import these blocks from the installed package. So
        ``blocks.save_pretrained(folder)``, diffusers' way of sharing blocks, writes a folder that
        ``ModularPipeline.from_pretrained(folder, trust_remote_code=True)`` runs, and ``push_to_hub`` uploads both.

        ``save_pretrained`` itself is diffusers': it names the blocks' loader in ``auto_map`` after the class that
        defines ``save_pretrained``, so overriding it would hide the blocks from ``ModularPipelineBlocks``.
        """
        from ..hub import write_blocks_code

        os.makedirs(save_directory, exist_ok=True)
        write_blocks_code(save_directory, type(self))
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)
