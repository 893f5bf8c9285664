"""FaithDiffSDXLPipeline: faithful image super-resolution with an SDXL UNet fine-tuned jointly with an LQ encoder."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial, wraps
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
    retrieve_timesteps,
)
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, replace_example_docstring
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedModel, ProcessorMixin

from .alignment import FaithDiffAlignmentModel
from .attention_maps import AttentionMapRecorder, AttentionRecording, PromptTokens
from .captioning import caption_lq_images
from .checks import check_integer, check_tile_arguments, is_integer, is_real
from .color_fix import COLOR_FIXES, apply_color_fix
from .hub import resolve_pipeline_folder
from .latents import decode_latents, start_latents
from .lq_features import FaithDiffLQEncoder, compute_lq_features
from . import release_settings as release
from .preprocessing import LQImage, check_upscale, prepare_lq_images
from . import tiled_denoising
from .tiled_denoising import TileBatch
from .tiling import LatentTiling

logger = logging.getLogger(__name__)

# UNet layers kept in their dtype when the rest is stored in float8: the norms, the time and micro-conditioning
# embeddings, and conv_in/conv_out (conv_in is where the alignment adds the LQ condition). The alignment module and
# the LQ encoder are components of their own and never touched.
FP8_KEEP_PATTERNS = ("norm", "time_embedding", "add_embedding", "^conv_in$", "^conv_out$")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from faithdiff_pipeline import FaithDiffSDXLPipeline, converted_release
        >>> from faithdiff_pipeline.image_io import read_image, save_result

        >>> device = "cuda" if torch.cuda.is_available() else "cpu"
        >>> dtype = torch.float16 if device == "cuda" else torch.float32
        >>> variant = "fp16" if device == "cuda" else None
        >>> pipe = FaithDiffSDXLPipeline.from_pretrained(converted_release(variant), dtype=dtype, variant=variant)
        >>> pipe = pipe.to(device)
        >>> photo = read_image("old_photo.png")  # upright, in sRGB; bit depth, alpha and profile kept for saving
        >>> restored = pipe(
        ...     photo.pipeline_input(),
        ...     prompt="A portrait of a woman in a garden.",
        ...     upscale=2,
        ...     generator=torch.Generator("cpu").manual_seed(42),
        ...     output_type="np",
        ... ).images[0]
        >>> save_result(restored, "restored.png", photo)
        ```
"""


@dataclass
class FaithDiffPipelineOutput(BaseOutput):
    """
    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): The restored images (or, for
            ``output_type="latent"``, the final latents at the padded size).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def prompts_per_image(prompt: str | list[str] | None, images: int, name: str) -> list[str] | None:
    """One prompt per image: a single prompt broadcast to every image, a list checked to have one per image (its
    argument ``name`` names it in errors), None kept."""
    if prompt is None or isinstance(prompt, str):
        return None if prompt is None else [prompt] * images
    if len(prompt) != images:
        raise ValueError(f"`{name}` has {len(prompt)} entries but {images} images were given; pass one per image.")
    return list(prompt)


def _image_may_come_first(call: Callable[..., Any]) -> Callable[..., Any]:
    """Lets ``__call__`` take the image first, as this pipeline always has, beside diffusers' ``(prompt, image)``
    order: a first positional argument is the image when it cannot be a prompt (it is not a string or a list of
    strings) or when ``prompt`` is given by keyword, and a second one is then the prompt. Python would bind
    ``pipe(photo, prompt=...)`` to ``prompt`` twice before ``__call__`` could tell what ``photo`` is, so the
    arguments are put in order here."""

    @wraps(call)
    def ordered(self: FaithDiffSDXLPipeline, *args: Any, **kwargs: Any) -> Any:
        if not args or (_is_prompt(args[0]) and "prompt" not in kwargs):
            return call(self, *args, **kwargs)
        if "image" in kwargs:
            raise TypeError("`image` given twice: as the first positional argument, and by keyword.")
        image, rest = args[0], args[1:]
        if rest:
            return call(self, rest[0], image, *rest[1:], **kwargs)
        return call(self, kwargs.pop("prompt", None), image, **kwargs)

    return ordered


def _is_prompt(value: object) -> bool:
    """Whether ``value`` can only be a prompt: None, a string, or a list or tuple of strings."""
    if value is None or isinstance(value, str):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


class FaithDiffSDXLPipeline(
    DiffusionPipeline, StableDiffusionMixin, StableDiffusionXLLoraLoaderMixin, TextualInversionLoaderMixin
):
    r"""
    FaithDiff (CVPR 2025) image restoration and super-resolution with SDXL.

    The low-quality image is upscaled with LANCZOS and read by an LQ encoder (a fine-tuned copy of the VAE encoder,
    taken at its mid block); the alignment module fuses those features with the noisy latent after the UNet's
    ``conv_in``, and the fine-tuned SDXL UNet denoises over overlapping latent tiles, guided by a caption.

    Args:
        vae ([`AutoencoderKL`]): Decodes latents, and encodes the input for ``start_point="lr"``.
        text_encoder ([`~transformers.CLIPTextModel`]): SDXL's first text encoder.
        text_encoder_2 ([`~transformers.CLIPTextModelWithProjection`]): SDXL's second text encoder.
        tokenizer ([`~transformers.CLIPTokenizer`]): Tokenizer of ``text_encoder``.
        tokenizer_2 ([`~transformers.CLIPTokenizer`]): Tokenizer of ``text_encoder_2``.
        unet ([`UNet2DConditionModel`]): The FaithDiff fine-tuned SDXL UNet (diffusers' own class).
        alignment ([`FaithDiffAlignmentModel`]): Fuses LQ features with the latent after ``unet.conv_in``.
        scheduler ([`SchedulerMixin`]): Sampler; the release uses ``EulerDiscreteScheduler``.
        lq_encoder ([`FaithDiffLQEncoder`], *optional*): The fine-tuned LQ encoder. Without it the LQ features are
            taken from ``vae.encoder``.
        captioner ([`~transformers.PreTrainedModel`], *optional*): An image-text-to-text model (the release uses
            LLaVA-1.5-13B, ``LlavaForConditionalGeneration``) that writes the prompt when none is given.
        captioner_processor ([`~transformers.ProcessorMixin`], *optional*): The captioner's ``AutoProcessor``.
        force_zeros_for_empty_prompt (`bool`, defaults to `False`): Use zeros instead of encoding a missing negative
            prompt. FaithDiff was trained and released with a real empty prompt, so this stays off.

    Any component may be `None`, as in diffusers' pipelines: a pipeline of the text encoders and tokenizers alone
    computes prompt embeddings with [`~FaithDiffSDXLPipeline.encode_prompt`] (e.g. on another device than the one
    that denoises), and one without them restores from given embeddings. A call names what it lacks.
    """

    # The captioner runs first and leaves the device before anything else needs it.
    model_cpu_offload_seq = "captioner->text_encoder->text_encoder_2->lq_encoder->unet->vae"
    # The alignment runs inside every UNet call; it is small, so it stays on the device instead of shuttling.
    _exclude_from_cpu_offload: ClassVar[list[str]] = ["alignment"]
    # What a restoration runs without: the LQ features fall back to the VAE encoder, captions to the prompt. The
    # other components may be None too (see the class docstring); __call__ refuses to run without those it needs.
    _optional_components: ClassVar[list[str]] = ["lq_encoder", "captioner", "captioner_processor"]
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]

    def __init__(
        self,
        vae: AutoencoderKL | None,
        text_encoder: CLIPTextModel | None,
        text_encoder_2: CLIPTextModelWithProjection | None,
        tokenizer: CLIPTokenizer | None,
        tokenizer_2: CLIPTokenizer | None,
        unet: UNet2DConditionModel | None,
        alignment: FaithDiffAlignmentModel | None,
        scheduler: KarrasDiffusionSchedulers | None,
        lq_encoder: FaithDiffLQEncoder | None = None,
        captioner: PreTrainedModel | None = None,
        captioner_processor: ProcessorMixin | None = None,
        force_zeros_for_empty_prompt: bool = False,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            alignment=alignment,
            scheduler=scheduler,
            lq_encoder=lq_encoder,
            captioner=captioner,
            captioner_processor=captioner_processor,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # SDXL's own prompt encoding (both CLIP encoders, penultimate states, pooled output of the second).
    encode_prompt = StableDiffusionXLPipeline.encode_prompt

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> FaithDiffSDXLPipeline:
        r"""
        Loads a converted FaithDiff pipeline from a local folder or a Hugging Face Hub repository id.

        Hub repositories are downloaded as a snapshot first (only the files of the requested ``variant``), since
        diffusers does not load components of a library it does not know straight from the Hub. All other keyword
        arguments (``dtype``, ``variant``, component overrides, ...) are those of
        [`~DiffusionPipeline.from_pretrained`]. Without ``variant``, a folder that holds the weights of one variant
        only (converted with ``--variant fp16``) loads those, cast to ``dtype``, with a warning that says so.
        """
        folder = resolve_pipeline_folder(pretrained_model_name_or_path, kwargs)
        _check_pipeline_folder(folder, provided=kwargs.keys())
        _take_the_folders_variant(folder, kwargs)
        return super().from_pretrained(folder, **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        r"""
        Reads ``model_index.json`` as [`~ConfigMixin.load_config`] does, with the entries of diffusers' custom-code
        layout (see [`~FaithDiffSDXLPipeline.save_pretrained`]) naming the installed classes instead of the folder's
        files. [`~DiffusionPipeline.from_pretrained`] reads the index through this method, so loading with this class
        never runs code from the folder and needs no ``trust_remote_code``.
        """
        from .hub import installed_index

        loaded = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        # With return_unused_kwargs or return_commit_hash, diffusers returns a tuple that starts with the config.
        installed_index(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        r"""
        Saves the pipeline as [`~DiffusionPipeline.save_pretrained`] does, in diffusers' custom-code layout:
        ``_class_name`` is ``["pipeline_faithdiff_sdxl", "FaithDiffSDXLPipeline"]``, and ``alignment`` and
        ``lq_encoder`` name files of their folders, each a few lines that import the class from the installed
        faithdiff-pipeline package. So plain ``DiffusionPipeline.from_pretrained(folder_or_hub_id,
        trust_remote_code=True)`` returns this pipeline where the package is installed, and elsewhere fails saying
        which package to install; this class loads the folder without running those files.

        ``push_to_hub=True`` (with ``repo_id``, ``token``, ``private``, ``create_pr``, ``commit_message``) uploads the
        folder once it is complete. Other keyword arguments are those of [`~DiffusionPipeline.save_pretrained`].
        """
        from .hub import upload_pipeline_folder, write_custom_code, write_modular_definition

        defaults = {"repo_id": None, "token": None, "private": None, "create_pr": False, "commit_message": None}
        # Taken out even without push_to_hub, as diffusers ignores them then.
        push = {key: kwargs.pop(key, default) for key, default in defaults.items()}
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant, **kwargs)
        write_custom_code(save_directory, type(self))
        write_modular_definition(save_directory, variant)
        if push_to_hub:
            push["commit_message"] = push["commit_message"] or f"Upload {type(self).__name__}"
            upload_pipeline_folder(save_directory, **push)

    def enable_text_encoder_offload(self, device: torch.device | str = "cuda") -> None:
        r"""
        Keeps the two text encoders in host memory and streams them to ``device`` layer by layer while a prompt is
        encoded (diffusers' leaf-level group offloading, prefetched on a side stream on CUDA); every other component
        moves to ``device`` and stays there.

        The text encoders run once per call, the UNet hundreds of times: this frees their memory (about 1.6 GiB for
        SDXL in half precision) for larger tile batches, for one host-to-device transfer of their weights per call
        (benchmarks/RESULTS.md gives its measured cost). Unlike [`~DiffusionPipeline.enable_model_cpu_offload`], the
        UNet never leaves the device. A captioner stays on the device too: streamed layer by layer it would move all
        its weights for every generated token, so caption beforehand (``faithdiff-upscale --captions-only``) or load
        it quantised where memory is short.

        Calling it again for the same device changes nothing.

        Args:
            device (`torch.device` or `str`, defaults to `"cuda"`): Where the pipeline runs.

        Raises:
            ValueError: before anything changes, where ``device`` is not on this machine, the pipeline has no text
                encoder, or they are offloaded already (to another device, or by diffusers' CPU offloads).
        """
        device = torch.device(device)
        if not self._text_encoder_offload_enabled(device, "enable_text_encoder_offload"):
            self._offload_text_encoders(device)

    def enable_fp8_weights(self) -> None:
        r"""
        Stores the UNet's weights in ``float8_e4m3fn`` and computes in the UNet's dtype, each layer's weights cast up
        just before it runs (diffusers' layerwise casting): the release's ``--use_fp8``. The UNet's weights take half
        the memory of float16 (about 2.6 GB instead of 5.1 GB for SDXL); the output deviates from the exact path by
        float8's rounding of the weights (``benchmarks/RESULTS.md`` gives the measured deviation). Norms, embeddings
        and ``conv_in``/``conv_out`` stay in full precision (``FP8_KEEP_PATTERNS``), as do the alignment module and
        the LQ encoder. Calling it again changes nothing.

        Raises:
            ValueError: before anything changes, where the UNet's weights are float8 or quantised already (e.g. by
                :meth:`enable_fp8_compute`).
        """
        if not self._fp8_weights_enabled("enable_fp8_weights"):
            self._store_unet_in_fp8()

    def enable_fp8_compute(self) -> None:
        r"""
        Computes the UNet's linear layers in float8 (torchao's dynamic float8 quantisation of activations and
        weights, row-wise scales), for GPUs with float8 matrix units (compute capability 8.9 and up: Ada, Hopper,
        Blackwell). Compile the UNet afterwards (``pipe.unet.compile(...)``); it is what makes float8 fast. The
        deviation from the exact bfloat16 output is measured in ``benchmarks/RESULTS.md``. Needs the ``[fp8]``
        extra (torchao). Calling it again changes nothing.

        Raises:
            ValueError: before anything changes, where the UNet's weights are stored in float8
                (:meth:`enable_fp8_weights`, :meth:`enable_low_vram`) or quantised otherwise, or the GPU lacks
                float8 matrix units.
        """
        if self._fp8_compute_enabled():
            return
        device = self.unet.device
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(
                f"`enable_fp8_compute` needs a CUDA GPU of compute capability 8.9 or more; the UNet is on {device}. "
                "Use `enable_fp8_weights()` for float8 storage on any device."
            )
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(self.unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=fp8_linear)

    def enable_low_vram(self, device: torch.device | str = "cuda") -> None:
        r"""
        The release's 5 GB set-up: UNet weights in float8 (:meth:`enable_fp8_weights`), the text encoders streamed in
        once per image (:meth:`enable_text_encoder_offload`), and the VAE and LQ encoder in tiles. Call the pipeline
        with a small ``tile_batch_size`` (1) as well: the tiles then pass through the UNet one at a time.

        Calling it again, or after :meth:`enable_fp8_weights` or :meth:`enable_text_encoder_offload` for the same
        device, adds what is missing.

        Args:
            device (`torch.device` or `str`, defaults to `"cuda"`): Where the pipeline runs.

        Raises:
            ValueError: before anything changes, where ``device`` is not on this machine, or a set-up of the
                pipeline cannot go with these (float8 compute, quantised weights, diffusers' CPU offloads, text
                encoders offloaded to another device).
        """
        device = torch.device(device)
        # Every check first: a refusal must not leave the UNet in float8 with the encoders not offloaded.
        stored_in_fp8 = self._fp8_weights_enabled("enable_low_vram")
        offloaded = self._text_encoder_offload_enabled(device, "enable_low_vram")
        if not stored_in_fp8:
            self._store_unet_in_fp8()
        if not offloaded:
            self._offload_text_encoders(device)
        self.vae.enable_tiling()

    def _fp8_weights_enabled(self, method: str) -> bool:
        """Whether the UNet stores its weights in float8 already (diffusers' layerwise casting, which reports the
        compute dtype as the UNet's ``dtype``); raises ``ValueError`` where float8 storage cannot be added."""
        from diffusers.hooks.layerwise_casting import _is_layerwise_casting_active

        stored = {parameter.dtype for parameter in self.unet.parameters()}
        if _is_layerwise_casting_active(self.unet):
            if torch.float8_e4m3fn in stored:
                return True
            raise ValueError(
                f"`{method}` stores the UNet's weights in float8, but the UNet already has layerwise casting to "
                f"{sorted(map(str, stored))}; load the pipeline again to change it."
            )
        quantised = _quantised_parameters(self.unet)
        if quantised:
            raise ValueError(
                f"`{method}` stores the UNet's weights in float8, but they are quantised already ({quantised[0]} is "
                f"a {type(self.unet.get_parameter(quantised[0])).__name__}: `enable_fp8_compute` or a quantisation "
                "config); float8 storage cannot go on top: load the pipeline again without it."
            )
        if torch.float8_e4m3fn in stored or torch.float8_e5m2 in stored:
            raise ValueError(
                f"`{method}` needs a UNet in float16, bfloat16 or float32 to compute in; its weights are float8."
            )
        return False

    def _store_unet_in_fp8(self) -> None:
        self.unet.enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn, compute_dtype=self.unet.dtype, skip_modules_pattern=FP8_KEEP_PATTERNS
        )

    def _fp8_compute_enabled(self) -> bool:
        """Whether :meth:`enable_fp8_compute` has quantised the UNet already; raises ``ValueError`` where float8
        compute cannot be added (weights stored in float8, or quantised otherwise)."""
        from diffusers.hooks.layerwise_casting import _is_layerwise_casting_active

        if _is_layerwise_casting_active(self.unet):
            raise ValueError(
                "`enable_fp8_compute` cannot go with float8 weight storage (`enable_fp8_weights`, `enable_low_vram`), "
                "which this UNet has: load the pipeline again and choose one."
            )
        quantised = _quantised_parameters(self.unet)
        if not quantised:
            return False
        chosen = {f"{name}.weight" for name, module in self.unet.named_modules() if fp8_linear(module, name)}
        # torchao's float8 weights, named rather than imported: other quantisations need no torchao installed.
        if set(quantised) == chosen and all(
            type(self.unet.get_parameter(name)).__name__ == "Float8Tensor" for name in quantised
        ):
            return True
        raise ValueError(
            f"`enable_fp8_compute` quantises the UNet's linear layers, but its weights are quantised already "
            f"({quantised[0]} is a {type(self.unet.get_parameter(quantised[0])).__name__}); load the pipeline "
            "again without the other quantisation."
        )

    def _text_encoder_offload_enabled(self, device: torch.device, method: str) -> bool:
        """Whether the text encoders stream to ``device`` already; raises ``ValueError`` where ``device`` is not on
        this machine, the pipeline has no text encoder, or another offload holds them."""
        from diffusers.hooks.group_offloading import _get_group_onload_device, _is_group_offload_enabled

        _check_device_available(device, method)
        encoders = [self.text_encoder, self.text_encoder_2]
        encoders = [encoder for encoder in encoders if encoder is not None]
        if not encoders:
            raise ValueError(f"`{method}` needs a text encoder; this pipeline has none.")
        modules = [component for component in self.components.values() if isinstance(component, torch.nn.Module)]
        if any(hasattr(module, "_hf_hook") for component in modules for module in component.modules()):
            raise ValueError(
                f"`{method}` cannot go with `enable_model_cpu_offload` or `enable_sequential_cpu_offload`, which "
                "this pipeline has: load it again and choose one."
            )
        onload = {_get_group_onload_device(encoder) for encoder in encoders if _is_group_offload_enabled(encoder)}
        if not onload:
            return False
        # "cuda" and "cuda:0" are one device to the user.
        same = all(d.type == device.type and (d.index or 0) == (device.index or 0) for d in onload)
        if same and all(map(_is_group_offload_enabled, encoders)):
            return True
        raise ValueError(
            f"`{method}` streams the text encoders to {device}, but they are offloaded to "
            f"{', '.join(sorted(map(str, onload)))} already: load the pipeline again to change the device."
        )

    def _offload_text_encoders(self, device: torch.device) -> None:
        encoders = [name for name in ("text_encoder", "text_encoder_2") if getattr(self, name) is not None]
        resident = [
            name
            for name, component in self.components.items()
            if isinstance(component, torch.nn.Module) and name not in encoders
        ]
        self.enable_group_offload(
            device,
            offload_type="leaf_level",
            # Layer-by-layer prefetching on a side stream; diffusers allows streams only at this granularity or
            # with one block per group, and the latter measured several times slower for CLIP.
            use_stream=device.type == "cuda",
            exclude_modules=resident,
        )

    @property
    def min_output_size(self) -> int:
        """The smallest side, in pixels, of an image the model runs on: one latent pixel at the UNet's lowest
        resolution. A smaller result is computed on its input padded with its edge pixels up to this size, then
        cropped back."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def check_inputs(
        self,
        image: Any,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        negative_pooled_prompt_embeds: torch.Tensor | None,
        num_inference_steps: int,
        upscale: float,
        guidance_scale: float,
        max_output_pixels: int | None,
        start_point: str,
        tile_size: int,
        tile_stride: int | None,
        tile_batch_size: int,
        color_fix: str | None,
        num_images_per_prompt: int,
        output_type: str,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> None:
        if image is None:
            raise ValueError(
                "`image` is required: the low-quality image (or list of images) to restore. A string alone is the "
                "prompt; pass a file path as `image=`."
            )
        check_upscale(upscale)
        if not is_real(guidance_scale):
            raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}.")
        if max_output_pixels is not None and (not is_integer(max_output_pixels) or max_output_pixels < 1):
            raise ValueError(f"`max_output_pixels` must be a positive integer or None, got {max_output_pixels!r}.")
        if start_point not in release.START_POINTS:
            raise ValueError(f"`start_point` must be one of {release.START_POINTS}, got {start_point!r}.")
        if color_fix is not None and color_fix not in COLOR_FIXES:
            raise ValueError(f"`color_fix` must be one of {COLOR_FIXES} or None, got {color_fix!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        check_integer(num_inference_steps, "num_inference_steps", 1)
        check_integer(num_images_per_prompt, "num_images_per_prompt", 1)
        check_integer(tile_batch_size, "tile_batch_size", 1)
        check_tile_arguments(tile_size, tile_stride)
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise TypeError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError(
                "`pooled_prompt_embeds` is required with `prompt_embeds` (both come from `encode_prompt`)."
            )
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("`negative_pooled_prompt_embeds` is required with `negative_prompt_embeds`.")
        if (
            prompt_embeds is not None
            and negative_prompt_embeds is not None
            and prompt_embeds.shape != negative_prompt_embeds.shape
        ):
            raise ValueError(
                f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape."
            )
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}, got {unknown}."
            )

    def check_components(self, encodes_prompts: bool, reads_tokens: bool) -> None:
        """Refuses, in one error, a call that needs components this pipeline has as `None`.

        Args:
            encodes_prompts (`bool`): Whether the call encodes prompt text (it was given no embeddings for some).
            reads_tokens (`bool`): Whether the call reads the prompts' tokens (to record attention maps).
        """
        needed = ["unet", "alignment", "vae", "scheduler"]
        if encodes_prompts:
            needed += ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
        elif reads_tokens:
            needed += ["tokenizer", "tokenizer_2"]
        missing = [name for name in needed if getattr(self, name, None) is None]
        if not missing:
            return
        text_parts = {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
        hint = ""
        if encodes_prompts and text_parts & set(missing):
            hint = (
                "; without the text encoders, pass `prompt_embeds` and `pooled_prompt_embeds` (with guidance also "
                "`negative_prompt_embeds` and `negative_pooled_prompt_embeds`) from `encode_prompt` of a pipeline that "
                "has them"
            )
        raise ValueError(
            f"Restoring images needs {missing}, which this pipeline has as None: load it with them{hint}."
        )

    _batch_prompts = staticmethod(prompts_per_image)

    def caption(
        self, image: LQImage | list[LQImage], generator: torch.Generator | list[torch.Generator] | None = None
    ) -> list[str]:
        """Prompts for the LQ images (before upscaling), written by the captioner as the release does: LLaVA's
        answer to the release's request, sampled with temperature 0.2 and top_p 0.7, then post-processed
        (:func:`~faithdiff_pipeline.captioning.clean_caption`). The sampling is seeded with ``generator``'s initial
        seed, without advancing it: ``torch.Generator().manual_seed(42)`` captions as ``faithdiff-upscale --seed 42``
        and the web demo's seed 42 do."""
        return caption_lq_images(self.captioner, self.captioner_processor, image, generator)

    def lq_features(self, image: torch.Tensor) -> torch.Tensor:
        """LQ features of ``image`` (``[B, 3, H, W]`` in [-1, 1]): the LQ encoder's output (its ``feature_source``:
        the mid block by default). Without an LQ encoder, the VAE encoder's output of the width the alignment module
        takes: its mid block's, or its last layer's for a "w last layer" model.

        With VAE tiling enabled (``pipe.vae.enable_tiling()``), the LQ encoder is tiled the same way: the VAE's tile
        size and overlap, tiles blended where they meet.
        """
        return compute_lq_features(
            image, self.lq_encoder, self.vae, self.alignment.config.lq_channels, self.vae_scale_factor
        )

    def prepare_latents(
        self,
        image: torch.Tensor,
        batch_size: int,
        start_point: str,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """Initial latents ``[batch_size, C, H/8, W/8]`` (float32) for ``image`` (padded, in [-1, 1]).

        ``"noise"``: ε · init_noise_sigma. ``"lr"`` (the release's default): the VAE latent of the input, noised by a
        DDPM ``add_noise`` at t = 999 with that same ε · init_noise_sigma.
        """
        return start_latents(
            self.vae,
            self.scheduler,
            image,
            batch_size,
            start_point,
            generator,
            latents,
            self._execution_device,
            self.vae_scale_factor,
        )

    def _step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None) -> dict[str, Any]:
        accepted = inspect.signature(self.scheduler.step).parameters
        return {"generator": generator} if "generator" in accepted else {}

    def _latent_tiling(self, latents: torch.Tensor, tile_size: int, tile_stride: int | None) -> LatentTiling:
        """The latent tiles of ``tile_size`` pixels, ``tile_stride`` apart (the release's half tile when None)."""
        return tiled_denoising.latent_tiling(latents, tile_size, tile_stride, self.vae_scale_factor)

    def add_time_ids(self, padded_size: tuple[int, int], tile_size: int, samples: int) -> torch.Tensor:
        """SDXL's micro-conditioning of each sample, ``[samples, 6]`` float32, as the release sets it: original size =
        the padded image, crop = (0, 0), target = the (unclamped) tile size in pixels. Each tile's rows add the tile's
        offset, in latent units as the release has it, to the crop (see :meth:`prepare_tile_batches`)."""
        return tiled_denoising.add_time_ids(padded_size, tile_size, samples, self._execution_device)

    def prepare_tile_batches(
        self,
        tiling: LatentTiling,
        tile_batch_size: int,
        lq_features: torch.Tensor,
        prompt_embeds: torch.Tensor,
        add_text_embeds: torch.Tensor,
        add_time_ids: torch.Tensor,
    ) -> list[TileBatch]:
        """The UNet calls of one denoising step: the tiles split into even batches of at most ``tile_batch_size``,
        each with its conditioning laid out as the UNet takes it (see [`TileBatch`]), built once for the whole run
        (:meth:`relayout_tile_batches` adapts them when a step callback changes the conditioning).

        With guidance, the condition embeddings are kept once per CFG copy rather than copied at every UNet call;
        they are the only tensors here whose memory grows with the image (about 10 MiB per 1024-pixel SDXL tile and
        copy in half precision); the pipeline call frees the LQ features once they are embedded.

        Args:
            tiling ([`~faithdiff_pipeline.tiling.LatentTiling`]): The latent tiles.
            tile_batch_size (`int`): Most tiles in one UNet call.
            lq_features (`torch.Tensor`): LQ features of every sample, ``[samples, lq_channels, H / 8, W / 8]``.
            prompt_embeds (`torch.Tensor`): Text encoders' states of every sample, the CFG copies concatenated.
            add_text_embeds (`torch.Tensor`): Pooled text embeddings, laid out like ``prompt_embeds``.
            add_time_ids (`torch.Tensor`): Micro-conditioning of every sample (:meth:`add_time_ids`), laid out like
                ``prompt_embeds``.
        """
        cfg_copies = 2 if self.do_classifier_free_guidance else 1
        return tiled_denoising.build_tile_batches(
            tiling,
            tile_batch_size,
            self.alignment,
            self.unet.dtype,
            cfg_copies,
            lq_features,
            prompt_embeds,
            add_text_embeds,
            add_time_ids,
        )

    def relayout_tile_batches(
        self,
        batches: list[TileBatch],
        tiling: LatentTiling,
        cfg_copies: int,
        prompt_embeds: torch.Tensor,
        add_text_embeds: torch.Tensor,
        add_time_ids: torch.Tensor,
    ) -> list[TileBatch]:
        """``batches`` with other conditioning (a step callback's) and ``cfg_copies`` CFG copies, laid out as
        :meth:`prepare_tile_batches` lays them out: guidance turned off mid-run halves every UNet batch from the next
        step on. The tiles' condition embeddings are the same in every copy, so they are reused, not recomputed."""
        return tiled_denoising.relayout_tile_batches(
            batches, tiling, cfg_copies, self.unet.dtype, prompt_embeds, add_text_embeds, add_time_ids
        )

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        tiling: LatentTiling,
        batches: list[TileBatch],
        before_unet: Callable[[TileBatch], None] | None = None,
    ) -> torch.Tensor:
        """The guided noise prediction for the whole latent: one UNet call per tile batch, both CFG copies together,
        the tiles' predictions blended with Gaussian weights.

        Nothing here copies from the host, so the GPU never idles waiting for the Python loop.

        Args:
            latents (`torch.Tensor`): The whole latent, ``[samples, C, height, width]``.
            t (`torch.Tensor`): The timestep.
            tiling ([`~faithdiff_pipeline.tiling.LatentTiling`]): The latent tiles.
            batches (`list[TileBatch]`): The UNet calls, from :meth:`prepare_tile_batches`.
            before_unet (`Callable[[TileBatch], None]`, *optional*): Called with each call's batch before it runs:
                an attention-map recording learns from it where the call's rows belong.
        """
        total = torch.zeros_like(latents)
        for batch in batches:
            if before_unet is not None:
                before_unet(batch)
            tiling.accumulate(total, self._guided_noise(tiling.crop(latents, batch.indices), t, batch), batch.indices)
        return total / tiling.weight_sum

    def _guided_noise(self, tiles: torch.Tensor, t: torch.Tensor, batch: TileBatch) -> torch.Tensor:
        """The UNet's noise prediction for the latent ``tiles`` of ``batch``, guided (and rescaled) across the CFG
        copies, float32."""
        model_input = self.scheduler.scale_model_input(torch.cat([tiles] * batch.cfg_copies), t).to(self.unet.dtype)
        noise = tiled_denoising.tile_noise(
            self.unet, self.alignment, model_input, t, batch, self._cross_attention_kwargs
        )
        return tiled_denoising.guided_noise(noise, batch.cfg_copies, self.guidance_scale, self.guidance_rescale)

    def _attention_recording(
        self,
        recorder: AttentionMapRecorder | None,
        prompt: list[str] | None,
        prompt_2: list[str] | None,
        tiling: LatentTiling,
        num_images_per_prompt: int,
        image_size: tuple[int, int],
        num_steps: int,
    ) -> contextlib.AbstractContextManager[AttentionRecording | None]:
        """What records the attention maps of the denoising loop: ``recorder``'s recording, or nothing (`None`)."""
        if recorder is None:
            return contextlib.nullcontext()
        if not isinstance(recorder, AttentionMapRecorder):
            raise TypeError(f"`attention_maps` must be an AttentionMapRecorder, got {type(recorder).__name__}.")
        if prompt is None:
            raise ValueError(
                "`attention_maps` looks for its words in the prompt text; pass `prompt` instead of `prompt_embeds`."
            )
        prompts = self.prompt_tokens(prompt, prompt_2 or prompt)
        per_sample = [encoded for encoded in prompts for _ in range(num_images_per_prompt)]
        return recorder.recording(self.unet, per_sample, tiling, image_size, self.vae_scale_factor, num_steps)

    def prompt_tokens(self, prompt: list[str], prompt_2: list[str]) -> list[tuple[PromptTokens, PromptTokens]]:
        """Each image's prompts as the two text encoders read them: tokenized as
        [`~FaithDiffSDXLPipeline.encode_prompt`] tokenizes them (textual-inversion tokens expanded, padded and
        truncated to the tokenizer's length)."""
        return [
            tuple(
                PromptTokens(
                    text,
                    tokenizer(
                        self.maybe_convert_prompt(text, tokenizer),
                        padding="max_length",
                        max_length=tokenizer.model_max_length,
                        truncation=True,
                    )["input_ids"],
                    tokenizer,
                )
                for tokenizer, text in ((self.tokenizer, first), (self.tokenizer_2, second))
            )
            for first, second in zip(prompt, prompt_2)
        ]

    def decode_latents(
        self, latents: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """VAE decode to images in [0, 1], ``[B, 3, H, W]`` float32 (upcasting a float16 VAE that asks for it).
        ``generator`` seeds a VAE whose decoder samples (``ConsistencyDecoderVAE``)."""
        return decode_latents(self.vae, latents, generator)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    @_image_may_come_first
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: LQImage | list[LQImage] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        upscale: float = release.UPSCALE,
        num_inference_steps: int = release.NUM_INFERENCE_STEPS,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = release.GUIDANCE_SCALE,
        guidance_rescale: float = 0.0,
        start_point: str = release.START_POINT,
        tile_size: int = release.TILE_SIZE,
        tile_stride: int | None = None,
        tile_batch_size: int = release.TILE_BATCH_SIZE,
        color_fix: str | None = release.COLOR_FIX,
        max_output_pixels: int | None = release.MAX_OUTPUT_PIXELS,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        attention_maps: AttentionMapRecorder | None = None,
    ) -> FaithDiffPipelineOutput | tuple:
        r"""
        Restores and upscales low-quality images.

        ``prompt`` and ``image`` come first, in diffusers' order: ``pipe("a photo", photo)`` and
        ``pipe(prompt, image=photo)``. A first positional argument is the image instead when it cannot be a prompt
        (it is not a string or a list of strings) or when ``prompt`` is given by keyword, and a second one is then
        the prompt: ``pipe(photo, prompt="a photo")``, ``pipe("photo.png", prompt="a photo")``, ``pipe(photo)``.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                Description of each image (the release uses a LLaVA caption). One string applies to every image.
                When omitted, the pipeline's `captioner` writes one per image; without a captioner the prompt is
                empty. A given prompt is used as is.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, path, or a list of them):
                The low-quality input(s), in sRGB. Arrays are ``[H, W, 3]`` (uint8, uint16 as 16-bit, or float in
                [0, 1]: other values are an error); tensors ``[3, H, W]`` or a batch ``[B, 3, H, W]`` in [0, 1].
                Files and PIL images are read by :mod:`~faithdiff_pipeline.image_io`: turned upright by their EXIF
                orientation, converted to sRGB from an embedded profile, 16-bit greyscale kept at 16 bits, and the
                colour under transparent pixels replaced by their surroundings' (the result is RGB; writing it with
                :func:`~faithdiff_pipeline.image_io.save_result` restores alpha, greyscale, bit depth and profile).
                All images of a batch must have the same size.
            prompt_2 (`str` or `list[str]`, *optional*): Prompt for the second text encoder; defaults to ``prompt``.
            negative_prompt (`str` or `list[str]`, *optional*):
                Negative prompt; defaults to ``""``, encoded as a real empty prompt as the release does.
            negative_prompt_2 (`str` or `list[str]`, *optional*): Negative prompt for the second text encoder.
            upscale (`float`, defaults to 2): Scale factor; the input is resized by it with LANCZOS before restoring.
            num_inference_steps (`int`, defaults to 20): Denoising steps.
            timesteps (`list[int]`, *optional*): Custom timesteps, for schedulers that accept them.
            sigmas (`list[float]`, *optional*): Custom sigmas, for schedulers that accept them.
            guidance_scale (`float`, defaults to 5.0): Classifier-free guidance scale; ``<= 1`` disables CFG.
            guidance_rescale (`float`, defaults to 0.0): Guidance rescale factor (Lin et al. 2023); 0 disables it.
            start_point (`str`, defaults to `"lr"`): ``"lr"`` starts from the noised VAE latent of the upscaled input
                (DDPM noise at t = 999); ``"noise"`` from pure noise.
            tile_size (`int`, defaults to 1024): Size in pixels of the square latent tiles the UNet denoises
                (clamped to the image); a multiple of 8, at least 64.
            tile_stride (`int`, *optional*): Distance in pixels between tiles; defaults to the release's half tile
                (``8 * ceil(tile_size / 16)``). A multiple of 8, at most ``tile_size``.
            tile_batch_size (`int`, defaults to 4): Most tiles denoised together in one UNet call (the tiles are
                split into even batches). Larger is faster and uses more memory; the result is the same up to
                floating-point rounding. benchmarks/RESULTS.md measures the speed and memory of each size.
            color_fix (`str`, *optional*, defaults to `"adain"`): ``"adain"``, ``"wavelet"`` or ``None``: colour
                correction against the LANCZOS-upscaled input.
            max_output_pixels (`int`, *optional*, defaults to 8192 * 8192): Largest result (width x height) accepted;
                a larger one is refused before anything is allocated. ``None`` removes the limit. A result with a
                side under ``min_output_size`` (32 pixels for SDXL) is restored padded with its edge pixels up to
                it, then cropped back to its size.
            num_images_per_prompt (`int`, defaults to 1): Restorations per input image.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): Seeds the noise and the VAE sample;
                a list gives one generator per output (images x num_images_per_prompt).
            latents (`torch.Tensor`, *optional*): The standard-normal noise ε to use, ``[B * num_images_per_prompt,
                4, H_pad / 8, W_pad / 8]`` where H_pad, W_pad are the upscaled size padded to a multiple of 8.
            prompt_embeds (`torch.Tensor`, *optional*): Pre-computed text embeddings (see ``encode_prompt``), one per
                image; needs ``pooled_prompt_embeds``.
            negative_prompt_embeds (`torch.Tensor`, *optional*): Pre-computed negative text embeddings.
            pooled_prompt_embeds (`torch.Tensor`, *optional*): Pre-computed pooled text embeddings.
            negative_pooled_prompt_embeds (`torch.Tensor`, *optional*): Pre-computed pooled negative embeddings.
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"``, ``"pt"`` (images in [0, 1]) or
                ``"latent"`` (final latents at the padded size, no decoding or colour fix).
            return_dict (`bool`, defaults to `True`): Return a [`FaithDiffPipelineOutput`] instead of a tuple.
            cross_attention_kwargs (`dict`, *optional*): Passed to the UNet's attention processors (e.g. LoRA
                ``scale``).
            clip_skip (`int`, *optional*): CLIP layers to skip when computing the prompt embeddings.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called at the end of each step as ``callback(pipe, step, timestep, callback_kwargs)`` with the
                whole-image tensors named in ``callback_on_step_end_tensor_inputs``, as in SDXL: ``latents``;
                ``prompt_embeds`` and ``add_text_embeds``, the unconditional copy first with guidance; and
                ``add_time_ids``, each sample's micro-conditioning ``(original height, width, crop top, left, target
                height, width)``, to which each tile's rows add the tile's offset (in latent units) to the crop. The
                tensors it returns condition the following steps. Setting ``pipe._guidance_scale`` to 1 or less turns
                guidance off from the next step, which then runs half the UNet batch (diffusers'
                ``SDXLCFGCutoffCallback`` does this); tensors that still hold both copies then give their conditional
                copy.
            callback_on_step_end_tensor_inputs (`Sequence[str]`, defaults to `("latents",)`): Tensors given to the
                callback, among ``_callback_tensor_inputs``.
            attention_maps ([`~faithdiff_pipeline.attention_maps.AttentionMapRecorder`], *optional*): Records
                DAAM attention maps of chosen words of the prompt (or of the caption the captioner writes) while
                denoising; they are in its ``maps`` once the call returns. The restored images are unchanged. Needs
                ``prompt``, not ``prompt_embeds``; a word the prompt lacks is a ``ValueError``.

        Examples:

        Returns:
            [`FaithDiffPipelineOutput`] or `tuple`: the restored images, cropped to the upscaled size.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs and prepare the LQ images
        self.check_components(
            encodes_prompts=prompt_embeds is None or (negative_prompt_embeds is None and guidance_scale > 1),
            reads_tokens=attention_maps is not None,
        )
        self.check_inputs(
            image,
            prompt,
            negative_prompt,
            prompt_embeds,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_pooled_prompt_embeds,
            num_inference_steps,
            upscale,
            guidance_scale,
            max_output_pixels,
            start_point,
            tile_size,
            tile_stride,
            tile_batch_size,
            color_fix,
            num_images_per_prompt,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        lq = prepare_lq_images(
            image,
            upscale,
            multiple=self.vae_scale_factor,
            min_size=self.min_output_size,
            max_pixels=max_output_pixels,
        )
        image_count = lq.padded.shape[0]
        batch_size = image_count * num_images_per_prompt
        device = self._execution_device

        # 2. Caption the images when no prompt is given, then encode the prompts
        if prompt is None and prompt_embeds is None and self.captioner is not None:
            prompt = self.caption(image, generator)
        if prompt_embeds is None:
            prompt = self._batch_prompts("" if prompt is None else prompt, image_count, "prompt")
            prompt_2 = self._batch_prompts(prompt_2, image_count, "prompt_2")
        elif prompt_embeds.shape[0] != image_count:
            raise ValueError(
                f"`prompt_embeds` has batch size {prompt_embeds.shape[0]}, expected one per image ({image_count})."
            )
        if negative_prompt_embeds is None:
            negative_prompt = self._batch_prompts(
                "" if negative_prompt is None else negative_prompt, image_count, "negative_prompt"
            )
            negative_prompt_2 = self._batch_prompts(negative_prompt_2, image_count, "negative_prompt_2")
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=clip_skip,
            )
        )
        add_text_embeds = pooled_prompt_embeds
        add_time_ids = self.add_time_ids(tuple(lq.padded.shape[-2:]), tile_size, batch_size)
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds])
            add_time_ids = torch.cat([add_time_ids, add_time_ids])

        # 3. Timesteps, LQ features and initial latents
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        padded = lq.padded.to(device)
        lq_features = self.lq_features(padded).repeat_interleave(num_images_per_prompt, dim=0)
        latents = self.prepare_latents(padded, batch_size, start_point, generator, latents)

        # 4. Tiles, and the UNet calls over them with their conditioning, until a step callback changes it
        tiling = self._latent_tiling(latents, tile_size, tile_stride)
        batches = self.prepare_tile_batches(
            tiling, tile_batch_size, lq_features, prompt_embeds, add_text_embeds, add_time_ids
        )
        # The batches hold the tiles' condition embeddings; the features they came from would only take memory.
        del lq_features
        extra_step_kwargs = self._step_kwargs(generator)

        # 5. Denoise: blend the tiles' guided predictions, then one scheduler step on the whole latent
        self._num_timesteps = len(timesteps)
        recording = self._attention_recording(
            attention_maps, prompt, prompt_2, tiling, num_images_per_prompt, lq.size, len(timesteps)
        )
        with recording as attention, self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                noise_pred = self.predict_noise(
                    latents,
                    t,
                    tiling,
                    batches,
                    before_unet=None if attention is None else partial(_announce_unet_call, attention, i),
                )
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    conditioning = {
                        "prompt_embeds": prompt_embeds,
                        "add_text_embeds": add_text_embeds,
                        "add_time_ids": add_time_ids,
                    }
                    available = {"latents": latents, **conditioning}
                    callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    # Conditioning a callback returns, or guidance it turns on or off, conditions the following steps
                    # through the batches.
                    returned = {name: callback_outputs.pop(name, held) for name, held in conditioning.items()}
                    cfg_copies = 2 if self.do_classifier_free_guidance else 1
                    changed = any(returned[name] is not held for name, held in conditioning.items())
                    if changed or cfg_copies != batches[0].cfg_copies:
                        prompt_embeds, add_text_embeds, add_time_ids = (
                            _copies_for_guidance(returned[name], name, cfg_copies, batch_size, i)
                            for name in conditioning
                        )
                        batches = self.relayout_tile_batches(
                            batches, tiling, cfg_copies, prompt_embeds, add_text_embeds, add_time_ids
                        )
                progress_bar.update()

        # 6. Decode, crop the padding away, colour-fix against the upscaled input
        if output_type == "latent":
            images = latents
        else:
            height, width = lq.size
            decoded = self.decode_latents(latents, generator)[..., :height, :width]
            reference = lq.reference.repeat_interleave(num_images_per_prompt, dim=0)
            restored = apply_color_fix(decoded, reference, color_fix)
            images = self.image_processor.postprocess(
                restored, output_type=output_type, do_denormalize=[False] * batch_size
            )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return FaithDiffPipelineOutput(images=images)


def _quantised_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters held as tensor subclasses (torchao, quanto, ...) instead of plain tensors."""
    return [name for name, parameter in model.named_parameters() if type(parameter.data) is not torch.Tensor]


def _check_device_available(device: torch.device, method: str) -> None:
    """Refuses a device this machine does not have, before a memory mode changes anything: torch would fail only
    when the first layer moves, with a driver error, and leave the pipeline half set up."""
    if device.type == "cpu":
        return
    if device.type == "mps":
        count = 1 if torch.backends.mps.is_available() else 0
    else:
        backend = getattr(torch, device.type, None)
        available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
        count = backend.device_count() if available else 0
    if count == 0 or (device.index is not None and device.index >= count):
        kind = {"cuda": "a CUDA GPU", "mps": "Apple's MPS"}.get(device.type, f"a {device.type} device")
        raise ValueError(
            f"`{method}` runs the pipeline on {str(device)!r}, which needs {kind}, and torch sees "
            f"{count} {device.type} device(s) here; pass the device the pipeline runs on (e.g. {method}(\"cpu\"))."
        )


def fp8_linear(module: torch.nn.Module, name: str) -> bool:
    """Which UNet layers float8 compute takes: the linear layers (attention projections, feed-forwards), but not the
    time and micro-conditioning embeddings, whose small inputs float8's scales would crush."""
    return isinstance(module, torch.nn.Linear) and not any(part in name for part in ("time_embedding", "add_embedding"))


def _announce_unet_call(recording: AttentionRecording, step: int, batch: TileBatch) -> None:
    """Tells an attention-map recording which rows of ``batch``'s UNet call at ``step`` to map, and where they go."""
    recording.unet_call(batch.unet_call(step))


def _copies_for_guidance(
    per_sample: torch.Tensor, name: str, cfg_copies: int, samples: int, step: int
) -> torch.Tensor:
    """A step callback's ``prompt_embeds``, ``add_text_embeds`` or ``add_time_ids`` checked against the guidance that
    follows: one row per sample and CFG copy, the unconditional copy first. With guidance turned off, a tensor that
    still holds both copies gives its conditional one, the only copy an unguided step uses."""
    rows = per_sample.shape[0]
    if rows == cfg_copies * samples:
        return per_sample
    if cfg_copies == 1 and rows == 2 * samples:
        return per_sample[samples:]
    state = "on (an unconditional copy first, then the conditional one)" if cfg_copies == 2 else "off"
    raise ValueError(
        f"`{name}` has {rows} rows after the step callback of step {step}; with guidance {state} the next steps "
        f"need {cfg_copies * samples} ({cfg_copies} x {samples} samples)."
    )


def _take_the_folders_variant(folder: str, kwargs: dict[str, Any]) -> None:
    """Sets ``kwargs["variant"]`` to the one weights variant a folder holds where no variant is asked for and some
    components lack full-precision files: diffusers would look for those alone and fail naming a missing
    ``diffusion_pytorch_model.bin``. A folder with several variants is left to diffusers' error."""
    from .hub import folder_weight_variants

    if kwargs.get("variant") is not None:
        return
    variants = folder_weight_variants(folder)
    lacking = [component for component, found in variants.items() if None not in found and component not in kwargs]
    offered = set().union(*(variants[component] for component in lacking))
    if len(offered) != 1:
        return
    (variant,) = offered
    kwargs["variant"] = variant
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    cast = f", cast to {dtype}" if isinstance(dtype, torch.dtype) else " in their stored dtype"
    logger.warning(
        f"{folder!r} holds only {variant!r} weights for {', '.join(lacking)} (no full-precision files): loading "
        f"those{cast}; pass variant={variant!r} to say so, or convert with full-precision weights to avoid their "
        "rounding."
    )


def _check_pipeline_folder(folder: str, provided: Any) -> None:
    """A clear error for folders that are not a converted FaithDiff pipeline."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(
            f"`pretrained_model_name_or_path` {folder!r} is not a FaithDiff pipeline: it has no model_index.json. "
            "Convert the official release with `faithdiff-convert` first."
        )
    with open(index_path, encoding="utf-8") as handle:
        index = json.load(handle)
    missing = [
        name
        for name in ("unet", "alignment", "vae", "text_encoder_2", "tokenizer_2", "scheduler")
        if name not in index and name not in provided
    ]
    if missing:
        raise ValueError(
            f"`pretrained_model_name_or_path` {folder!r} is not a FaithDiff pipeline: its model_index.json "
            f"({index.get('_class_name')}) lacks {missing}. Convert the official release with `faithdiff-convert`, "
            "or pass the missing components as keyword arguments."
        )
