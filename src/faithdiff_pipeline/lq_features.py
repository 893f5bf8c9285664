"""LQ features: the VAE encoder's penultimate (mid-block) output for the degraded image."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders import AutoencoderKL
from diffusers.models.autoencoders.vae import Encoder
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook


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


@apply_forward_hook
def vae_encoder_features(vae: AutoencoderKL, image: torch.Tensor) -> torch.Tensor:
    """LQ features from ``vae.encoder`` itself, for pipelines without a fine-tuned ``lq_encoder``.

    Decorated like ``AutoencoderKL.encode`` so that model CPU offload brings the VAE to the device first.
    """
    return encoder_mid_block_features(vae.encoder, image)


class FaithDiffLQEncoder(ModelMixin, ConfigMixin):
    r"""
    FaithDiff's fine-tuned copy of the SDXL VAE encoder, kept up to its mid block: a diffusers VAE ``Encoder``
    (under ``self.encoder``) without ``conv_norm_out``/``conv_out``, whose mid-block output is the LQ feature map.

    Parameters:
        in_channels (`int`, defaults to 3): Image channels.
        down_block_types (`Tuple[str]`): Down-block classes, as in ``AutoencoderKL``.
        block_out_channels (`Tuple[int]`, defaults to `(128, 256, 512, 512)`): Width of each down block; the last is
            the LQ feature width.
        layers_per_block (`int`, defaults to 2): ResNet layers per down block.
        norm_num_groups (`int`, defaults to 32): GroupNorm groups.
        act_fn (`str`, defaults to `"silu"`): Activation.
        mid_block_add_attention (`bool`, defaults to `True`): Whether the mid block has its attention layer.
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
    ) -> None:
        super().__init__()
        self.encoder = Encoder(
            in_channels=in_channels,
            down_block_types=tuple(down_block_types),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            double_z=True,
            mid_block_add_attention=mid_block_add_attention,
        )
        # The release does not train (or ship) the output head: the features are taken before it.
        del self.encoder.conv_norm_out, self.encoder.conv_act, self.encoder.conv_out

    @classmethod
    def from_vae(cls, vae: AutoencoderKL) -> "FaithDiffLQEncoder":
        """A copy of ``vae.encoder`` (minus its output head): the starting point for training."""
        config = vae.config
        lq_encoder = cls(
            in_channels=config.in_channels,
            down_block_types=config.down_block_types,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
            act_fn=config.act_fn,
            mid_block_add_attention=config.get("mid_block_add_attention", True),
        )
        state = {
            k: v for k, v in vae.encoder.state_dict().items() if not k.startswith(("conv_norm_out.", "conv_out."))
        }
        lq_encoder.encoder.load_state_dict(state)
        return lq_encoder.to(device=vae.device, dtype=vae.dtype)

    @property
    def feature_channels(self) -> int:
        return self.config.block_out_channels[-1]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            image (`torch.Tensor`): ``[B, 3, H, W]`` in [-1, 1], H and W multiples of 8.

        Returns:
            `torch.Tensor`: the mid-block features, ``[B, feature_channels, H / 8, W / 8]``.
        """
        return encoder_mid_block_features(self.encoder, image)
