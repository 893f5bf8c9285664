"""Float8: weight storage equals the exact path with float8-rounded weights; compute and low-memory set-ups."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tiny_models import tiny_components
from faithdiff_pipeline import FaithDiffSDXLPipeline
from faithdiff_pipeline.pipeline_faithdiff_sdxl import FP8_KEEP_PATTERNS, fp8_linear

FAST = dict(prompt="a photo", num_inference_steps=2, tile_size=64, output_type="pt")
IMAGE = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)


def _pipe() -> FaithDiffSDXLPipeline:
    pipe = FaithDiffSDXLPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _restore(pipe) -> torch.Tensor:
    return pipe(IMAGE, generator=torch.Generator().manual_seed(0), **FAST).images


def _stored_in_fp8(name: str) -> bool:
    return not any(re.search(pattern, name) for pattern in FP8_KEEP_PATTERNS)


def test_fp8_weights_equal_the_exact_path_run_with_float8_rounded_weights() -> None:
    fp8 = _pipe()
    fp8.enable_fp8_weights()
    reference = _pipe()  # the same random weights, rounded through float8 by hand
    with torch.no_grad():
        for module_name, module in reference.unet.named_modules():
            if module_name and _stored_in_fp8(module_name) and not list(module.children()):
                for param in module.parameters(recurse=False):
                    param.copy_(param.to(torch.float8_e4m3fn).float())
    torch.testing.assert_close(_restore(fp8), _restore(reference), rtol=0, atol=1e-6)
    exact = _restore(_pipe())
    assert (exact - _restore(fp8)).abs().max() > 1e-3  # float8 storage really changed the weights


def test_fp8_weights_keep_norms_embeddings_and_conv_in_out() -> None:
    pipe = _pipe()
    before = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    pipe.enable_fp8_weights()
    unet = pipe.unet
    assert unet.conv_in.weight.dtype == unet.conv_out.weight.dtype == torch.float32
    assert unet.time_embedding.linear_1.weight.dtype == unet.add_embedding.linear_1.weight.dtype == torch.float32
    assert unet.down_blocks[1].attentions[0].norm.weight.dtype == torch.float32
    assert unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert all(p.dtype == torch.float32 for p in pipe.alignment.parameters())
    assert all(p.dtype == torch.float32 for p in pipe.lq_encoder.parameters())
    after = sum(p.numel() * p.element_size() for p in unet.parameters())
    assert after < 0.4 * before


def test_fp8_compute_takes_the_linear_layers_but_not_the_embeddings() -> None:
    unet = _pipe().unet
    chosen = {name for name, module in unet.named_modules() if fp8_linear(module, name)}
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in chosen
    assert not any("embedding" in name for name in chosen)
    assert not {"conv_in", "conv_out"} & chosen


def test_fp8_compute_needs_a_float8_gpu() -> None:
    with pytest.raises(ValueError, match="`enable_fp8_compute` needs a CUDA GPU of compute capability 8.9"):
        _pipe().enable_fp8_compute()


def test_low_vram_mode_is_fp8_storage_with_offloaded_text_encoders_and_tiling() -> None:
    fp8 = _pipe()
    fp8.enable_fp8_weights()
    low = _pipe()
    low.enable_low_vram("cpu")
    assert low.vae.use_tiling and low.unet.conv_in.weight.dtype == torch.float32
    assert low.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    # The image is smaller than a VAE tile, and offloading moves nothing on the CPU: the same numbers.
    torch.testing.assert_close(_restore(low), _restore(fp8), rtol=0, atol=1e-6)


def _set_up(pipe: FaithDiffSDXLPipeline) -> dict:
    """What the memory modes change: the UNet's storage dtypes, which components are group-offloaded, VAE tiling."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    modules = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    return {
        "unet_dtypes": sorted({str(p.dtype) for p in pipe.unet.parameters()}),
        "offloaded": sorted(name for name, module in modules.items() if _is_group_offload_enabled(module)),
        "vae_tiling": pipe.vae.use_tiling,
    }


def test_memory_modes_are_idempotent_and_combine() -> None:
    once = _pipe()
    once.enable_fp8_weights()
    twice = _pipe()
    twice.enable_fp8_weights()
    twice.enable_fp8_weights()
    assert _set_up(twice) == _set_up(once)
    torch.testing.assert_close(_restore(twice), _restore(once), rtol=0, atol=0)

    low = _pipe()
    low.enable_low_vram("cpu")
    firsts = {
        "enable_fp8_weights": lambda pipe: pipe.enable_fp8_weights(),
        "enable_low_vram": lambda pipe: pipe.enable_low_vram("cpu"),
        "enable_text_encoder_offload": lambda pipe: pipe.enable_text_encoder_offload("cpu"),
    }
    for first, set_up in firsts.items():
        pipe = _pipe()
        set_up(pipe)
        pipe.enable_low_vram("cpu")
        pipe.enable_low_vram("cpu")
        pipe.enable_fp8_weights()
        pipe.enable_text_encoder_offload("cpu")
        assert _set_up(pipe) == _set_up(low), first
        torch.testing.assert_close(_restore(pipe), _restore(low), rtol=0, atol=0)


def test_memory_modes_that_cannot_combine_are_refused_before_anything_changes() -> None:
    pipe = _pipe()
    pipe.enable_fp8_weights()
    with pytest.raises(ValueError, match="`enable_fp8_compute` cannot go with float8 weight storage"):
        pipe.enable_fp8_compute()

    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantised = _pipe()
    quantize_(quantised.unet, Int8WeightOnlyConfig(), filter_fn=fp8_linear)
    before = _set_up(quantised)
    calls = {
        "enable_fp8_weights": quantised.enable_fp8_weights,
        "enable_low_vram": lambda: quantised.enable_low_vram("cpu"),
    }
    for method, call in calls.items():
        with pytest.raises(ValueError, match=rf"`{method}` stores the UNet's weights in float8, but they are"):
            call()
        assert _set_up(quantised) == before, method
    with pytest.raises(ValueError, match="`enable_fp8_compute` quantises the UNet's linear layers, but its weights"):
        quantised.enable_fp8_compute()


def test_low_vram_on_a_device_this_machine_lacks_is_refused_and_changes_nothing(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pipe = _pipe()
    before, output = _set_up(pipe), _restore(pipe)
    for call in (pipe.enable_low_vram, lambda: pipe.enable_low_vram("cuda:1"), pipe.enable_text_encoder_offload):
        with pytest.raises(ValueError, match=r"runs the pipeline on 'cuda(:1)?', which needs a CUDA GPU, and torch"):
            call()
        assert _set_up(pipe) == before
    assert before["unet_dtypes"] == ["torch.float32"] and not before["offloaded"] and not before["vae_tiling"]
    torch.testing.assert_close(_restore(pipe), output, rtol=0, atol=0)


def test_the_loading_module_sets_up_each_float8_mode(tmp_path) -> None:
    from faithdiff_pipeline import loading

    FaithDiffSDXLPipeline(**tiny_components()).save_pretrained(tmp_path)
    cpu = torch.device("cpu")
    weights = loading.load_pipeline(tmp_path, cpu, torch.float32, fp8="weights")
    low = loading.load_pipeline(tmp_path, cpu, torch.float32, low_vram=True)
    for pipe in (weights, low):
        assert pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert low.vae.use_tiling and not weights.vae.use_tiling
    with pytest.raises(ValueError, match="`low_vram` already sets float8 storage and text-encoder offload"):
        loading.check_options("model", low_vram=True)


def test_command_line_float8_options(tmp_path, monkeypatch, capsys) -> None:
    import PIL.Image

    from faithdiff_pipeline import loading
    from faithdiff_pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    PIL.Image.fromarray(IMAGE).save("a.png")
    assert main(["a.png", "--low-vram", "--offload", "model"]) == 2
    assert "--low-vram already sets float8 storage" in capsys.readouterr().err
    monkeypatch.setattr(loading, "installed", lambda module: module != "torchao")
    assert main(["a.png", "--fp8", "compute"]) == 2
    assert "float8 compute needs torchao, which is not installed: pip install 'faithdiff-pipeline[fp8]'" in (
        capsys.readouterr().err
    )
    FaithDiffSDXLPipeline(**tiny_components()).save_pretrained(tmp_path / "model")
    common = ["a.png", "--model", "model", "--steps", "2", "--tile-size", "64", "--device", "cpu", "--prompt", "x"]
    assert main([*common, "-o", "fp8", "--fp8", "weights", "--dtype", "float32"]) == 0
    assert main([*common, "-o", "low", "--low-vram", "--dtype", "float32"]) == 0
    with PIL.Image.open("fp8/a.png") as a, PIL.Image.open("low/a.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))  # CPU: offloading moves nothing; one tile either way


def test_compile_takes_the_vae_and_lq_encoder_too_and_changes_nothing(tmp_path) -> None:
    from faithdiff_pipeline import loading

    FaithDiffSDXLPipeline(**tiny_components()).save_pretrained(tmp_path)
    cpu = torch.device("cpu")
    eager = loading.load_pipeline(tmp_path, cpu, torch.float32)
    compiled = loading.load_pipeline(tmp_path, cpu, torch.float32, compile="regional")
    for module in (compiled.vae.encoder, compiled.vae.decoder, compiled.lq_encoder):
        assert module._compiled_call_impl is not None
    assert eager.vae.decoder._compiled_call_impl is None
    for pipe in (eager, compiled):
        pipe.set_progress_bar_config(disable=True)
    # Inductor fuses float32 arithmetic in another order: a few 1e-6 apart, the parity tolerance bounds it.
    torch.testing.assert_close(_restore(compiled), _restore(eager), rtol=0, atol=1e-4)
