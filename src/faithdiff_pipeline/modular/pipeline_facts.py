"""What every FaithDiff block knows of the pipeline it runs in: the blocks' model name and requirements, the output
types, and what they read off the components (the VAE's scale, the UNet's smallest image, whether a call guides) and
off the pipeline state. Apart from the pipeline class, which builds the default blocks, so that the blocks and the
class do not import each other."""

from __future__ import annotations

from diffusers.modular_pipelines import ModularPipeline, PipelineState

from .. import __version__

# FaithDiff is SDXL with two more components, so its blocks carry SDXL's model name: diffusers then builds them into
# StableDiffusionXLModularPipeline (init_pipeline), the class a saved folder names (see hub.MODULAR_PIPELINE).
MODEL_NAME = "stable-diffusion-xl"
# What a folder's blocks need: the package whose classes their code file imports.
REQUIREMENTS = {"faithdiff-pipeline": f">={__version__}"}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def vae_scale_factor(components: ModularPipeline) -> int:
    """Pixels per latent: 2 ** (VAE down blocks - 1), SDXL's 8 without a VAE."""
    vae = getattr(components, "vae", None)
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8


def min_output_size(components: ModularPipeline) -> int:
    """The smallest side, in pixels, of an image the UNet runs on: one latent pixel at its lowest resolution."""
    unet = getattr(components, "unet", None)
    levels = len(unet.config.block_out_channels) if unet is not None else 1
    return vae_scale_factor(components) * 2 ** (levels - 1)


def passed_as_none(state: PipelineState, name: str) -> bool:
    """Whether the call gave input ``name`` as None, where None means something (``color_fix=None``: no colour fix)
    rather than "the default".

    A block cannot tell from its block state: ``ModularPipelineBlocks.get_block_state`` puts an input's default in
    place of None, whether None was passed or nothing was. ``ModularPipeline.__call__`` stores the default in the
    pipeline state for inputs not passed, and a passed None as None, so the state tells them apart.
    """
    return name in state.values and state.get(name) is None


def does_guidance(components: ModularPipeline, guidance_scale: float) -> bool:
    """Whether a call guides (``guidance_scale`` > 1), as FaithDiffSDXLPipeline decides it: never with a UNet
    distilled for guidance (one with a ``time_cond_proj_dim``)."""
    unet = getattr(components, "unet", None)
    distilled = unet is not None and unet.config.time_cond_proj_dim is not None
    return guidance_scale > 1 and not distilled
