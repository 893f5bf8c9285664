"""The FaithDiff alignment module: fuses LQ-encoder features with the noisy latent right after the UNet's conv_in."""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# "transformer": the released module; "conv_add": the paper's "w/o align" ablation (one convolution on each input).
ALIGNMENT_TYPES = ("transformer", "conv_add")


class ConditionEmbedding(nn.Module):
    """Maps LQ features (``lq_channels``) to the UNet's conv_in width: GroupNorm, conv, SiLU, conv."""

    def __init__(self, lq_channels: int, out_channels: int, norm_num_groups: int = 32) -> None:
        super().__init__()
        self.norm_in = nn.GroupNorm(num_groups=norm_num_groups, num_channels=lq_channels, eps=1e-6)
        self.conv_in = nn.Conv2d(lq_channels, lq_channels, kernel_size=3, padding=1)
        self.conv_out = nn.Conv2d(lq_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, lq_features: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.conv_in(self.norm_in(lq_features))))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class AlignmentMLP(nn.Sequential):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(hidden, width)


class AlignmentBlock(nn.Module):
    """Pre-norm residual block: ``x + Attn(LN1(x))`` then ``x + MLP(LN2(x))`` on channel-last features.

    The released weights were trained with ``nn.MultiheadAttention`` applied to a ``[B, H*W, C]`` tensor with
    ``batch_first=False``: the "sequence" it attends over is the batch, at each pixel. At inference every sequence
    element is the same sample (the two CFG halves are identical), so the softmax is uniform over equal values and
    the layer reduces exactly to ``out_proj(v_proj(x))``. That is what is computed here, per sample and per pixel,
    so that batching different images or tiles never mixes them. The query and key projections stay in
    ``attn.in_proj_weight`` so checkpoints round-trip unchanged.

    With ``spatial=True`` (a research option, not the released model) the same weights attend across the pixels of
    each sample instead: multi-head self-attention over its ``h * w`` positions (within a tile at inference).
    """

    def __init__(self, width: int, num_attention_heads: int, mlp_ratio: int, spatial: bool = False) -> None:
        super().__init__()
        self.spatial = spatial
        self.attn = nn.MultiheadAttention(width, num_attention_heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = AlignmentMLP(width, width * mlp_ratio)
        self.ln_2 = nn.LayerNorm(width)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial:
            return self.spatial_attention(x)
        width = x.shape[-1]
        value = F.linear(x, self.attn.in_proj_weight[2 * width :], self.attn.in_proj_bias[2 * width :])
        return self.attn.out_proj(value)

    def spatial_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over each sample's pixels, ``x`` being ``[B, h, w, C]``."""
        batch, height, width, channels = x.shape
        heads = self.attn.num_heads
        qkv = F.linear(x.reshape(batch, height * width, channels), self.attn.in_proj_weight, self.attn.in_proj_bias)
        query, key, value = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        attended = (
            F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(batch, height * width, channels)
        )
        return self.attn.out_proj(attended).reshape(batch, height, width, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class FaithDiffAlignmentModel(ModelMixin, ConfigMixin):
    r"""
    FaithDiff's alignment module. Given the output ``h`` of the UNet's ``conv_in`` (``latent_channels`` wide) and the
    LQ encoder's penultimate features ``f`` at the same resolution, it returns ``h + proj_out(blocks([h, embed(f)]))``,
    every operation after the condition embedding being per pixel and per sample.

    ``alignment_type="conv_add"`` builds the paper's "w/o align" ablation instead: ``h + latent_conv(h) +
    lq_conv(f)``, one 3 x 3 convolution on each input, added to the latent; its condition embedding is ``lq_conv(f)``.

    Parameters:
        lq_channels (`int`, defaults to 512): Channels of the LQ features (the VAE encoder's mid-block width, or
            ``2 * latent_channels`` of the VAE for its last layer's output).
        latent_channels (`int`, defaults to 320): Channels of the UNet's ``conv_in`` output.
        num_layers (`int`, defaults to 2): Number of residual alignment blocks (``"transformer"`` only).
        num_attention_heads (`int`, defaults to 8): Heads of the attention layers (kept for the checkpoint layout;
            the per-sample computation does not depend on it; ``"transformer"`` only).
        mlp_ratio (`int`, defaults to 2): Hidden width of each MLP as a multiple of the block width
            ``2 * latent_channels`` (``"transformer"`` only).
        norm_num_groups (`int`, defaults to 32): Groups of the condition embedding's GroupNorm; must divide
            ``lq_channels`` (``"transformer"`` only).
        spatial_attention (`bool`, defaults to `False`): Attend across pixels instead of the release's per-pixel
            attention (a research option for training new models; the released weights use `False`;
            ``"transformer"`` only).
        alignment_type (`str`, defaults to `"transformer"`): ``"transformer"``, the released module, or
            ``"conv_add"``, the paper's "w/o align" ablation (see above).
    """

    @register_to_config
    def __init__(
        self,
        lq_channels: int = 512,
        latent_channels: int = 320,
        num_layers: int = 2,
        num_attention_heads: int = 8,
        mlp_ratio: int = 2,
        norm_num_groups: int = 32,
        spatial_attention: bool = False,
        alignment_type: str = "transformer",
    ) -> None:
        super().__init__()
        _check_variant(lq_channels, norm_num_groups, spatial_attention, alignment_type)
        if alignment_type == "conv_add":
            self.latent_conv = nn.Conv2d(latent_channels, latent_channels, kernel_size=3, padding=1)
            self.lq_conv = nn.Conv2d(lq_channels, latent_channels, kernel_size=3, padding=1)
        else:
            width = 2 * latent_channels
            self.condition_embedding = ConditionEmbedding(lq_channels, latent_channels, norm_num_groups)
            self.blocks = nn.ModuleList(
                [AlignmentBlock(width, num_attention_heads, mlp_ratio, spatial_attention) for _ in range(num_layers)]
            )
            self.proj_out = nn.Linear(width, latent_channels)
        # A freshly built module starts as the release's training does: the LQ path's last convolution and the
        # output projection are zero, so the UNet is unchanged and the LQ condition enters from zero. Loading
        # weights (from_pretrained, load_state_dict) overwrites this initialisation.
        self.zero_init_output()

    def zero_init_output(self) -> None:
        """Zero the layers that end each path: the condition embedding's output convolution and the output
        projection (``"conv_add"``: both convolutions).

        The module then adds nothing to the UNet's conv_in output and its condition embedding is zero, as in the
        release at the start of training. A freshly built module is already in this state; call it again to
        reset one whose weights were changed.
        """
        if self.config.alignment_type == "conv_add":
            layers = (self.latent_conv, self.lq_conv)
        else:
            layers = (self.condition_embedding.conv_out, self.proj_out)
        for layer in layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed_condition(self, lq_features: torch.Tensor) -> torch.Tensor:
        """Condition embedding of LQ features ``[B, lq_channels, h, w]`` -> ``[B, latent_channels, h, w]``.

        It convolves and normalises over the whole input, so a tile's embedding must be computed on that tile's
        features (as the release does), not cropped from the embedding of the whole image.
        """
        lq_features = lq_features.to(self.dtype)
        if self.config.alignment_type == "conv_add":
            return self.lq_conv(lq_features)
        return self.condition_embedding(lq_features)

    def forward(
        self,
        hidden_states: torch.Tensor,
        lq_features: torch.Tensor | None = None,
        condition_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor`): ``unet.conv_in`` output, ``[B, latent_channels, h, w]``.
            lq_features (`torch.Tensor`, *optional*): LQ-encoder features ``[B, lq_channels, h, w]``.
            condition_embeds (`torch.Tensor`, *optional*): The same features already passed through
                [`~FaithDiffAlignmentModel.embed_condition`] (give exactly one of the two).

        Returns:
            `torch.Tensor`: ``hidden_states`` plus the alignment residual, same shape and dtype.
        """
        if (lq_features is None) == (condition_embeds is None):
            raise ValueError("Pass exactly one of `lq_features` and `condition_embeds` to the alignment module.")
        if condition_embeds is None:
            condition_embeds = self.embed_condition(lq_features)
        if condition_embeds.shape != hidden_states.shape:
            raise ValueError(
                f"`condition_embeds` has shape {tuple(condition_embeds.shape)}, expected the conv_in output's shape "
                f"{tuple(hidden_states.shape)}."
            )
        if self.config.alignment_type == "conv_add":
            residual = self.latent_conv(hidden_states.to(self.dtype)) + condition_embeds.to(self.dtype)
            return hidden_states + residual.to(hidden_states.dtype)
        fused = torch.cat([hidden_states.to(self.dtype), condition_embeds.to(self.dtype)], dim=1)
        fused = fused.permute(0, 2, 3, 1)
        for block in self.blocks:
            fused = block(fused)
        residual = self.proj_out(fused).permute(0, 3, 1, 2)
        return hidden_states + residual.to(hidden_states.dtype)


def _check_variant(lq_channels: int, norm_num_groups: int, spatial_attention: bool, alignment_type: str) -> None:
    if alignment_type not in ALIGNMENT_TYPES:
        raise ValueError(f"`alignment_type` must be one of {ALIGNMENT_TYPES}, got {alignment_type!r}.")
    if alignment_type == "conv_add" and spatial_attention:
        raise ValueError(
            "`spatial_attention=True` needs `alignment_type='transformer'`; the 'conv_add' module has no attention."
        )
    if alignment_type == "transformer" and lq_channels % norm_num_groups:
        raise ValueError(
            f"`norm_num_groups` {norm_num_groups} must divide `lq_channels` {lq_channels} (the condition embedding's "
            f"GroupNorm), e.g. {math.gcd(32, lq_channels)}."
        )


class _AlignmentHook:
    """The forward hook on a UNet's ``conv_in``. It is registered once per ``conv_in`` module and stays: a whole-UNet
    ``torch.compile`` then sees the same hook on every call and guards only on the condition's shape, instead of
    recompiling for each new hook.

    The condition belongs to the pipeline call that runs the UNet, not to the UNet: pipelines that share the UNet
    (``from_pipe`` copies serving requests in threads, or a stock SDXL pipeline) each see only their own, and a thread
    that set none gets the plain ``conv_in`` output. It is kept per thread (a UNet call runs in its caller's thread)
    rather than in a ``contextvars.ContextVar``, which ``torch.compile`` cannot trace.
    """

    def __init__(self) -> None:
        self._calls = threading.local()

    def current(self) -> tuple[FaithDiffAlignmentModel, torch.Tensor] | None:
        """The alignment module and condition set by this thread's call, or None."""
        return getattr(self._calls, "aligned", None)

    def set(self, aligned: tuple[FaithDiffAlignmentModel, torch.Tensor] | None) -> None:
        self._calls.aligned = aligned

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        aligned = getattr(self._calls, "aligned", None)
        if aligned is None:
            return None
        alignment, condition = aligned
        return alignment(output, condition_embeds=condition)


def _conv_in_hook(unet: nn.Module) -> _AlignmentHook:
    """The alignment hook of the module that is ``unet.conv_in`` now, registered on first use.

    A LoRA on ``conv_in`` (peft) replaces the module with a wrapper around it; the hook must sit on the wrapper, whose
    output includes the LoRA's contribution, so that the alignment sees what the UNet's next layer sees. The wrapped
    module keeps its own hook, which has no condition and changes nothing, and serves again once the LoRA is unloaded.
    """
    conv_in = unet.conv_in
    # Read from the module's own attributes: a wrapper may forward unknown attributes to the module it wraps.
    hook = vars(conv_in).get("_faithdiff_alignment_hook")
    if hook is None:
        hook = _AlignmentHook()
        conv_in.register_forward_hook(hook)
        conv_in._faithdiff_alignment_hook = hook
    return hook


@contextmanager
def aligned_conv_in(
    unet: nn.Module, alignment: FaithDiffAlignmentModel, condition_embeds: torch.Tensor
) -> Iterator[None]:
    """Within this context, every call of ``unet`` made by this thread adds the alignment residual to its ``conv_in``
    output.

    A forward hook keeps the UNet diffusers' own class (LoRA, attention processors, FreeU and layerwise casting keep
    working); outside the context the UNet computes exactly what it computes without FaithDiff, even after an error.
    Calls of the same UNet by other threads, inside or outside their own context, never see this condition.
    """
    hook = _conv_in_hook(unet)
    outer = hook.current()
    hook.set((alignment, condition_embeds))
    try:
        yield
    finally:
        hook.set(outer)
