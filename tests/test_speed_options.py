"""Each speed/memory option against the plain path on tiny components: exact, or within a stated tolerance."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from tiny_models import fast_call


@pytest.fixture
def tiled_lq(lq_image) -> PIL.Image.Image:
    return lq_image.resize((64, 48))  # six 64-px latent tiles after the x2 upscale


def _run(pipe, image, **overrides) -> torch.Tensor:
    return pipe(image, **fast_call(generator=torch.Generator().manual_seed(0), **overrides)).images


def test_regional_compile_matches_eager(tiny_pipe, tiled_lq) -> None:
    """torch.compile of the UNet's repeated transformer blocks (diffusers' regional compilation), with the alignment
    hook in place: float32 results agree to 1e-4 (inductor reorders floating-point sums)."""
    eager = _run(tiny_pipe, tiled_lq, tile_batch_size=3)
    tiny_pipe.unet.compile_repeated_blocks(fullgraph=True)
    compiled = _run(tiny_pipe, tiled_lq, tile_batch_size=3)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_whole_unet_compile_does_not_recompile_between_calls(tiny_pipe, tiled_lq, monkeypatch) -> None:
    """torch.compile of the whole UNet (the alignment hook included in the graph): the hook stays registered, so a
    second call with new images and conditions reuses the compiled graph; float32 agreement to 1e-4."""
    import torch._dynamo

    eager = _run(tiny_pipe, tiled_lq, tile_batch_size=3)
    other = tiled_lq.transpose(PIL.Image.FLIP_LEFT_RIGHT)
    eager_other = _run(tiny_pipe, other, tile_batch_size=3)
    tiny_pipe.unet = torch.compile(tiny_pipe.unet, fullgraph=True)
    torch.testing.assert_close(_run(tiny_pipe, tiled_lq, tile_batch_size=3), eager, rtol=0, atol=1e-4)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch.testing.assert_close(_run(tiny_pipe, other, tile_batch_size=3), eager_other, rtol=0, atol=1e-4)


def test_fused_qkv_projections_match(tiny_pipe, tiled_lq) -> None:
    plain = _run(tiny_pipe, tiled_lq)
    tiny_pipe.unet.fuse_qkv_projections()
    torch.testing.assert_close(_run(tiny_pipe, tiled_lq), plain, rtol=0, atol=1e-5)
    tiny_pipe.unet.unfuse_qkv_projections()
    torch.testing.assert_close(_run(tiny_pipe, tiled_lq), plain, rtol=0, atol=1e-5)


def test_channels_last_matches(tiny_pipe, tiled_lq) -> None:
    """Channels-last convolutions use other kernels (other summation order): agreement to 1e-4 in float32."""
    plain = _run(tiny_pipe, tiled_lq)
    tiny_pipe.unet.to(memory_format=torch.channels_last)
    tiny_pipe.vae.to(memory_format=torch.channels_last)
    torch.testing.assert_close(_run(tiny_pipe, tiled_lq), plain, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_layerwise_casting_stays_close(tiny_pipe, tiled_lq) -> None:
    """bfloat16 weight storage with float32 compute (diffusers' enable_layerwise_casting): weights lose 16 mantissa
    bits, so the image moves by a few 1/255 levels; stated tolerance 0.05."""
    plain = _run(tiny_pipe, tiled_lq)
    tiny_pipe.unet.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert tiny_pipe.unet.conv_in.weight.dtype == torch.bfloat16
    cast = _run(tiny_pipe, tiled_lq)
    assert (cast - plain).abs().max() < 0.05
    assert not torch.equal(cast, plain)


def test_half_precision_alignment_follows_the_unet(tiny_pipe, tiled_lq) -> None:
    """A bfloat16 pipeline runs end to end (the alignment casts its inputs to its own dtype)."""
    plain = _run(tiny_pipe, tiled_lq)
    tiny_pipe.to(torch.bfloat16)
    half = _run(tiny_pipe, tiled_lq)
    assert half.dtype == torch.float32 and (half - plain).abs().mean() < 0.05


def test_text_encoder_offload_leaves_the_rest_resident_and_changes_nothing(tiny_pipe, tiled_lq) -> None:
    """enable_text_encoder_offload group-offloads the two text encoders alone (the UNet, VAE, LQ encoder and
    alignment get no hooks) and the pipeline still finds its execution device: the result is unchanged."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    plain = _run(tiny_pipe, tiled_lq)
    tiny_pipe.enable_text_encoder_offload("cpu")
    modules = {name: c for name, c in tiny_pipe.components.items() if isinstance(c, torch.nn.Module)}
    offloaded = {name for name, module in modules.items() if _is_group_offload_enabled(module)}
    assert offloaded == {"text_encoder", "text_encoder_2"}
    assert tiny_pipe._execution_device == torch.device("cpu")
    torch.testing.assert_close(_run(tiny_pipe, tiled_lq), plain, rtol=0, atol=0)


def test_text_encoder_offload_needs_a_text_encoder(tiny_pipe) -> None:
    tiny_pipe.text_encoder = tiny_pipe.text_encoder_2 = None
    with pytest.raises(ValueError, match="needs a text encoder"):
        tiny_pipe.enable_text_encoder_offload("cpu")
