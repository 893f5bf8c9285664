"""FaithDiff's denoising loop as loop blocks: SDXL's input scaling, the UNet over the latent tiles with the alignment
module, classifier-free guidance per UNet call, the Gaussian blend of the tiles, and SDXL's scheduler step."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models import UNet2DConditionModel
from diffusers.modular_pipelines import BlockState, ModularPipeline, ModularPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam, OutputParam
from diffusers.modular_pipelines.stable_diffusion_xl.denoise import (
    StableDiffusionXLDenoiseLoopWrapper,
    StableDiffusionXLLoopAfterDenoiser,
    StableDiffusionXLLoopBeforeDenoiser,
)

from .. import release_settings as release
from .. import tiled_denoising
from ..alignment import FaithDiffAlignmentModel
from ..tiled_denoising import TileBatch
from ..tiling import LatentTiling
from .pipeline_facts import MODEL_NAME, REQUIREMENTS

_LOOP_NOTE = "This block is a step of the loop of a LoopSequentialPipelineBlocks (FaithDiffSDXLDenoiseStep)."


class FaithDiffSDXLLoopTileDenoiser(ModularPipelineBlocks):
    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return (
            "Predicts the noise of every latent tile: one UNet call per tile batch, all CFG copies in it, the "
            "alignment module fusing each tile's LQ condition after the UNet's conv_in. It reads `scaled_latents`, "
            f"which the loop's before_denoiser sets at each step. {_LOOP_NOTE}"
        )

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec("unet", UNet2DConditionModel), ComponentSpec("alignment", FaithDiffAlignmentModel)]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("tiling", type_hint=LatentTiling, required=True, description="The latent tiles."),
            InputParam("tile_batches", type_hint=list[TileBatch], required=True, description="The UNet calls."),
            InputParam(
                "cross_attention_kwargs",
                type_hint=dict[str, Any] | None,
                description="Passed to the UNet's attention processors (e.g. LoRA `scale`).",
            ),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam(
                "tile_noise",
                type_hint=list[torch.Tensor],
                description="Each tile batch's noise prediction, float32, laid out like its rows (every CFG copy).",
            )
        ]

    @torch.no_grad()
    def __call__(
        self, components: ModularPipeline, block_state: BlockState, i: int, t: torch.Tensor
    ) -> tuple[ModularPipeline, BlockState]:
        unet = components.unet
        tiling = block_state.tiling
        block_state.tile_noise = [
            tiled_denoising.tile_noise(
                unet,
                components.alignment,
                torch.cat([tiling.crop(block_state.scaled_latents, batch.indices)] * batch.cfg_copies).to(unet.dtype),
                t,
                batch,
                block_state.cross_attention_kwargs,
            )
            for batch in block_state.tile_batches
        ]
        return components, block_state


class FaithDiffSDXLLoopGuidance(ModularPipelineBlocks):
    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return (
            "Classifier-free guidance of each tile batch's prediction: uncond + guidance_scale * (cond - uncond), "
            f"rescaled by `guidance_rescale`; a batch without guidance passes unchanged. {_LOOP_NOTE}"
        )

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("tile_noise", type_hint=list[torch.Tensor], required=True, description="Per tile batch."),
            InputParam("tile_batches", type_hint=list[TileBatch], required=True, description="The UNet calls."),
            InputParam(
                "guidance_scale",
                type_hint=float,
                default=release.GUIDANCE_SCALE,
                description="Classifier-free guidance scale; <= 1 disables guidance.",
            ),
            InputParam(
                "guidance_rescale",
                type_hint=float,
                default=0.0,
                description="Guidance rescale factor (Lin et al. 2023); 0 disables it.",
            ),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam(
                "guided_tile_noise",
                type_hint=list[torch.Tensor],
                description="Each tile batch's guided prediction, one row per tile and sample.",
            )
        ]

    @torch.no_grad()
    def __call__(
        self, components: ModularPipeline, block_state: BlockState, i: int, t: torch.Tensor
    ) -> tuple[ModularPipeline, BlockState]:
        block_state.guided_tile_noise = [
            tiled_denoising.guided_noise(
                noise, batch.cfg_copies, block_state.guidance_scale, block_state.guidance_rescale
            )
            for noise, batch in zip(block_state.tile_noise, block_state.tile_batches)
        ]
        return components, block_state


class FaithDiffSDXLLoopBlendTiles(ModularPipelineBlocks):
    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return f"Blends the tiles' guided predictions into one of the whole latent, with Gaussian weights. {_LOOP_NOTE}"

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("latents", type_hint=torch.Tensor, required=True, description="The current latents."),
            InputParam("tiling", type_hint=LatentTiling, required=True, description="The latent tiles."),
            InputParam("tile_batches", type_hint=list[TileBatch], required=True, description="The UNet calls."),
            InputParam(
                "guided_tile_noise", type_hint=list[torch.Tensor], required=True, description="Per tile batch."
            ),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam(
                "noise_pred",
                type_hint=torch.Tensor,
                description="The guided noise prediction of the whole latent, for the scheduler step.",
            )
        ]

    @torch.no_grad()
    def __call__(
        self, components: ModularPipeline, block_state: BlockState, i: int, t: torch.Tensor
    ) -> tuple[ModularPipeline, BlockState]:
        tiling = block_state.tiling
        total = torch.zeros_like(block_state.latents)
        for noise, batch in zip(block_state.guided_tile_noise, block_state.tile_batches):
            tiling.accumulate(total, noise, batch.indices)
        block_state.noise_pred = total / tiling.weight_sum
        return components, block_state


class FaithDiffSDXLDenoiseLoopWrapper(StableDiffusionXLDenoiseLoopWrapper):
    """SDXL's loop over the timesteps (progress bar included), for FaithDiff's loop blocks."""

    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return (
            "Denoises the latents over `timesteps`, running its sub-blocks at each step; replace one of "
            "`sub_blocks` to change that part of the step"
        )


class FaithDiffSDXLDenoiseStep(FaithDiffSDXLDenoiseLoopWrapper):
    block_classes = [
        StableDiffusionXLLoopBeforeDenoiser,
        FaithDiffSDXLLoopTileDenoiser,
        FaithDiffSDXLLoopGuidance,
        FaithDiffSDXLLoopBlendTiles,
        StableDiffusionXLLoopAfterDenoiser,
    ]
    block_names = ["before_denoiser", "denoiser", "guidance", "blend", "after_denoiser"]

    @property
    def description(self) -> str:
        return (
            "Denoises the latents over `timesteps`, each step: \n"
            " - `StableDiffusionXLLoopBeforeDenoiser` (before_denoiser) scales the latents for the UNet\n"
            " - `FaithDiffSDXLLoopTileDenoiser` (denoiser) predicts the noise of every tile with the alignment\n"
            " - `FaithDiffSDXLLoopGuidance` (guidance) applies classifier-free guidance per UNet call\n"
            " - `FaithDiffSDXLLoopBlendTiles` (blend) blends the tiles' predictions with Gaussian weights\n"
            " - `StableDiffusionXLLoopAfterDenoiser` (after_denoiser) takes the scheduler step"
        )
