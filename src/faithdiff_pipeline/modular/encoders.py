"""FaithDiff's input blocks: the LQ images as the release prepares them, the optional caption, one prompt per image,
given prompt embeddings, and the LQ features the alignment module reads."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.modular_pipelines import ModularPipeline, ModularPipelineBlocks, PipelineState
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam, OutputParam
from diffusers.modular_pipelines.stable_diffusion_xl.encoders import StableDiffusionXLTextEncoderStep
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedModel,
    ProcessorMixin,
)

from .. import release_settings as release
from ..alignment import FaithDiffAlignmentModel
from ..captioning import caption_lq_images
from ..checks import is_integer
from ..lq_features import FaithDiffLQEncoder, compute_lq_features
from ..pipeline_faithdiff_sdxl import prompts_per_image
from ..preprocessing import LQImage, prepare_lq_images
from .pipeline_facts import (
    MODEL_NAME,
    REQUIREMENTS,
    does_guidance,
    min_output_size,
    passed_as_none,
    vae_scale_factor,
)

# The release encodes a missing negative prompt as a real empty prompt, never as zeros.
EMPTY_PROMPT = ""


class FaithDiffSDXLImageStep(ModularPipelineBlocks):
    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return (
            "Prepares the low-quality images as the release does: read (upright, sRGB, 16-bit kept), upscaled by "
            "`upscale` with LANCZOS, and padded with their edge pixels to a multiple of the VAE's scale (and to the "
            "smallest size the UNet runs on)"
        )

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec("vae", AutoencoderKL), ComponentSpec("unet", UNet2DConditionModel)]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam(
                "image",
                type_hint=LQImage | list[LQImage],
                required=True,
                description=(
                    "The low-quality image(s), in sRGB: PIL images, [H, W, 3] arrays (uint8, uint16, or float in "
                    "[0, 1]), [3, H, W] tensors or a [B, 3, H, W] batch in [0, 1], or file paths. All of one size."
                ),
            ),
            InputParam(
                "upscale",
                type_hint=float,
                default=release.UPSCALE,
                description="Scale factor; the images are resized by it with LANCZOS before restoring.",
            ),
            InputParam(
                "max_output_pixels",
                type_hint=int | None,
                default=release.MAX_OUTPUT_PIXELS,
                description="Largest result (width x height) accepted, checked before allocating; None: no limit.",
            ),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam(
                "lq_image",
                type_hint=torch.Tensor,
                description="The upscaled images, padded, in [-1, 1]: [images, 3, H_pad, W_pad] float32.",
            ),
            OutputParam(
                "lq_reference",
                type_hint=torch.Tensor,
                description="The upscaled images before padding, in [0, 1]: the colour fix's reference.",
            ),
            OutputParam(
                "output_size",
                type_hint=tuple[int, int],
                description="(height, width) of the results: the upscaled size, before padding.",
            ),
        ]

    @staticmethod
    def check_inputs(block_state: Any, max_pixels: int | None) -> None:
        if block_state.image is None:
            raise ValueError("`image` is required: the low-quality image (or list of images) to restore.")
        if max_pixels is not None and (not is_integer(max_pixels) or max_pixels < 1):
            raise ValueError(f"`max_output_pixels` must be a positive integer or None, got {max_pixels!r}.")

    @torch.no_grad()
    def __call__(self, components: ModularPipeline, state: PipelineState) -> tuple[ModularPipeline, PipelineState]:
        block_state = self.get_block_state(state)
        max_pixels = None if passed_as_none(state, "max_output_pixels") else block_state.max_output_pixels
        self.check_inputs(block_state, max_pixels)
        prepared = prepare_lq_images(
            block_state.image,
            block_state.upscale,
            multiple=vae_scale_factor(components),
            min_size=min_output_size(components),
            max_pixels=max_pixels,
        )
        block_state.lq_image = prepared.padded
        block_state.lq_reference = prepared.reference
        block_state.output_size = prepared.size
        self.set_block_state(state, block_state)
        return components, state


class FaithDiffSDXLCaptionStep(ModularPipelineBlocks):
    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return (
            "Writes a prompt for each image with the pipeline's captioner, as the release does with LLaVA-1.5 (its "
            "request, sampling and post-processing), seeded with `generator`'s initial seed. Without a captioner the "
            "prompt stays empty."
        )

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [
            ComponentSpec(
                "captioner", PreTrainedModel, description="An image-text-to-text model (the release: LLaVA-1.5-13B)."
            ),
            ComponentSpec("captioner_processor", ProcessorMixin, description="The captioner's AutoProcessor."),
        ]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("image", type_hint=LQImage | list[LQImage], required=True, description="The LQ image(s)."),
            InputParam(
                "generator",
                type_hint=torch.Generator | list[torch.Generator] | None,
                description="Seeds the captioner's sampling with its initial seed (the first one's, for a list).",
            ),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam(
                "prompt",
                type_hint=list[str] | None,
                description="The captions, one per image (None without a captioner).",
            )
        ]

    @torch.no_grad()
    def __call__(self, components: ModularPipeline, state: PipelineState) -> tuple[ModularPipeline, PipelineState]:
        block_state = self.get_block_state(state)
        captioner = getattr(components, "captioner", None)
        block_state.prompt = None
        if captioner is not None:
            block_state.prompt = caption_lq_images(
                captioner, getattr(components, "captioner_processor", None), block_state.image, block_state.generator
            )
        self.set_block_state(state, block_state)
        return components, state


class FaithDiffSDXLPromptStep(ModularPipelineBlocks):
    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return (
            "One prompt per image, as FaithDiffSDXLPipeline reads them: a single prompt applies to every image, a "
            "missing prompt is empty, and a missing negative prompt is a real empty prompt (the release's), whatever "
            "the pipeline's `force_zeros_for_empty_prompt`"
        )

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("lq_image", type_hint=torch.Tensor, required=True, description="The prepared LQ images."),
            InputParam("prompt", type_hint=str | list[str] | None, description="Description of each image."),
            InputParam("prompt_2", type_hint=str | list[str] | None, description="Prompt of the second text encoder."),
            InputParam("negative_prompt", type_hint=str | list[str] | None, description="The negative prompt."),
            InputParam(
                "negative_prompt_2",
                type_hint=str | list[str] | None,
                description="Negative prompt of the second text encoder.",
            ),
            InputParam(
                "prompt_embeds", type_hint=torch.Tensor | None, description="Given text embeddings, one per image."
            ),
            InputParam("negative_prompt_embeds", type_hint=torch.Tensor | None, description="Given negative ones."),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        prompts = list[str] | None
        return [
            OutputParam("prompt", type_hint=prompts, description="One prompt per image (None with `prompt_embeds`)."),
            OutputParam("prompt_2", type_hint=prompts, description="One per image, or None (then `prompt`)."),
            OutputParam("negative_prompt", type_hint=prompts, description="One per image (None with embeddings)."),
            OutputParam("negative_prompt_2", type_hint=prompts, description="One per image, or None."),
        ]

    @staticmethod
    def check_inputs(block_state: Any) -> None:
        if block_state.prompt is not None and block_state.prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if block_state.prompt is not None and not isinstance(block_state.prompt, (str, list)):
            raise TypeError(f"`prompt` must be a string or a list of strings, got {type(block_state.prompt).__name__}.")
        if block_state.negative_prompt is not None and block_state.negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")

    @torch.no_grad()
    def __call__(self, components: ModularPipeline, state: PipelineState) -> tuple[ModularPipeline, PipelineState]:
        block_state = self.get_block_state(state)
        self.check_inputs(block_state)
        images = block_state.lq_image.shape[0]
        if block_state.prompt_embeds is None:
            prompt = EMPTY_PROMPT if block_state.prompt is None else block_state.prompt
            block_state.prompt = prompts_per_image(prompt, images, "prompt")
            block_state.prompt_2 = prompts_per_image(block_state.prompt_2, images, "prompt_2")
        if block_state.negative_prompt_embeds is None:
            negative = EMPTY_PROMPT if block_state.negative_prompt is None else block_state.negative_prompt
            block_state.negative_prompt = prompts_per_image(negative, images, "negative_prompt")
            negative_2 = block_state.negative_prompt_2
            block_state.negative_prompt_2 = prompts_per_image(negative_2, images, "negative_prompt_2")
        self.set_block_state(state, block_state)
        return components, state


class FaithDiffSDXLPromptEmbedsStep(ModularPipelineBlocks):
    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return (
            "Takes given prompt embeddings (e.g. from StableDiffusionXLTextEncoderStep elsewhere) instead of encoding "
            "prompts, through SDXL's own encode_prompt as FaithDiffSDXLPipeline does: on the device, in the text "
            "encoder's dtype, and with guidance the negative prompt encoded where no negative embeddings are given"
        )

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [
            ComponentSpec("text_encoder", CLIPTextModel),
            ComponentSpec("text_encoder_2", CLIPTextModelWithProjection),
            ComponentSpec("tokenizer", CLIPTokenizer),
            ComponentSpec("tokenizer_2", CLIPTokenizer),
        ]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam(
                "prompt_embeds",
                type_hint=torch.Tensor,
                required=True,
                kwargs_type="denoiser_input_fields",
                description="Text embeddings, one per image ([images, tokens, width]).",
            ),
            InputParam(
                "pooled_prompt_embeds",
                type_hint=torch.Tensor,
                kwargs_type="denoiser_input_fields",
                description="Pooled text embeddings, required with `prompt_embeds`.",
            ),
            InputParam(
                "negative_prompt_embeds",
                type_hint=torch.Tensor | None,
                kwargs_type="denoiser_input_fields",
                description="Negative text embeddings; encoded from `negative_prompt` when guidance needs them.",
            ),
            InputParam(
                "negative_pooled_prompt_embeds",
                type_hint=torch.Tensor | None,
                kwargs_type="denoiser_input_fields",
                description="Pooled negative text embeddings, required with `negative_prompt_embeds`.",
            ),
            InputParam("negative_prompt", type_hint=list[str] | None, description="One negative prompt per image."),
            InputParam("negative_prompt_2", type_hint=list[str] | None, description="The second encoder's."),
            InputParam(
                "guidance_scale",
                type_hint=float,
                default=release.GUIDANCE_SCALE,
                description="Classifier-free guidance scale; above 1 the negative embeddings are needed.",
            ),
            InputParam("clip_skip", type_hint=int | None, description="CLIP layers to skip for the negative prompt."),
            InputParam(
                "cross_attention_kwargs",
                type_hint=dict[str, Any] | None,
                description="Its `scale` scales the text encoders' LoRA layers.",
            ),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam(name, type_hint=torch.Tensor, kwargs_type="denoiser_input_fields", description=description)
            for name, description in (
                ("prompt_embeds", "The given text embeddings."),
                ("pooled_prompt_embeds", "The given pooled text embeddings."),
                ("negative_prompt_embeds", "Negative text embeddings (None without guidance)."),
                ("negative_pooled_prompt_embeds", "Pooled negative text embeddings (None without guidance)."),
            )
        ]

    @staticmethod
    def check_inputs(block_state: Any) -> None:
        if block_state.pooled_prompt_embeds is None:
            raise ValueError(
                "`pooled_prompt_embeds` is required with `prompt_embeds` (both come from `encode_prompt`)."
            )
        if block_state.negative_prompt_embeds is not None and block_state.negative_pooled_prompt_embeds is None:
            raise ValueError("`negative_pooled_prompt_embeds` is required with `negative_prompt_embeds`.")

    @torch.no_grad()
    def __call__(self, components: ModularPipeline, state: PipelineState) -> tuple[ModularPipeline, PipelineState]:
        block_state = self.get_block_state(state)
        self.check_inputs(block_state)
        attention_kwargs = block_state.cross_attention_kwargs
        (
            block_state.prompt_embeds,
            block_state.negative_prompt_embeds,
            block_state.pooled_prompt_embeds,
            block_state.negative_pooled_prompt_embeds,
        ) = StableDiffusionXLTextEncoderStep.encode_prompt(
            components,
            None,
            device=components._execution_device,
            prepare_unconditional_embeds=does_guidance(components, block_state.guidance_scale),
            negative_prompt=block_state.negative_prompt,
            negative_prompt_2=block_state.negative_prompt_2,
            prompt_embeds=block_state.prompt_embeds,
            negative_prompt_embeds=block_state.negative_prompt_embeds,
            pooled_prompt_embeds=block_state.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=block_state.negative_pooled_prompt_embeds,
            lora_scale=attention_kwargs.get("scale") if attention_kwargs else None,
            clip_skip=block_state.clip_skip,
        )
        self.set_block_state(state, block_state)
        return components, state


class FaithDiffSDXLLQFeaturesStep(ModularPipelineBlocks):
    model_name = MODEL_NAME
    _requirements = REQUIREMENTS

    @property
    def description(self) -> str:
        return (
            "LQ features of the prepared images: the fine-tuned LQ encoder's mid-block output (without one, the VAE "
            "encoder's output of the width the alignment module takes), tiled like the VAE when its tiling is on"
        )

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [
            ComponentSpec("lq_encoder", FaithDiffLQEncoder),
            ComponentSpec("vae", AutoencoderKL),
            ComponentSpec("alignment", FaithDiffAlignmentModel),
        ]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("lq_image", type_hint=torch.Tensor, required=True, description="The prepared LQ images."),
            InputParam("num_images_per_prompt", type_hint=int, default=1, description="Restorations per image."),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam(
                "lq_features",
                type_hint=torch.Tensor,
                description="LQ features of every sample (images x num_images_per_prompt), [samples, C, H/8, W/8].",
            )
        ]

    @torch.no_grad()
    def __call__(self, components: ModularPipeline, state: PipelineState) -> tuple[ModularPipeline, PipelineState]:
        block_state = self.get_block_state(state)
        features = compute_lq_features(
            block_state.lq_image.to(components._execution_device),
            getattr(components, "lq_encoder", None),
            components.vae,
            components.alignment.config.lq_channels,
            vae_scale_factor(components),
        )
        block_state.lq_features = features.repeat_interleave(block_state.num_images_per_prompt, dim=0)
        self.set_block_state(state, block_state)
        return components, state
