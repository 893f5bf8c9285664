"""The alignment module against an independent re-statement of the release's computation, and its UNet hook."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny_models import tiny_components
from faithdiff_pipeline import FaithDiffAlignmentModel, aligned_conv_in


def _random_alignment(seed: int = 0) -> FaithDiffAlignmentModel:
    torch.manual_seed(seed)
    model = FaithDiffAlignmentModel(lq_channels=64, latent_channels=32, num_layers=2, num_attention_heads=8)
    for param in model.parameters():
        param.data.normal_(0, 0.2)
    return model.eval()


def _release_style(model: FaithDiffAlignmentModel, hidden: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """The release's layout: nn.MultiheadAttention (batch_first=False) over [B, H*W, 2C], attending across the batch,
    for a CFG-style batch whose two halves are the same sample."""
    pair_hidden, pair_lq = torch.cat([hidden] * 2), torch.cat([lq] * 2)
    cond = model.condition_embedding(pair_lq)
    b, c, h, w = cond.shape
    x = torch.cat([pair_hidden, cond], dim=1).view(b, 2 * c, h * w).transpose(1, 2)
    for block in model.blocks:
        normed = F.layer_norm(x, (2 * c,), block.ln_1.weight, block.ln_1.bias)
        x = x + block.attn(normed, normed, normed, need_weights=False)[0]
        normed = F.layer_norm(x, (2 * c,), block.ln_2.weight, block.ln_2.bias)
        hidden_mlp = block.mlp.c_fc(normed)
        x = x + block.mlp.c_proj(hidden_mlp * torch.sigmoid(1.702 * hidden_mlp))
    residual = model.proj_out(x).transpose(1, 2).reshape(b, c, h, w)
    return (pair_hidden + residual)[: hidden.shape[0]]


def test_matches_release_multihead_attention_layout() -> None:
    model = _random_alignment()
    hidden, lq = torch.randn(1, 32, 6, 5), torch.randn(1, 64, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(
            model(hidden, lq_features=lq), _release_style(model, hidden, lq), rtol=1e-5, atol=1e-5
        )


def test_samples_of_a_batch_do_not_mix() -> None:
    model = _random_alignment(1)
    hidden, lq = torch.randn(3, 32, 4, 4), torch.randn(3, 64, 4, 4)
    with torch.no_grad():
        batched = model(hidden, lq_features=lq)
        alone = torch.cat([model(hidden[i : i + 1], lq_features=lq[i : i + 1]) for i in range(3)])
        mixed = _release_style(model, hidden[:1], lq[:1])
    # Equal up to float32 GEMM blocking (which depends on the batch size); attention across samples would
    # change the result by about its own magnitude.
    scale = alone.abs().max()
    assert (batched - alone).abs().max() <= 1e-6 * scale
    assert torch.allclose(mixed, alone[:1], rtol=0, atol=1e-6 * scale)


def test_precomputed_condition_equals_features() -> None:
    model = _random_alignment(2)
    hidden, lq = torch.randn(2, 32, 4, 6), torch.randn(2, 64, 4, 6)
    with torch.no_grad():
        assert torch.equal(model(hidden, lq_features=lq), model(hidden, condition_embeds=model.embed_condition(lq)))


def test_forward_argument_errors() -> None:
    model = _random_alignment()
    hidden = torch.randn(1, 32, 4, 4)
    with pytest.raises(ValueError, match="exactly one"):
        model(hidden)
    with pytest.raises(ValueError, match="condition_embeds"):
        model(hidden, condition_embeds=torch.randn(1, 32, 4, 5))


def test_zero_initialised_output_leaves_unet_unchanged_and_hook_is_removed() -> None:
    parts = tiny_components()
    unet, alignment = parts["unet"].eval(), parts["alignment"]
    sample = torch.randn(2, 4, 8, 8)
    args = dict(
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(2, 77, 64),
        added_cond_kwargs={"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)},
    )
    condition = alignment.embed_condition(torch.randn(2, 64, 8, 8)).detach()
    with torch.no_grad():
        plain = unet(sample, **args).sample
        with aligned_conv_in(unet, alignment, condition):
            aligned = unet(sample, **args).sample
        assert not torch.allclose(plain, aligned, atol=1e-3)
        assert torch.equal(unet(sample, **args).sample, plain)  # hook gone after the context
        alignment.zero_init_output()
        with aligned_conv_in(unet, alignment, condition):
            torch.testing.assert_close(unet(sample, **args).sample, plain, rtol=0, atol=0)


def test_spatial_attention_option_attends_across_pixels_of_each_sample_only() -> None:
    torch.manual_seed(4)
    model = FaithDiffAlignmentModel(lq_channels=64, latent_channels=32, num_attention_heads=8, spatial_attention=True)
    for param in model.parameters():
        param.data.normal_(0, 0.2)
    hidden, lq = torch.randn(2, 32, 4, 5), torch.randn(2, 64, 4, 5)
    out = model(hidden, lq_features=lq)
    # an independent statement: torch's MultiheadAttention over the h*w tokens of each sample
    block = model.blocks[0]
    x = torch.cat([hidden, model.embed_condition(lq)], dim=1).flatten(2).transpose(1, 2)  # [B, hw, C]
    normed = block.ln_1(x)
    reference = block.attn(normed.transpose(0, 1), normed.transpose(0, 1), normed.transpose(0, 1), need_weights=False)[
        0
    ]
    torch.testing.assert_close(
        block.attention(normed.unflatten(1, (4, 5))).flatten(1, 2), reference.transpose(0, 1), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(out[1:], model(hidden[1:], lq_features=lq[1:]), rtol=1e-5, atol=1e-5)  # no mixing
    per_pixel = FaithDiffAlignmentModel(lq_channels=64, latent_channels=32, num_attention_heads=8)
    per_pixel.load_state_dict(model.state_dict())
    assert not torch.allclose(per_pixel(hidden, lq_features=lq), out, atol=1e-3)
    out.sum().backward()
    assert model.blocks[0].attn.in_proj_weight.grad[:32].abs().sum() > 0  # queries train in this mode


def test_freshly_built_module_zeroes_condition_output_conv_and_projection() -> None:
    torch.manual_seed(5)
    model = FaithDiffAlignmentModel(lq_channels=64, latent_channels=32, num_attention_heads=8)
    conv_out, proj_out = model.condition_embedding.conv_out, model.proj_out
    for tensor in (conv_out.weight, conv_out.bias, proj_out.weight, proj_out.bias):
        assert torch.count_nonzero(tensor) == 0
    # the other layers keep their random initialisation, so training can move them at once
    assert model.condition_embedding.conv_in.weight.abs().sum() > 0
    assert model.blocks[0].mlp.c_fc.weight.abs().sum() > 0
    # the LQ path starts at zero and the module leaves conv_in's output unchanged
    hidden, lq = torch.randn(2, 32, 4, 4), torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        assert torch.count_nonzero(model.embed_condition(lq)) == 0
        assert torch.equal(model(hidden, lq_features=lq), hidden)
    # loaded weights replace the initialisation
    trained = _random_alignment(6)
    model.load_state_dict(trained.state_dict())
    assert torch.equal(model.condition_embedding.conv_out.weight, trained.condition_embedding.conv_out.weight)
