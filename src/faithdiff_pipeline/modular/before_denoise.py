"""FaithDiff's blocks before the denoising loop: the timesteps (SDXL's step, with FaithDiff's defaults), the start
latents, and the latent tiles with the conditioning of each UNet call."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.modular_pipelines import ModularPipeline, ModularPipelineBlocks, PipelineState
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam, OutputParam
from diffusers.modular_pipelines.stable_diffusion_xl.before_denoise import StableDiffusionXLSetTimestepsStep
from diffusers.schedulers import EulerDiscreteScheduler

from .. import release_settings as release
from .. import tiled_denoising
from ..alignment import FaithDiffAlignmentModel
from ..checks import check_integer, check_tile_arguments
from ..latents import check_start_point, start_latents
from ..tiled_denoising import TileBatch
from ..tiling import LatentTiling
from .pipeline_facts import MODEL_NAME, REQUIREMENTS, does_guidance, vae_scale_factor


class FaithDiffSDXLSetTimestepsStep(StableDiffusionXLSetTimestepsStep):
    """SDXL's own timestep step, with the release's number of steps as the default."""

    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return "Sets the scheduler's timesteps (SDXL's step; the release samples 20 Euler steps)"

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam(
                "num_inference_steps",
                type_hint=int,
                default=release.NUM_INFERENCE_STEPS,
                description="Denoising steps.",
            ),
            InputParam("timesteps", type_hint=list[int] | None, description="Custom timesteps, where accepted."),
            InputParam("sigmas", type_hint=list[float] | None, description="Custom sigmas, where accepted."),
            InputParam(
                "denoising_end",
                type_hint=float | None,
                description="Fraction of the schedule after which denoising stops (SDXL's).",
            ),
        ]


class FaithDiffSDXLPrepareLatentsStep(ModularPipelineBlocks):
    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return (
            "Prepares the latents denoising starts from: for `start_point='lr'` (the release's) the VAE latent of "
            "the upscaled image noised to t = 999 by a DDPM step, for 'noise' the noise alone, scaled by the "
            "scheduler's init_noise_sigma"
        )

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec("vae", AutoencoderKL), ComponentSpec("scheduler", EulerDiscreteScheduler)]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("lq_image", type_hint=torch.Tensor, required=True, description="The prepared LQ images."),
            InputParam(
                "batch_size",
                type_hint=int,
                required=True,
                description="Prompts (one per image), from the input step.",
            ),
            InputParam("num_images_per_prompt", type_hint=int, default=1, description="Restorations per image."),
            InputParam(
                "start_point",
                type_hint=str,
                default=release.START_POINT,
                description="'lr': the noised VAE latent of the upscaled input (the release's); 'noise': pure noise.",
            ),
            InputParam(
                "generator",
                type_hint=torch.Generator | list[torch.Generator] | None,
                description="Seeds the noise and the VAE's sample; a list gives one per output.",
            ),
            InputParam(
                "latents",
                type_hint=torch.Tensor | None,
                description="The standard-normal noise to use, [samples, 4, H_pad / 8, W_pad / 8].",
            ),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam(
                "latents",
                type_hint=torch.Tensor,
                description="The latents denoising starts from, float32, at the padded size.",
            )
        ]

    @staticmethod
    def check_inputs(block_state: Any) -> None:
        check_start_point(block_state.start_point)
        check_integer(block_state.num_images_per_prompt, "num_images_per_prompt", 1)
        images = block_state.lq_image.shape[0]
        if block_state.batch_size != images:
            raise ValueError(
                f"`prompt_embeds` has batch size {block_state.batch_size}, expected one per image ({images})."
            )

    @torch.no_grad()
    def __call__(self, components: ModularPipeline, state: PipelineState) -> tuple[ModularPipeline, PipelineState]:
        block_state = self.get_block_state(state)
        self.check_inputs(block_state)
        block_state.latents = start_latents(
            components.vae,
            components.scheduler,
            block_state.lq_image.to(components._execution_device),
            block_state.batch_size * block_state.num_images_per_prompt,
            block_state.start_point,
            block_state.generator,
            block_state.latents,
            components._execution_device,
            vae_scale_factor(components),
        )
        self.set_block_state(state, block_state)
        return components, state


class FaithDiffSDXLPrepareTilesStep(ModularPipelineBlocks):
    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return (
            "Splits the latent into the release's overlapping tiles and lays out the conditioning of each UNet call: "
            "the alignment condition embedded on each tile's crop of the LQ features, the prompt embeddings, and "
            "SDXL's micro-conditioning with each tile's offset. Built once for the whole loop; `lq_features` is "
            "released from the state afterwards, as FaithDiffSDXLPipeline releases it (the tiles hold what the loop "
            "needs)"
        )

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec("alignment", FaithDiffAlignmentModel), ComponentSpec("unet", UNet2DConditionModel)]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("latents", type_hint=torch.Tensor, required=True, description="The start latents."),
            InputParam("lq_image", type_hint=torch.Tensor, required=True, description="The prepared LQ images."),
            InputParam("lq_features", type_hint=torch.Tensor, required=True, description="LQ features per sample."),
            InputParam(
                "tile_size",
                type_hint=int,
                default=release.TILE_SIZE,
                description="Size in pixels of the square latent tiles (clamped to the image); a multiple of 8, >= 64.",
            ),
            InputParam(
                "tile_stride",
                type_hint=int | None,
                description="Pixels between tiles; the release's half tile by default. A multiple of 8, <= tile_size.",
            ),
            InputParam(
                "tile_batch_size",
                type_hint=int,
                default=release.TILE_BATCH_SIZE,
                description="Most tiles in one UNet call (the tiles are split into even batches).",
            ),
            InputParam(
                "guidance_scale",
                type_hint=float,
                default=release.GUIDANCE_SCALE,
                description="Classifier-free guidance scale; <= 1 disables guidance.",
            ),
            InputParam("prompt_embeds", type_hint=torch.Tensor, required=True, description="Text embeddings."),
            InputParam("pooled_prompt_embeds", type_hint=torch.Tensor, required=True, description="Pooled ones."),
            InputParam("negative_prompt_embeds", type_hint=torch.Tensor | None, description="With guidance."),
            InputParam("negative_pooled_prompt_embeds", type_hint=torch.Tensor | None, description="With guidance."),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam("tiling", type_hint=LatentTiling, description="The latent tiles and their blending weights."),
            OutputParam(
                "tile_batches",
                type_hint=list[TileBatch],
                description="The UNet calls of one step, each with its tiles' conditioning laid out row for row.",
            ),
        ]

    @staticmethod
    def check_inputs(block_state: Any, guided: bool) -> None:
        check_integer(block_state.tile_batch_size, "tile_batch_size", 1)
        check_tile_arguments(block_state.tile_size, block_state.tile_stride)
        if guided and (block_state.negative_prompt_embeds is None or block_state.negative_pooled_prompt_embeds is None):
            raise ValueError(
                "Guidance (`guidance_scale` > 1) needs `negative_prompt_embeds` and `negative_pooled_prompt_embeds`; "
                "the text encoder step makes them while the pipeline's `guider` has guidance on."
            )

    @torch.no_grad()
    def __call__(self, components: ModularPipeline, state: PipelineState) -> tuple[ModularPipeline, PipelineState]:
        block_state = self.get_block_state(state)
        guided = does_guidance(components, block_state.guidance_scale)
        self.check_inputs(block_state, guided)
        samples = block_state.latents.shape[0]
        prompt_embeds, text_embeds = block_state.prompt_embeds, block_state.pooled_prompt_embeds
        time_ids = tiled_denoising.add_time_ids(
            tuple(block_state.lq_image.shape[-2:]), block_state.tile_size, samples, components._execution_device
        )
        if guided:
            prompt_embeds = torch.cat([block_state.negative_prompt_embeds, prompt_embeds])
            text_embeds = torch.cat([block_state.negative_pooled_prompt_embeds, text_embeds])
            time_ids = torch.cat([time_ids, time_ids])
        block_state.tiling = tiled_denoising.latent_tiling(
            block_state.latents, block_state.tile_size, block_state.tile_stride, vae_scale_factor(components)
        )
        block_state.tile_batches = tiled_denoising.build_tile_batches(
            block_state.tiling,
            block_state.tile_batch_size,
            components.alignment,
            components.unet.dtype,
            2 if guided else 1,
            block_state.lq_features,
            prompt_embeds,
            text_embeds,
            time_ids,
        )
        block_state.lq_features = None
        self.set_block_state(state, block_state)
        return components, state
