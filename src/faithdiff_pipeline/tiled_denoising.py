"""Denoising over the release's overlapping latent tiles: the UNet calls of one step with their conditioning laid out
row for row (:class:`TileBatch`), each tile's alignment condition, classifier-free guidance per call, and the
Gaussian blend of the tiles' predictions.

[`FaithDiffSDXLPipeline`] and the modular denoising blocks (``faithdiff_pipeline.modular``) both compute through these
functions, so that the two give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

from .alignment import FaithDiffAlignmentModel, aligned_conv_in
from .attention_maps import UNetCall
from .tiling import LatentTiling, default_latent_stride

# SDXL's micro-conditioning: original size, crop offset and target size, two numbers each.
TIME_IDS = 6


@dataclass(frozen=True)
class TileBatch:
    """The latent tiles of one UNet call and what the call is conditioned on, which changes only when a step callback
    changes the conditioning or turns guidance on or off.

    The UNet batch has ``cfg_copies * len(indices) * samples`` rows: each CFG copy (the unconditional one first)
    holds the tiles one after the other, as :meth:`~faithdiff_pipeline.tiling.LatentTiling.crop` stacks them, and
    each tile the samples in order. Every tensor here is laid out that way, on the device and in the UNet's dtype.

    Attributes:
        indices (`range`): The tiles, as indices into the tiling's ``origins``.
        samples (`int`): Samples per tile (images x ``num_images_per_prompt``).
        cfg_copies (`int`): 2 with classifier-free guidance (unconditional and conditional copies), else 1.
        condition_embeds (`torch.Tensor`): The alignment condition, each tile embedded on its own crop of the LQ
            features, ``[rows, latent_channels, tile_height, tile_width]``.
        time_ids (`torch.Tensor`): SDXL's micro-conditioning, ``[rows, 6]``.
        prompt_embeds (`torch.Tensor`): The text encoders' states, ``[rows, tokens, width]``; batches with as many
            tiles share one tensor.
        text_embeds (`torch.Tensor`): The pooled text embeddings, ``[rows, width]``; shared like ``prompt_embeds``.
    """

    indices: range
    samples: int
    cfg_copies: int
    condition_embeds: torch.Tensor
    time_ids: torch.Tensor
    prompt_embeds: torch.Tensor
    text_embeds: torch.Tensor

    def unet_call(self, step: int) -> UNetCall:
        """The rows of this batch's UNet call at ``step`` that are conditioned on the prompt (the last CFG copy), with
        the tile and the sample of each: what an attention-map recording needs to place them."""
        rows = len(self.indices) * self.samples
        return UNetCall(
            step=step,
            rows=range((self.cfg_copies - 1) * rows, self.cfg_copies * rows),
            tiles=[tile for tile in self.indices for _ in range(self.samples)],
            samples=list(range(self.samples)) * len(self.indices),
        )


def latent_tiling(
    latents: torch.Tensor, tile_size: int, tile_stride: int | None, vae_scale_factor: int
) -> LatentTiling:
    """The tiles of ``latents`` (``[B, C, height, width]``): ``tile_size`` pixels square, ``tile_stride`` pixels apart
    (the release's half tile when None), on the latents' device."""
    tile = tile_size // vae_scale_factor
    stride = default_latent_stride(tile) if tile_stride is None else tile_stride // vae_scale_factor
    return LatentTiling.for_latent(latents.shape[-2], latents.shape[-1], tile, stride, latents.device)


def add_time_ids(
    padded_size: tuple[int, int], tile_size: int, samples: int, device: torch.device | str
) -> torch.Tensor:
    """SDXL's micro-conditioning of each sample, ``[samples, 6]`` float32, as the release sets it: original size = the
    padded image, crop = (0, 0), target = the (unclamped) tile size in pixels. Each tile's rows add the tile's offset,
    in latent units as the release has it, to the crop (see :func:`build_tile_batches`)."""
    row = torch.tensor([[*padded_size, 0, 0, tile_size, tile_size]], dtype=torch.float32)
    return row.repeat(samples, 1).to(device)


def build_tile_batches(
    tiling: LatentTiling,
    tile_batch_size: int,
    alignment: FaithDiffAlignmentModel,
    unet_dtype: torch.dtype,
    cfg_copies: int,
    lq_features: torch.Tensor,
    prompt_embeds: torch.Tensor,
    add_text_embeds: torch.Tensor,
    add_time_ids: torch.Tensor,
) -> list[TileBatch]:
    """The UNet calls of one denoising step: the tiles split into even batches of at most ``tile_batch_size``, each
    with its conditioning laid out as the UNet takes it (see [`TileBatch`]), built once for the whole run.

    With guidance, the condition embeddings are kept once per CFG copy rather than copied at every UNet call; they
    are the only tensors here whose memory grows with the image (about 10 MiB per 1024-pixel SDXL tile and copy in
    half precision).

    Args:
        tiling ([`~faithdiff_pipeline.tiling.LatentTiling`]): The latent tiles.
        tile_batch_size (`int`): Most tiles in one UNet call.
        alignment ([`FaithDiffAlignmentModel`]): Embeds each tile's LQ features.
        unet_dtype (`torch.dtype`): The UNet's dtype, which every tensor of a call is given.
        cfg_copies (`int`): 2 with classifier-free guidance, else 1.
        lq_features (`torch.Tensor`): LQ features of every sample, ``[samples, lq_channels, H / 8, W / 8]``.
        prompt_embeds (`torch.Tensor`): Text encoders' states of every sample, the CFG copies concatenated (the
            unconditional one first).
        add_text_embeds (`torch.Tensor`): Pooled text embeddings, laid out like ``prompt_embeds``.
        add_time_ids (`torch.Tensor`): Micro-conditioning of every sample (:func:`add_time_ids`), laid out like
            ``prompt_embeds``.
    """
    conditions = [
        (indices, embed_tiles(alignment, lq_features, tiling, indices)) for indices in tiling.batches(tile_batch_size)
    ]
    return _tile_batches(tiling, conditions, cfg_copies, unet_dtype, prompt_embeds, add_text_embeds, add_time_ids)


def relayout_tile_batches(
    batches: list[TileBatch],
    tiling: LatentTiling,
    cfg_copies: int,
    unet_dtype: torch.dtype,
    prompt_embeds: torch.Tensor,
    add_text_embeds: torch.Tensor,
    add_time_ids: torch.Tensor,
) -> list[TileBatch]:
    """``batches`` with other conditioning and ``cfg_copies`` CFG copies, laid out as :func:`build_tile_batches` lays
    them out. The tiles' condition embeddings are the same in every copy, so they are reused, not recomputed."""
    conditions = [
        (batch.indices, batch.condition_embeds[-len(batch.indices) * batch.samples :]) for batch in batches
    ]
    return _tile_batches(tiling, conditions, cfg_copies, unet_dtype, prompt_embeds, add_text_embeds, add_time_ids)


def _tile_batches(
    tiling: LatentTiling,
    conditions: list[tuple[range, torch.Tensor]],
    cfg_copies: int,
    unet_dtype: torch.dtype,
    prompt_embeds: torch.Tensor,
    add_text_embeds: torch.Tensor,
    add_time_ids: torch.Tensor,
) -> list[TileBatch]:
    """Tile batches of the tiles and condition embeddings (one copy) of ``conditions``, with ``cfg_copies`` CFG
    copies of everything. The condition embeddings are repeated once per copy here, rather than copied at every
    UNet call."""
    samples = add_time_ids.shape[0] // cfg_copies
    prompts = _tile_major_prompts(
        prompt_embeds, add_text_embeds, {len(indices) for indices, _ in conditions}, cfg_copies, unet_dtype
    )
    return [
        TileBatch(
            indices=indices,
            samples=samples,
            cfg_copies=cfg_copies,
            condition_embeds=condition.repeat(cfg_copies, 1, 1, 1),
            time_ids=_time_ids(tiling, indices, add_time_ids, cfg_copies, unet_dtype),
            prompt_embeds=prompts[len(indices)][0],
            text_embeds=prompts[len(indices)][1],
        )
        for indices, condition in conditions
    ]


def _tile_major_prompts(
    prompt_embeds: torch.Tensor,
    add_text_embeds: torch.Tensor,
    tile_counts: set[int],
    cfg_copies: int,
    unet_dtype: torch.dtype,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The prompt and pooled embeddings laid out for a UNet call of each of ``tile_counts`` tiles. They depend only on
    how many tiles a call has, and the even batches have at most two counts, so these tensors take the memory of two
    UNet batches however many tiles there are."""
    return {
        tiles: (
            tile_major(prompt_embeds, tiles, cfg_copies).to(unet_dtype),
            tile_major(add_text_embeds, tiles, cfg_copies).to(unet_dtype),
        )
        for tiles in sorted(tile_counts)
    }


def _time_ids(
    tiling: LatentTiling, indices: range, add_time_ids: torch.Tensor, cfg_copies: int, unet_dtype: torch.dtype
) -> torch.Tensor:
    """SDXL micro-conditioning of tiles ``indices``, laid out like their UNet input: each sample's ``add_time_ids``
    with the tile's offset in latent units added to the crop, as the release sets it."""
    samples = add_time_ids.shape[0] // cfg_copies
    offsets = torch.zeros(len(indices), TIME_IDS, dtype=torch.float32)
    offsets[:, 2:4] = torch.tensor([tiling.origins[i] for i in indices], dtype=torch.float32)
    offsets = offsets.repeat_interleave(samples, dim=0).repeat(cfg_copies, 1).to(add_time_ids.device)
    rows = tile_major(add_time_ids.float(), len(indices), cfg_copies) + offsets
    return rows.to(tiling.device, unet_dtype)


def embed_tiles(
    alignment: FaithDiffAlignmentModel, lq_features: torch.Tensor, tiling: LatentTiling, indices: range
) -> torch.Tensor:
    """Alignment condition of tiles ``indices``, each embedded on its own crop of the LQ features, as the release does
    (the embedding's GroupNorm and convolutions see only the tile)."""
    return torch.cat([alignment.embed_condition(tiling.crop(lq_features, [i])) for i in indices])


def tile_major(per_sample: torch.Tensor, tiles: int, cfg_copies: int) -> torch.Tensor:
    """Lays out per-sample conditioning ``[cfg_copies * N, ...]`` for a UNet batch of ``tiles`` tiles: each CFG half
    holds the tiles one after the other, each tile the N samples in order."""
    halves = per_sample.chunk(cfg_copies)
    return torch.cat([half.repeat(tiles, *([1] * (half.ndim - 1))) for half in halves])


def tile_noise(
    unet: torch.nn.Module,
    alignment: FaithDiffAlignmentModel,
    model_input: torch.Tensor,
    t: torch.Tensor,
    batch: TileBatch,
    cross_attention_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The UNet's noise prediction for the tiles of ``batch``, every CFG copy in one call, with the alignment module
    fusing each tile's condition after ``conv_in``; float32, laid out like the batch's rows.

    Args:
        unet (`UNet2DConditionModel`): The FaithDiff UNet.
        alignment ([`FaithDiffAlignmentModel`]): The alignment module.
        model_input (`torch.Tensor`): The tiles of the (scheduler-scaled) latents, one stack per CFG copy, in the
            UNet's dtype.
        t (`torch.Tensor`): The timestep.
        batch ([`TileBatch`]): The call's conditioning.
        cross_attention_kwargs (`dict`, *optional*): Passed to the UNet's attention processors.
    """
    with aligned_conv_in(unet, alignment, batch.condition_embeds):
        return unet(
            model_input,
            t,
            encoder_hidden_states=batch.prompt_embeds,
            cross_attention_kwargs=cross_attention_kwargs,
            added_cond_kwargs={"text_embeds": batch.text_embeds, "time_ids": batch.time_ids},
            return_dict=False,
        )[0].float()


def guided_noise(
    noise: torch.Tensor, cfg_copies: int, guidance_scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """Classifier-free guidance of a tile batch's prediction ``noise`` (:func:`tile_noise`): with two CFG copies,
    ``uncond + guidance_scale * (cond - uncond)``, rescaled towards the conditional prediction's spread by
    ``guidance_rescale`` (Lin et al. 2023) when it is above 0; one copy is returned as it is."""
    if cfg_copies == 1:
        return noise
    noise_uncond, noise_text = noise.chunk(2)
    guided = noise_uncond + guidance_scale * (noise_text - noise_uncond)
    if guidance_rescale > 0:
        guided = rescale_noise_cfg(guided, noise_text, guidance_rescale=guidance_rescale)
    return guided
