"""FaithDiff's blocks after the denoising loop: decoding to the unpadded size, the colour fix against the upscaled
input, and the images in the asked output type."""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import AutoencoderKL
from diffusers.modular_pipelines import ModularPipeline, ModularPipelineBlocks, PipelineState
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam, OutputParam

from .. import release_settings as release
from ..color_fix import apply_color_fix
from ..latents import decode_latents
from .pipeline_facts import MODEL_NAME, OUTPUT_TYPES, REQUIREMENTS, passed_as_none

LATENT = "latent"
Images = list[PIL.Image.Image] | np.ndarray | torch.Tensor


def _output_type_input() -> InputParam:
    return InputParam(
        "output_type",
        type_hint=str,
        default="pil",
        description="'pil', 'np', 'pt' (images in [0, 1]) or 'latent' (the final latents, not decoded).",
    )


class FaithDiffSDXLVaeDecodeStep(ModularPipelineBlocks):
    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return (
            "Decodes the denoised latents with the VAE (a float16 VAE that asks for it upcast) into images in "
            "[0, 1], and crops the padding away; with output_type='latent' the latents pass unchanged"
        )

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec("vae", AutoencoderKL)]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("latents", type_hint=torch.Tensor, required=True, description="The denoised latents."),
            InputParam(
                "output_size", type_hint=tuple[int, int], required=True, description="(height, width) of the results."
            ),
            _output_type_input(),
            InputParam(
                "generator",
                type_hint=torch.Generator | list[torch.Generator] | None,
                description="Seeds a VAE whose decoder samples (ConsistencyDecoderVAE).",
            ),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam(
                "images",
                type_hint=torch.Tensor,
                description="The decoded images, [samples, 3, height, width] float32 in [0, 1] (or the latents).",
            )
        ]

    @staticmethod
    def check_inputs(block_state: Any) -> None:
        if block_state.output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {block_state.output_type!r}.")

    @torch.no_grad()
    def __call__(self, components: ModularPipeline, state: PipelineState) -> tuple[ModularPipeline, PipelineState]:
        block_state = self.get_block_state(state)
        self.check_inputs(block_state)
        block_state.images = block_state.latents
        if block_state.output_type != LATENT:
            height, width = block_state.output_size
            decoded = decode_latents(components.vae, block_state.latents, block_state.generator)
            block_state.images = decoded[..., :height, :width]
        self.set_block_state(state, block_state)
        return components, state


class FaithDiffSDXLColorFixStep(ModularPipelineBlocks):
    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return (
            "Corrects the colours of the decoded images against the LANCZOS-upscaled input (the release's AdaIN, or "
            "the wavelet fix), clamped to [0, 1]; None leaves them as decoded"
        )

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("images", type_hint=torch.Tensor, required=True, description="Decoded images in [0, 1]."),
            InputParam(
                "lq_reference",
                type_hint=torch.Tensor,
                required=True,
                description="The upscaled inputs in [0, 1], one per image.",
            ),
            InputParam(
                "color_fix",
                type_hint=str | None,
                default=release.COLOR_FIX,
                description=f"One of {release.COLOR_FIXES}, or None for none.",
            ),
            InputParam("num_images_per_prompt", type_hint=int, default=1, description="Restorations per image."),
            _output_type_input(),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("images", type_hint=torch.Tensor, description="The colour-fixed images in [0, 1].")]

    @torch.no_grad()
    def __call__(self, components: ModularPipeline, state: PipelineState) -> tuple[ModularPipeline, PipelineState]:
        block_state = self.get_block_state(state)
        method = None if passed_as_none(state, "color_fix") else block_state.color_fix
        if block_state.output_type != LATENT:
            reference = block_state.lq_reference.repeat_interleave(block_state.num_images_per_prompt, dim=0)
            block_state.images = apply_color_fix(block_state.images, reference, method)
        self.set_block_state(state, block_state)
        return components, state


class FaithDiffSDXLPostprocessStep(ModularPipelineBlocks):
    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return "Gives the images in `output_type`: PIL images, a numpy array or a tensor, all in [0, 1]"

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [
            ComponentSpec(
                "image_processor",
                VaeImageProcessor,
                config=FrozenDict({"vae_scale_factor": 8}),
                default_creation_method="from_config",
            )
        ]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("images", type_hint=torch.Tensor, required=True, description="Images in [0, 1]."),
            _output_type_input(),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam(
                "images",
                type_hint=Images,
                description="The restored images in `output_type` ('latent': the final latents, at the padded size).",
            )
        ]

    @torch.no_grad()
    def __call__(self, components: ModularPipeline, state: PipelineState) -> tuple[ModularPipeline, PipelineState]:
        block_state = self.get_block_state(state)
        if block_state.output_type != LATENT:
            samples = block_state.images.shape[0]
            block_state.images = components.image_processor.postprocess(
                block_state.images, output_type=block_state.output_type, do_denormalize=[False] * samples
            )
        self.set_block_state(state, block_state)
        return components, state
