"""The LQ-feature hook: mid-block output of a diffusers VAE Encoder, with the output head never run."""

from __future__ import annotations

import torch

from tiny_models import tiny_components
from faithdiff_pipeline import FaithDiffLQEncoder, encoder_mid_block_features
from faithdiff_pipeline.lq_features import vae_encoder_features


def _manual_mid_block(encoder, image: torch.Tensor) -> torch.Tensor:
    sample = encoder.conv_in(image)
    for block in encoder.down_blocks:
        sample = block(sample)
    return encoder.mid_block(sample)


def test_hook_returns_mid_block_output_without_running_the_head() -> None:
    vae = tiny_components()["vae"].eval()
    ran = []
    vae.encoder.conv_out.register_forward_hook(lambda *args: ran.append(True))
    image = torch.rand(2, 3, 32, 40) * 2 - 1
    with torch.no_grad():
        features = encoder_mid_block_features(vae.encoder, image)
        expected = _manual_mid_block(vae.encoder, image)
    assert features.shape == (2, 64, 4, 5)
    assert torch.equal(features, expected)
    assert not ran
    assert not vae.encoder.mid_block._forward_hooks  # the stop hook is removed again


def test_lq_encoder_copy_of_vae_gives_vae_features() -> None:
    vae = tiny_components()["vae"].eval()
    lq_encoder = FaithDiffLQEncoder.from_vae(vae)
    assert not hasattr(lq_encoder.encoder, "conv_out")
    assert lq_encoder.feature_channels == 64
    image = torch.rand(1, 3, 24, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(lq_encoder(image), vae_encoder_features(vae, image), rtol=0, atol=0)


def test_lq_encoder_save_load_round_trip(tmp_path) -> None:
    lq_encoder = tiny_components()["lq_encoder"].eval()
    lq_encoder.save_pretrained(tmp_path)
    loaded = FaithDiffLQEncoder.from_pretrained(tmp_path).eval()
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(lq_encoder(image), loaded(image))


def test_explicit_forward_honours_gradient_checkpointing_and_compiles_whole() -> None:
    torch.manual_seed(0)
    encoder = FaithDiffLQEncoder(block_out_channels=(32, 32, 64, 64), layers_per_block=1).train()
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    plain = encoder(image)
    plain.square().mean().backward()
    grads = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    encoder.enable_gradient_checkpointing()
    calls = []
    original = encoder.encoder._gradient_checkpointing_func
    encoder.encoder._gradient_checkpointing_func = lambda block, *args: calls.append(block) or original(block, *args)
    checkpointed = encoder(image)
    checkpointed.square().mean().backward()
    assert len(calls) == len(encoder.encoder.down_blocks) + 1  # every down block and the mid block
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
    for param, grad in zip(encoder.parameters(), grads):
        torch.testing.assert_close(param.grad, grad, rtol=1e-5, atol=1e-7)
    # No exception stops the encoder any more, so a full graph compiles (Dynamo would break on one).
    encoder.eval()
    explained = torch._dynamo.explain(encoder)(image)
    assert explained.graph_break_count == 0
