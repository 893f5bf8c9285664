"""Quantisation at load time: ``FaithDiffSDXLPipeline.from_pretrained(folder, quantization_config=...)`` with
diffusers' ``PipelineQuantizationConfig`` on the backends that run on a CPU (torchao and optimum-quanto for the UNet
and both text encoders, bitsandbytes 8-bit for the text encoders). See docs/quantization.md for the numbers and for
the backends that need a GPU.

Every case loads the same saved tiny pipeline twice, plain and quantised, both in float32 so that the difference of
the outputs is the quantisation error alone, and runs 2 steps on the 24 x 20 test image with a fixed generator.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable

import pytest
import torch
from tiny_models import fast_call, tiny_components
from diffusers import PipelineQuantizationConfig
from torch import nn

from faithdiff_pipeline import FaithDiffSDXLPipeline

QUANTISED = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# transformers leaves a model's last layer unquantised (its output head): for CLIPTextModelWithProjection that is
# the text projection, for CLIPTextModel a LayerNorm.
KEPT_LINEARS = {"text_encoder_2": {"text_projection"}}


def require(module: str):
    """The backend's module; a skip where it is not installed, but a failure under CI, which must test every backend
    that runs on a CPU (they belong in the ``test`` extra)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed; CI must install it to test quantisation.")
        pytest.skip(f"{module} is not installed.")


def torchao_int8_weight_only() -> PipelineQuantizationConfig:
    # A quant_mapping, not quant_backend="torchao": diffusers' and transformers' TorchAoConfig take different
    # arguments, so PipelineQuantizationConfig refuses the shorthand (test_shorthand_refused below).
    import diffusers
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig

    mapping = {name: transformers.TorchAoConfig(Int8WeightOnlyConfig()) for name in TEXT_ENCODERS}
    unet = diffusers.TorchAoConfig(Int8WeightOnlyConfig())
    return PipelineQuantizationConfig(quant_mapping={"unet": unet, **mapping})


def is_torchao_int8(module: nn.Linear) -> bool:
    from torchao.quantization import Int8Tensor

    # torchao keeps the nn.Linear and swaps its weight for a tensor subclass holding int8 data and per-row scales.
    return isinstance(module.weight, Int8Tensor) and module.weight.qdata.dtype == torch.int8


def quanto_int8() -> PipelineQuantizationConfig:
    # diffusers names the argument weights_dtype, transformers weights: again a quant_mapping.
    import diffusers
    import transformers

    mapping = {name: transformers.QuantoConfig(weights="int8") for name in TEXT_ENCODERS}
    return PipelineQuantizationConfig(quant_mapping={"unet": diffusers.QuantoConfig(weights_dtype="int8"), **mapping})


def is_quanto_int8(module: nn.Linear) -> bool:
    from optimum.quanto import QLinear, qint8
    from optimum.quanto.tensor import WeightQBytesTensor

    # quanto swaps the layer for a QLinear whose frozen weight is stored as int8 bytes with per-row scales.
    weight = module.weight
    return isinstance(module, QLinear) and isinstance(weight, WeightQBytesTensor) and weight.qtype is qint8


def bitsandbytes_8bit_text_encoders() -> PipelineQuantizationConfig:
    # Text encoders only: diffusers' bitsandbytes quantiser refuses a UNet without a GPU (test below), while
    # transformers' runs bitsandbytes' CPU backend.
    import transformers

    config = {name: transformers.BitsAndBytesConfig(load_in_8bit=True) for name in TEXT_ENCODERS}
    return PipelineQuantizationConfig(quant_mapping=config)


def is_bitsandbytes_int8(module: nn.Linear) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear8bitLt) and module.weight.dtype == torch.int8


@dataclasses.dataclass(frozen=True)
class Backend:
    module: str  # the package's import name
    config: Callable[[], PipelineQuantizationConfig]
    is_quantised: Callable[[nn.Linear], bool]
    components: tuple[str, ...]
    # Bounds on the output images ([0, 1], 1 x 3 x 40 x 48) against the plain pipeline's. Measured on the seed-0
    # tiny weights used here, and over tiny_components(seed) for seeds 0-4 (the largest in brackets); each bound
    # sits above the largest of the five, so that another CPU's summation order cannot flip it, and far below the
    # 0.81-0.89 that the output moves by when the alignment residual is lost.
    max_abs: float
    mean_abs: float


BACKENDS = {
    # measured: max 0.0271 (0.0318), mean 0.00310 (0.00332)
    "torchao-int8-weight-only": Backend(
        "torchao", torchao_int8_weight_only, is_torchao_int8, QUANTISED, max_abs=0.04, mean_abs=0.005
    ),
    # measured: max 0.0236 (0.0358), mean 0.00299 (0.00420)
    "quanto-int8": Backend("optimum.quanto", quanto_int8, is_quanto_int8, QUANTISED, max_abs=0.04, mean_abs=0.005),
    # measured: max 0.0151 (0.0219), mean 0.00169 (0.00205)
    "bitsandbytes-8bit-text-encoders": Backend(
        "bitsandbytes",
        bitsandbytes_8bit_text_encoders,
        is_bitsandbytes_int8,
        TEXT_ENCODERS,
        max_abs=0.025,
        mean_abs=0.0025,
    ),
}

# diffusers deprecates its quanto quantiser (removal planned for diffusers 1.0); it still works in 0.42.
quanto_deprecation = pytest.mark.filterwarnings("ignore:.*Quanto.*deprecated:FutureWarning")


def upscale(pipe: FaithDiffSDXLPipeline, image) -> tuple[torch.Tensor, int]:
    """The output images of a short fixed run, and how many times the alignment module ran on the UNet's conv_in
    output (its forward is only called from that hook; the condition embedding is a separate method)."""
    pipe.set_progress_bar_config(disable=True)
    calls = []
    handle = pipe.alignment.register_forward_hook(lambda *args: calls.append(None))
    try:
        images = pipe(image=image, generator=torch.Generator().manual_seed(0), **fast_call()).images
    finally:
        handle.remove()
    return images, len(calls)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-for-quantisation")
    FaithDiffSDXLPipeline(**tiny_components()).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def plain(saved_pipeline, lq_image) -> tuple[torch.Tensor, int]:
    return upscale(FaithDiffSDXLPipeline.from_pretrained(saved_pipeline, dtype=torch.float32), lq_image)


@pytest.fixture(scope="module", params=list(BACKENDS), ids=list(BACKENDS))
def quantised(request, saved_pipeline) -> tuple[FaithDiffSDXLPipeline, Backend, PipelineQuantizationConfig]:
    backend = BACKENDS[request.param]
    require(backend.module)
    config = backend.config()
    # dtype=float32 explicitly: without a dtype, diffusers' torchao quantiser loads the UNet in bfloat16 while the
    # text encoders stay float32 (see test_torchao_without_dtype_runs).
    pipe = FaithDiffSDXLPipeline.from_pretrained(saved_pipeline, quantization_config=config, dtype=torch.float32)
    return pipe, backend, config


@quanto_deprecation
def test_quantization_config_reaches_the_components(quantised):
    pipe, backend, config = quantised
    # FaithDiffSDXLPipeline.from_pretrained resolves and checks the folder, then hands every other keyword on.
    assert pipe.quantization_config is config
    assert sorted(config.config_mapping) == sorted(backend.components)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae", "alignment", "lq_encoder"):
        component = getattr(pipe, name)
        linears = {path: m for path, m in component.named_modules() if isinstance(m, nn.Linear)}
        assert linears, name
        if name in backend.components:
            kept = KEPT_LINEARS.get(name, set())
            quantised_paths = {path for path, m in linears.items() if backend.is_quantised(m)}
            assert quantised_paths == set(linears) - kept, name
        else:
            # The components left out of the mapping keep plain float32 parameters throughout.
            for param in component.parameters():
                assert type(param) is nn.Parameter and param.dtype == torch.float32, name


@quanto_deprecation
def test_conv_in_keeps_the_alignment_hook(quantised, plain, lq_image):
    pipe, backend, _ = quantised
    # The backends quantise nn.Linear layers only, so conv_in stays a plain convolution and needs no
    # modules_to_not_convert; FaithDiff's forward hook on it then runs once per UNet call, as without quantisation.
    conv_in = pipe.unet.conv_in
    assert type(conv_in) is nn.Conv2d and type(conv_in.weight) is nn.Parameter
    _, calls = upscale(pipe, lq_image)
    assert calls == plain[1] > 0


@quanto_deprecation
def test_output_stays_close_to_plain(quantised, plain, lq_image):
    pipe, backend, _ = quantised
    images, _ = upscale(pipe, lq_image)
    difference = (images - plain[0]).abs()
    assert images.shape == plain[0].shape and torch.isfinite(images).all()
    assert difference.max().item() <= backend.max_abs
    assert difference.mean().item() <= backend.mean_abs
    # Not the plain weights in disguise: every backend here moves the output by at least 0.015 (measured).
    assert difference.max().item() > 1e-3


def test_shorthand_refused_for_torchao_and_quanto():
    """``quant_backend=`` builds one config class per library from the same keyword arguments; for torchao and quanto
    the diffusers and transformers classes take different ones, so diffusers refuses and asks for a quant_mapping
    (what docs/quantization.md tells users to write)."""
    require("torchao")
    require("optimum.quanto")
    from torchao.quantization import Int8WeightOnlyConfig

    for backend, kwargs in (("torchao", {"quant_type": Int8WeightOnlyConfig()}), ("quanto", {"weights_dtype": "int8"})):
        with pytest.raises(ValueError, match="signatures of the __init__ methods"):
            PipelineQuantizationConfig(
                quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=list(QUANTISED)
            )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
def test_bitsandbytes_unet_needs_a_gpu(saved_pipeline):
    """bitsandbytes through the shorthand (its two config classes agree) reaches diffusers' quantiser, which refuses
    the UNet without a GPU: docs/quantization.md lists bitsandbytes for the UNet as GPU-only for this reason."""
    require("bitsandbytes")
    config = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_8bit",
        quant_kwargs={"load_in_8bit": True},
        components_to_quantize=list(QUANTISED),
    )
    with pytest.raises(RuntimeError, match="No GPU found"):
        FaithDiffSDXLPipeline.from_pretrained(saved_pipeline, quantization_config=config)


def test_torchao_without_dtype_runs(saved_pipeline, plain, lq_image):
    """Without a dtype, diffusers' torchao quantiser loads the UNet in bfloat16 (its int8 kernels' default) while
    transformers leaves the text encoders in float32: the pipeline has to bridge the two."""
    require("torchao")
    pipe = FaithDiffSDXLPipeline.from_pretrained(saved_pipeline, quantization_config=torchao_int8_weight_only())
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.float32
    images, calls = upscale(pipe, lq_image)
    # Measured: max 0.1137 (bfloat16 activations on top of int8 weights; a plain bfloat16
    # pipeline alone differs from float32 by 0.098).
    assert (images - plain[0]).abs().max().item() <= 0.13
    assert calls == plain[1]
