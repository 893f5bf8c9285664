"""LQ features: the VAE encoder's penultimate (mid-block) output for the degraded image, or its last layer's output
(the paper's "w last layer" ablation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders import AutoencoderKL
from diffusers.models.autoencoders.vae import Encoder
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook

from .tiling import tiled_encode

# "mid_block": the release's penultimate features; "last_layer": the encoder's output head (norm, act, conv_out).
FEATURE_SOURCES = ("mid_block", "last_layer")
_HEAD = ("conv_norm_out", "conv_act", "conv_out")


def encoder_mid_block_features(encoder: Encoder, image: torch.Tensor) -> torch.Tensor:
    """Runs a diffusers VAE ``Encoder`` on ``image`` (``[B, 3, H, W]`` in [-1, 1]) up to and including its mid block.

    Returns the mid-block output (``block_out_channels[-1]`` channels at 1/8 of the size for SDXL's VAE); the output
    head (``conv_norm_out``/``conv_out``) is neither run nor required to exist. The steps are the encoder's own, in
    its order, with its gradient checkpointing where it is enabled, so this compiles as one graph and trains as the
    encoder would.
    """
    sample = encoder.conv_in(image.to(device=encoder.conv_in.weight.device, dtype=encoder.conv_in.weight.dtype))
    checkpointed = torch.is_grad_enabled() and encoder.gradient_checkpointing
    for block in [*encoder.down_blocks, encoder.mid_block]:
        sample = encoder._gradient_checkpointing_func(block, sample) if checkpointed else block(sample)
    return sample


def encoder_features(encoder: Encoder, image: torch.Tensor, feature_source: str = "mid_block") -> torch.Tensor:
    """The features ``feature_source`` names: the mid-block output (see :func:`encoder_mid_block_features`), or for
    ``"last_layer"`` that output through the encoder's head (``conv_norm_out``, ``conv_act``, ``conv_out``): its
    final ``2 * latent_channels`` channels, the mean and log-variance of the VAE's posterior."""
    _check_feature_source(feature_source)
    sample = encoder_mid_block_features(encoder, image)
    if feature_source == "mid_block":
        return sample
    return encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(sample)))


def vae_feature_source(vae_config: Mapping[str, Any], channels: int | None = None) -> str:
    """The output of a VAE encoder (``AutoencoderKL`` config ``vae_config``) that is ``channels`` wide:
    ``"mid_block"`` (``block_out_channels[-1]``, also for ``None``) or ``"last_layer"`` (``2 * latent_channels``).

    Raises:
        ValueError: ``channels`` is neither width.
    """
    mid_block, last_layer = vae_config["block_out_channels"][-1], 2 * vae_config["latent_channels"]
    if channels is None or channels == mid_block:
        return "mid_block"
    if channels == last_layer:
        return "last_layer"
    raise ValueError(
        f"`channels` {channels} matches no output of the VAE encoder: expected its mid-block width {mid_block} or "
        f"its last layer's {last_layer} (2 x latent_channels)."
    )


@apply_forward_hook
def vae_encoder_features(vae: AutoencoderKL, image: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """LQ features from ``vae.encoder`` itself, for pipelines without a fine-tuned ``lq_encoder``: the mid-block
    output, or the last layer's when ``channels`` is that width (see :func:`vae_feature_source`), so that they fit
    an alignment module trained on either.

    Decorated like ``AutoencoderKL.encode`` so that model CPU offload brings the VAE to the device first.
    """
    return encoder_features(vae.encoder, image, vae_feature_source(vae.config, channels))


def compute_lq_features(
    image: torch.Tensor,
    lq_encoder: FaithDiffLQEncoder | None,
    vae: AutoencoderKL,
    lq_channels: int,
    vae_scale_factor: int,
) -> torch.Tensor:
    """LQ features of ``image`` (``[B, 3, H, W]`` in [-1, 1]): ``lq_encoder``'s output, or without one the output of
    ``vae.encoder`` that is ``lq_channels`` wide (what the alignment module takes: see :func:`vae_feature_source`).

    With the VAE's tiling enabled (``vae.enable_tiling()``) the encoder runs over tiles of the VAE's tile size and
    overlap, blended where they meet, so that its memory stays bounded as the VAE's does.
    """
    if lq_encoder is not None:
        encode = lq_encoder
    else:
        encode = partial(vae_encoder_features, vae, channels=lq_channels)
    if not getattr(vae, "use_tiling", False):
        return encode(image)
    return tiled_encode(encode, image, vae.tile_sample_min_size, vae.tile_overlap_factor, vae_scale_factor)


def _check_feature_source(feature_source: str) -> None:
    if feature_source not in FEATURE_SOURCES:
        raise ValueError(f"`feature_source` must be one of {FEATURE_SOURCES}, got {feature_source!r}.")


class FaithDiffLQEncoder(ModelMixin, ConfigMixin):
    r"""
    FaithDiff's fine-tuned copy of the SDXL VAE encoder, kept up to its mid block: a diffusers VAE ``Encoder``
    (under ``self.encoder``) without ``conv_norm_out``/``conv_out``, whose mid-block output is the LQ feature map.
    With ``feature_source="last_layer"`` (the paper's "w last layer" ablation) it keeps the output head, and the LQ
    features are the encoder's final ``2 * latent_channels`` channels.

    Parameters:
        in_channels (`int`, defaults to 3): Image channels.
        down_block_types (`Tuple[str]`): Down-block classes, as in ``AutoencoderKL``.
        block_out_channels (`Tuple[int]`, defaults to `(128, 256, 512, 512)`): Width of each down block; the last is
            the LQ feature width.
        layers_per_block (`int`, defaults to 2): ResNet layers per down block.
        norm_num_groups (`int`, defaults to 32): GroupNorm groups.
        act_fn (`str`, defaults to `"silu"`): Activation.
        mid_block_add_attention (`bool`, defaults to `True`): Whether the mid block has its attention layer.
        feature_source (`str`, defaults to `"mid_block"`): ``"mid_block"`` (the release) or ``"last_layer"``.
        latent_channels (`int`, defaults to 4): The VAE's latent channels; the output head (``"last_layer"`` only)
            gives twice as many.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",) * 4,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        mid_block_add_attention: bool = True,
        feature_source: str = "mid_block",
        latent_channels: int = 4,
    ) -> None:
        super().__init__()
        _check_feature_source(feature_source)
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=tuple(down_block_types),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            double_z=True,
            mid_block_add_attention=mid_block_add_attention,
        )
        if feature_source == "mid_block":
            # The release does not train (or ship) the output head: the features are taken before it.
            for name in _HEAD:
                delattr(self.encoder, name)

    @classmethod
    def from_vae(cls, vae: AutoencoderKL, feature_source: str = "mid_block") -> FaithDiffLQEncoder:
        """A copy of ``vae.encoder`` (minus its output head, unless ``feature_source`` is ``"last_layer"``): the
        starting point for training."""
        config = vae.config
        lq_encoder = cls(
            in_channels=config.in_channels,
            down_block_types=config.down_block_types,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
            act_fn=config.act_fn,
            mid_block_add_attention=config.get("mid_block_add_attention", True),
            feature_source=feature_source,
            latent_channels=config.latent_channels,
        )
        state = vae.encoder.state_dict()
        if feature_source == "mid_block":
            state = {k: v for k, v in state.items() if not k.startswith(("conv_norm_out.", "conv_out."))}
        lq_encoder.encoder.load_state_dict(state)
        return lq_encoder.to(device=vae.device, dtype=vae.dtype)

    @property
    def feature_channels(self) -> int:
        """Channels of the LQ features: the mid block's width, or ``2 * latent_channels`` for ``"last_layer"``."""
        if self.config.feature_source == "last_layer":
            return 2 * self.config.latent_channels
        return self.config.block_out_channels[-1]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            image (`torch.Tensor`): ``[B, 3, H, W]`` in [-1, 1], H and W multiples of 8.

        Returns:
            `torch.Tensor`: the features of ``feature_source``, ``[B, feature_channels, H / 8, W / 8]``.
        """
        return encoder_features(self.encoder, image, self.config.feature_source)
