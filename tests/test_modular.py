"""FaithDiff in diffusers' modular pipelines: each block against the step of FaithDiffSDXLPipeline it stands for, the
composed blocks against the whole pipeline (bit for bit, and on the official parity fixtures), a block swapped for the
user's own, components shared through a ComponentsManager with SDXL's modular pipeline, and loading through diffusers'
route for custom blocks (``ModularPipeline.from_pretrained(..., trust_remote_code=True)``), from a folder and from a
file-based Hub stand-in.

diffusers copies and imports the blocks' code file into its modules cache; tests point that cache at a temporary
folder, and the Hub is loaded in a child process (as in test_diffusers_loading.py) so that its stand-in is installed
before diffusers is imported.
"""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ComponentsManager, ModularPipeline, StableDiffusionXLAutoBlocks
from diffusers.modular_pipelines import BlockState, ModularPipelineBlocks, PipelineState, SequentialPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import InputParam, OutputParam
from diffusers.modular_pipelines.stable_diffusion_xl.encoders import StableDiffusionXLTextEncoderStep
from safetensors.torch import load_file

from shared_data import locate_shared, shared_path
from tiny_models import tiny_captioner, tiny_components
from faithdiff_pipeline import FaithDiffSDXLPipeline, convert_official_release, hub
from faithdiff_pipeline.color_fix import apply_color_fix
from faithdiff_pipeline.modular import (
    FaithDiffSDXLAutoBlocks,
    FaithDiffSDXLAutoCaptionStep,
    FaithDiffSDXLCaptionStep,
    FaithDiffSDXLColorFixStep,
    FaithDiffSDXLDenoiseStep,
    FaithDiffSDXLImageStep,
    FaithDiffSDXLLoopBlendTiles,
    FaithDiffSDXLLoopGuidance,
    FaithDiffSDXLLoopTileDenoiser,
    FaithDiffSDXLModularPipeline,
    FaithDiffSDXLPostprocessStep,
    FaithDiffSDXLPromptEmbedsStep,
    FaithDiffSDXLPromptStep,
    FaithDiffSDXLSetTimestepsStep,
    FaithDiffSDXLVaeDecodeStep,
)
from faithdiff_pipeline.preprocessing import prepare_lq_images
from faithdiff_pipeline.tiled_denoising import guided_noise, tile_noise

REPO_ID = "someone/faithdiff-modular"
BLOCKS_CODE = "modular_blocks_faithdiff_sdxl.py"
CALL = {"prompt": "a photo", "num_inference_steps": 2, "tile_size": 64, "output_type": "pt"}
PARITY_ATOL = 1e-6
IMAGE_ATOL = 1e-4  # the official fixtures' tolerance (test_conformance.py)
LATENT_RTOL = 1e-4


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _modular(pipe: FaithDiffSDXLPipeline, blocks: ModularPipelineBlocks | None = None) -> FaithDiffSDXLModularPipeline:
    modular = FaithDiffSDXLModularPipeline.from_pipe(pipe, blocks=blocks)
    modular.set_progress_bar_config(disable=True)
    return modular


def _blocks_until(last: str) -> SequentialPipelineBlocks:
    """FaithDiffSDXLAutoBlocks up to and including its block ``last``."""
    names = FaithDiffSDXLAutoBlocks.block_names
    blocks = FaithDiffSDXLAutoBlocks().sub_blocks
    return SequentialPipelineBlocks.from_blocks_dict({name: blocks[name] for name in names[: names.index(last) + 1]})


@pytest.fixture(scope="module")
def wide_lq() -> PIL.Image.Image:
    """48 x 64 pixels: at upscale 2 and 64-pixel tiles, a 12 x 16 latent of 2 x 3 overlapping tiles."""
    y, x = np.mgrid[0:48, 0:64]
    return PIL.Image.fromarray(np.stack([x * 4, y * 5, (x * y) % 256], axis=-1).astype(np.uint8))


@pytest.fixture
def modular(tiny_pipe) -> FaithDiffSDXLModularPipeline:
    return _modular(tiny_pipe)


@pytest.fixture(autouse=True, scope="module")
def modules_cache(tmp_path_factory):
    """diffusers' cache of custom code, here a temporary folder (and sys.path restored after)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("diffusers.utils.dynamic_modules_utils.HF_MODULES_CACHE", str(tmp_path_factory.mktemp("modules")))
        patch.setattr(sys, "path", list(sys.path))
        yield


# --- The whole restoration --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"guidance_scale": 1.0, "start_point": "noise"},
        {"num_images_per_prompt": 2, "tile_stride": 16, "tile_batch_size": 3, "guidance_rescale": 0.5},
        {"negative_prompt": "blurry", "color_fix": "wavelet", "output_type": "np"},
        {"color_fix": None, "upscale": 1.5},
        {"output_type": "latent"},
    ],
    ids=["release", "no-guidance-noise", "samples-stride-rescale", "negative-wavelet-np", "no-colour-fix", "latent"],
)
def test_the_modular_pipeline_restores_as_the_pipeline_does(tiny_pipe, modular, wide_lq, overrides) -> None:
    call = {**CALL, **overrides}
    expected = tiny_pipe(wide_lq, generator=_seeded(1), **call).images
    restored = modular(image=wide_lq, generator=_seeded(1), output="images", **call)
    assert type(restored) is type(expected)
    assert np.array_equal(np.asarray(restored), np.asarray(expected))


def test_a_batch_with_a_prompt_each_and_generators(tiny_pipe, modular, wide_lq) -> None:
    images = [wide_lq, wide_lq.transpose(PIL.Image.ROTATE_180)]
    call = {**CALL, "prompt": ["a house", "a tree"]}
    expected = tiny_pipe(images, generator=[_seeded(1), _seeded(2)], **call).images
    restored = modular(image=images, generator=[_seeded(1), _seeded(2)], output="images", **call)
    assert torch.equal(restored, expected)


def test_the_inputs_are_the_pipelines_arguments(tiny_pipe) -> None:
    inputs = {param.name for param in FaithDiffSDXLAutoBlocks().inputs}
    arguments = {
        "image", "prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "upscale", "num_inference_steps",
        "timesteps", "sigmas", "guidance_scale", "guidance_rescale", "start_point", "tile_size", "tile_stride",
        "tile_batch_size", "color_fix", "max_output_pixels", "num_images_per_prompt", "generator", "latents",
        "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
        "output_type", "cross_attention_kwargs", "clip_skip",
    }  # fmt: skip
    assert arguments <= inputs
    assert [output.name for output in FaithDiffSDXLAutoBlocks().outputs] == ["images"]
    components = {spec.name for spec in FaithDiffSDXLAutoBlocks().expected_components}
    assert set(tiny_pipe.components) | {"captioner", "captioner_processor"} <= components


def test_the_defaults_are_the_releases() -> None:
    defaults = {param.name: param.default for param in FaithDiffSDXLAutoBlocks().inputs}
    expected = {
        "upscale": 2.0, "num_inference_steps": 20, "guidance_scale": 5.0, "start_point": "lr", "tile_size": 1024,
        "tile_batch_size": 4, "color_fix": "adain", "output_type": "pil", "num_images_per_prompt": 1,
    }  # fmt: skip
    assert {name: defaults[name] for name in expected} == expected


def test_the_readme_links_the_modular_guide() -> None:
    root = Path(__file__).resolve().parents[1]
    assert (root / "docs" / "modular.md").is_file()
    assert "(docs/modular.md)" in (root / "README.md").read_text(encoding="utf-8")


def test_workflows_drop_the_caption_when_a_prompt_is_given() -> None:
    blocks = FaithDiffSDXLAutoBlocks()
    assert blocks.available_workflows == ["captioned", "prompted", "embeddings"]
    assert "caption" not in blocks.get_workflow("prompted").sub_blocks
    assert type(blocks.get_workflow("captioned").sub_blocks["caption"]) is FaithDiffSDXLCaptionStep
    embeddings = blocks.get_workflow("embeddings").sub_blocks
    assert type(embeddings["text_encoder"]) is FaithDiffSDXLPromptEmbedsStep


# --- Each block -------------------------------------------------------------------------------------------------


def test_image_step_prepares_the_lq_images_as_the_release(tiny_pipe, lq_image) -> None:
    state = _modular(tiny_pipe, FaithDiffSDXLImageStep())(image=lq_image, upscale=1.5)
    prepared = prepare_lq_images(lq_image, 1.5, multiple=8, min_size=tiny_pipe.min_output_size)
    assert torch.equal(state.get("lq_image"), prepared.padded)
    assert torch.equal(state.get("lq_reference"), prepared.reference)
    assert state.get("output_size") == (30, 36)


def test_image_step_pads_an_icon_and_takes_none_as_no_limit(tiny_pipe) -> None:
    icon = PIL.Image.new("RGB", (13, 7), (200, 30, 90))
    state = _modular(tiny_pipe, FaithDiffSDXLImageStep())(image=icon, upscale=1, max_output_pixels=None)
    assert state.get("output_size") == (7, 13)
    assert tuple(state.get("lq_image").shape[-2:]) == (tiny_pipe.min_output_size,) * 2  # 16 for the tiny UNet
    with pytest.raises(ValueError, match="max_output_pixels"):
        _modular(tiny_pipe, FaithDiffSDXLImageStep())(image=icon, upscale=1, max_output_pixels=50)


def test_caption_step_captions_as_the_pipeline(lq_image) -> None:
    model, processor = tiny_captioner()
    pipe = FaithDiffSDXLPipeline(**tiny_components(), captioner=model, captioner_processor=processor)
    state = _modular(pipe, FaithDiffSDXLCaptionStep())(image=lq_image, generator=_seeded(3))
    assert state.get("prompt") == pipe.caption(lq_image, _seeded(3))
    without = _modular(FaithDiffSDXLPipeline(**tiny_components()), FaithDiffSDXLCaptionStep())(image=lq_image)
    assert without.get("prompt") is None


def test_the_caption_runs_only_without_a_prompt() -> None:
    step = FaithDiffSDXLAutoCaptionStep()
    assert step.select_block(prompt=None, prompt_embeds=None) == "caption"
    assert step.select_block(prompt="a photo", prompt_embeds=None) is None
    assert step.select_block(prompt=None, prompt_embeds=torch.zeros(1)) is None


def test_a_captioned_restoration_equals_the_pipelines(wide_lq) -> None:
    model, processor = tiny_captioner()
    pipe = FaithDiffSDXLPipeline(**tiny_components(), captioner=model, captioner_processor=processor)
    pipe.set_progress_bar_config(disable=True)
    call = {**CALL, "prompt": None}
    expected = pipe(wide_lq, generator=_seeded(5), **call).images
    assert torch.equal(_modular(pipe)(image=wide_lq, generator=_seeded(5), output="images", **call), expected)


def test_prompt_step_gives_one_prompt_per_image(tiny_pipe, lq_image) -> None:
    step = _modular(tiny_pipe, FaithDiffSDXLPromptStep())
    state = step(lq_image=torch.zeros(3, 3, 8, 8), prompt="a photo", negative_prompt_2="grainy")
    assert state.get("prompt") == ["a photo"] * 3
    assert state.get("negative_prompt") == [""] * 3
    assert state.get("negative_prompt_2") == ["grainy"] * 3
    assert state.get("prompt_2") is None
    with pytest.raises(ValueError, match="`prompt` has 2 entries but 3 images"):
        step(lq_image=torch.zeros(3, 3, 8, 8), prompt=["a", "b"])
    with pytest.raises(ValueError, match="either `prompt` or `prompt_embeds`"):
        step(lq_image=torch.zeros(1, 3, 8, 8), prompt="a", prompt_embeds=torch.zeros(1, 77, 64))


def test_text_encoding_is_sdxls_and_gives_the_pipelines_embeddings(tiny_pipe) -> None:
    blocks = _blocks_until("text_encoder")
    assert type(blocks.sub_blocks["text_encoder"].sub_blocks["text_encoder"]) is StableDiffusionXLTextEncoderStep
    state = _modular(tiny_pipe, blocks)(image=PIL.Image.new("RGB", (16, 16)), prompt="a photo", negative_prompt="dull")
    expected = tiny_pipe.encode_prompt("a photo", negative_prompt="dull", device="cpu")
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, tensor in zip(names, expected):
        assert torch.equal(state.get(name), tensor), name


def test_given_embeddings_restore_as_the_pipeline(tiny_pipe, modular, wide_lq) -> None:
    prompt_embeds, _, pooled, _ = tiny_pipe.encode_prompt("a photo", device="cpu", do_classifier_free_guidance=False)
    given = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "negative_prompt": "dull"}
    call = {**CALL, "prompt": None, **given}
    expected = tiny_pipe(wide_lq, generator=_seeded(1), **call).images
    assert torch.equal(modular(image=wide_lq, generator=_seeded(1), output="images", **call), expected)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        modular(image=wide_lq, prompt_embeds=prompt_embeds, output="images", **{**CALL, "prompt": None})


def test_lq_features_step(tiny_pipe, lq_image) -> None:
    state = _modular(tiny_pipe, _blocks_until("lq_features"))(image=lq_image, prompt="a", num_images_per_prompt=2)
    expected = tiny_pipe.lq_features(state.get("lq_image")).repeat_interleave(2, dim=0)
    assert torch.equal(state.get("lq_features"), expected)


def test_set_timesteps_step_is_sdxls_with_the_releases_steps(tiny_pipe) -> None:
    state = _modular(tiny_pipe, FaithDiffSDXLSetTimestepsStep())()
    assert state.get("num_inference_steps") == 20
    tiny_pipe.scheduler.set_timesteps(20)
    assert torch.equal(state.get("timesteps"), tiny_pipe.scheduler.timesteps)


@pytest.mark.parametrize("start_point", ["lr", "noise"])
def test_prepare_latents_step(tiny_pipe, lq_image, start_point) -> None:
    modular = _modular(tiny_pipe, _blocks_until("prepare_latents"))
    state = modular(image=lq_image, prompt="a", start_point=start_point, num_images_per_prompt=2, generator=_seeded(4))
    expected = tiny_pipe.prepare_latents(state.get("lq_image"), 2, start_point, _seeded(4), None)
    assert torch.equal(state.get("latents"), expected)
    with pytest.raises(ValueError, match="start_point"):
        modular(image=lq_image, prompt="a", start_point="middle")


def test_prepare_tiles_step_lays_out_the_pipelines_tile_batches(tiny_pipe, wide_lq, monkeypatch) -> None:
    seen = []
    predict = tiny_pipe.predict_noise

    def record(latents, t, tiling, batches, before_unet=None):
        seen.append((tiling, batches))
        return predict(latents, t, tiling, batches, before_unet)

    monkeypatch.setattr(tiny_pipe, "predict_noise", record)
    call = {"num_inference_steps": 1, "tile_size": 64, "tile_batch_size": 4, "num_images_per_prompt": 2}
    tiny_pipe(wide_lq, prompt="a photo", output_type="latent", **call)
    state = _modular(tiny_pipe, _blocks_until("prepare_tiles"))(image=wide_lq, prompt="a photo", **call)
    tiling, batches = seen[0]
    assert state.get("tiling") == tiling
    assert [batch.indices for batch in state.get("tile_batches")] == [batch.indices for batch in batches]
    for ours, theirs in zip(state.get("tile_batches"), batches):
        for field in ("condition_embeds", "time_ids", "prompt_embeds", "text_embeds"):
            assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    # The tiles hold what the loop needs; the features are released, as the pipeline releases them.
    assert state.get("lq_features") is None


def test_prepare_tiles_step_refuses_bad_tiles(tiny_pipe, lq_image) -> None:
    with pytest.raises(ValueError, match="tile_size"):
        _modular(tiny_pipe)(image=lq_image, prompt="a", tile_size=60, output="images")


def _loop_state(tiny_pipe, image, **call) -> tuple[FaithDiffSDXLModularPipeline, PipelineState]:
    """The state the denoising loop starts from."""
    modular = _modular(tiny_pipe, _blocks_until("prepare_tiles"))
    return modular, modular(image=image, prompt="a photo", generator=_seeded(2), **call)


def test_loop_tile_denoiser_runs_each_tile_batch_through_the_aligned_unet(tiny_pipe, wide_lq) -> None:
    modular, state = _loop_state(tiny_pipe, wide_lq, tile_size=64, tile_batch_size=4)
    t = state.get("timesteps")[0]
    scaled = tiny_pipe.scheduler.scale_model_input(state.get("latents"), t)
    block_state = BlockState(
        scaled_latents=scaled,
        tiling=state.get("tiling"),
        tile_batches=state.get("tile_batches"),
        cross_attention_kwargs=None,
    )
    _, block_state = FaithDiffSDXLLoopTileDenoiser()(modular, block_state, 0, t)
    tiling = state.get("tiling")
    for noise, batch in zip(block_state.tile_noise, state.get("tile_batches")):
        tiles = torch.cat([tiling.crop(scaled, batch.indices)] * 2)
        assert torch.equal(noise, tile_noise(tiny_pipe.unet, tiny_pipe.alignment, tiles, t, batch))


def test_loop_guidance_guides_each_tile_batch(tiny_pipe) -> None:
    noise = torch.randn(4, 4, 8, 8)
    guided_batch = type("Batch", (), {"cfg_copies": 2})()
    plain_batch = type("Batch", (), {"cfg_copies": 1})()
    block_state = BlockState(
        tile_noise=[noise, noise[:2]],
        tile_batches=[guided_batch, plain_batch],
        guidance_scale=5.0,
        guidance_rescale=0.0,
    )
    _, block_state = FaithDiffSDXLLoopGuidance()(None, block_state, 0, torch.tensor(999))
    uncond, cond = noise.chunk(2)
    assert torch.equal(block_state.guided_tile_noise[0], uncond + 5.0 * (cond - uncond))
    assert block_state.guided_tile_noise[1] is block_state.tile_noise[1]
    assert torch.equal(block_state.guided_tile_noise[0], guided_noise(noise, 2, 5.0))


def test_loop_blend_weighs_the_tiles_as_the_pipeline(tiny_pipe, wide_lq, monkeypatch) -> None:
    _, state = _loop_state(tiny_pipe, wide_lq, tile_size=64, tile_batch_size=4)
    tiling, batches, latents = state.get("tiling"), state.get("tile_batches"), state.get("latents")
    t = state.get("timesteps")[0]
    guided = [torch.randn(len(batch.indices) * batch.samples, 4, 8, 8) for batch in batches]
    by_batch = {id(batch): noise for batch, noise in zip(batches, guided)}
    # The pipeline's blend of the same guided predictions.
    monkeypatch.setattr(tiny_pipe, "_guided_noise", lambda tiles, t, batch: by_batch[id(batch)])
    expected = tiny_pipe.predict_noise(latents, t, tiling, batches)
    block_state = BlockState(latents=latents, tiling=tiling, tile_batches=batches, guided_tile_noise=guided)
    _, block_state = FaithDiffSDXLLoopBlendTiles()(None, block_state, 0, t)
    assert torch.equal(block_state.noise_pred, expected)


def test_denoise_step_is_sdxls_loop_around_faithdiffs_tile_steps() -> None:
    loop = FaithDiffSDXLDenoiseStep()
    assert list(loop.sub_blocks) == ["before_denoiser", "denoiser", "guidance", "blend", "after_denoiser"]
    assert type(loop.sub_blocks["before_denoiser"]).__module__.startswith("diffusers.modular_pipelines")
    assert type(loop.sub_blocks["after_denoiser"]).__module__.startswith("diffusers.modular_pipelines")


def test_denoise_step_gives_the_pipelines_final_latents(tiny_pipe, wide_lq) -> None:
    call = {**CALL, "output_type": "latent", "tile_batch_size": 2}
    expected = tiny_pipe(wide_lq, generator=_seeded(6), **call).images
    state = _modular(tiny_pipe, _blocks_until("denoise"))(image=wide_lq, generator=_seeded(6), **call)
    assert torch.equal(state.get("latents"), expected)


def test_decode_step_decodes_and_crops(tiny_pipe, lq_image) -> None:
    latents = torch.randn(1, 4, 5, 6)
    decode = _modular(tiny_pipe, FaithDiffSDXLVaeDecodeStep())
    images = decode(latents=latents, output_size=(38, 45), output_type="pt", output="images")
    assert torch.equal(images, tiny_pipe.decode_latents(latents)[..., :38, :45])
    assert decode(latents=latents, output_size=(38, 45), output_type="latent", output="images") is latents
    with pytest.raises(ValueError, match="output_type"):
        decode(latents=latents, output_size=(38, 45), output_type="jpeg")


def test_color_fix_step(tiny_pipe) -> None:
    images, reference = torch.rand(2, 3, 8, 8), torch.rand(1, 3, 8, 8)
    fix = _modular(tiny_pipe, FaithDiffSDXLColorFixStep())
    call = {"images": images, "lq_reference": reference, "num_images_per_prompt": 2, "output": "images"}
    references = reference.repeat(2, 1, 1, 1)
    assert torch.equal(fix(**call), apply_color_fix(images, references, "adain"))
    assert torch.equal(fix(color_fix="wavelet", **call), apply_color_fix(images, references, "wavelet"))
    # None is no colour fix, as in FaithDiffSDXLPipeline, although diffusers reads a None input as its default.
    assert fix(color_fix=None, **call) is images


def test_postprocess_step(tiny_pipe) -> None:
    images = torch.rand(1, 3, 8, 10)
    post = _modular(tiny_pipe, FaithDiffSDXLPostprocessStep())
    assert torch.equal(post(images=images, output_type="pt", output="images"), images)
    array = post(images=images, output_type="np", output="images")
    np.testing.assert_array_equal(array, images.permute(0, 2, 3, 1).numpy())
    (pil,) = post(images=images, output="images")
    assert isinstance(pil, PIL.Image.Image) and pil.size == (10, 8)


# --- Composition ------------------------------------------------------------------------------------------------


class _GreyColorFix(ModularPipelineBlocks):
    """A user's own colour fix: the mean of the channels."""

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam("images", required=True)]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("images")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        block_state.images = block_state.images.mean(dim=1, keepdim=True).expand_as(block_state.images)
        self.set_block_state(state, block_state)
        return components, state


def test_a_swapped_block_changes_only_its_step(tiny_pipe, wide_lq) -> None:
    blocks = FaithDiffSDXLAutoBlocks()
    blocks.sub_blocks["color_fix"] = _GreyColorFix()
    call = {**CALL, "generator": _seeded(1)}
    ours = _modular(tiny_pipe)(image=wide_lq, **call)
    theirs = _modular(tiny_pipe, blocks)(image=wide_lq, **{**call, "generator": _seeded(1)})
    assert torch.equal(theirs.get("latents"), ours.get("latents"))
    decoded = tiny_pipe.decode_latents(ours.get("latents"))[..., :96, :128]
    assert torch.equal(theirs.get("images"), decoded.mean(dim=1, keepdim=True).expand_as(decoded))
    assert not torch.equal(theirs.get("images"), ours.get("images"))


def test_a_swapped_loop_block_changes_only_its_step(tiny_pipe, wide_lq) -> None:
    class _NoGuidance(FaithDiffSDXLLoopGuidance):
        def __call__(self, components, block_state, i, t):
            block_state.guided_tile_noise = [noise.chunk(2)[1] for noise in block_state.tile_noise]
            return components, block_state

    blocks = FaithDiffSDXLAutoBlocks()
    blocks.sub_blocks["denoise"].sub_blocks["guidance"] = _NoGuidance()
    # Keeping only the conditional prediction is guidance scale 1 on the same (guided) UNet calls.
    swapped = _modular(tiny_pipe, blocks)(image=wide_lq, generator=_seeded(1), output="images", **CALL)
    state = _modular(tiny_pipe)(image=wide_lq, generator=_seeded(1), guidance_scale=1.000001, **CALL)
    assert torch.allclose(swapped, state.get("images"), atol=1e-4)
    guided = _modular(tiny_pipe)(image=wide_lq, generator=_seeded(1), output="images", **CALL)
    assert not torch.allclose(swapped, guided)


def test_one_components_manager_for_faithdiff_and_sdxl(wide_lq) -> None:
    manager = ComponentsManager()
    classic = FaithDiffSDXLPipeline(**tiny_components())
    classic.set_progress_bar_config(disable=True)
    modular = FaithDiffSDXLModularPipeline.from_pipe(classic, components_manager=manager, collection="faithdiff")
    for name, component in classic.components.items():
        assert getattr(modular, name) is component, name
    shared = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"]
    sdxl = StableDiffusionXLAutoBlocks().init_pipeline(components_manager=manager, collection="sdxl")
    sdxl.update_components(**manager.get_components_by_names(shared, collection="faithdiff"))
    assert all(getattr(sdxl, name) is getattr(classic, name) for name in shared)
    # SDXL's own text encoding feeds FaithDiff: the same image as FaithDiff's pipeline encoding the prompt.
    text = StableDiffusionXLTextEncoderStep().init_pipeline(components_manager=manager)
    text.update_components(**manager.get_components_by_names(shared[:4], collection="sdxl"))
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    embeddings = text(prompt="a photo", negative_prompt="", output=names)
    modular.set_progress_bar_config(disable=True)
    restored = modular(image=wide_lq, generator=_seeded(1), output="images", **{**CALL, "prompt": None}, **embeddings)
    assert torch.equal(restored, classic(wide_lq, generator=_seeded(1), **CALL).images)


# --- Loading and saving -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, FaithDiffSDXLPipeline]:
    """A tiny pipeline as FaithDiffSDXLPipeline.save_pretrained writes it, and the pipeline loaded from it."""
    folder = tmp_path_factory.mktemp("saved") / "faithdiff"
    FaithDiffSDXLPipeline(**tiny_components()).save_pretrained(folder)
    pipe = FaithDiffSDXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


def test_saved_folders_carry_the_blocks_definition(saved) -> None:
    folder, _ = saved
    config = json.loads((folder / "modular_config.json").read_text())
    assert config["auto_map"] == {"ModularPipelineBlocks": "modular_blocks_faithdiff_sdxl.FaithDiffSDXLAutoBlocks"}
    assert config["_class_name"] == "FaithDiffSDXLAutoBlocks"
    assert config["requirements"] == {"faithdiff-pipeline": ">=0.1.0"}
    source = (folder / BLOCKS_CODE).read_text()
    assert source == hub.custom_code_source("FaithDiffSDXLAutoBlocks", hub.MODULAR_LOADER)
    imports = [node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert [(node.module, [alias.name for alias in node.names]) for node in imports] == [
        ("faithdiff_pipeline", ["FaithDiffSDXLAutoBlocks"])
    ]
    index = json.loads((folder / "modular_model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLModularPipeline"
    assert index["_blocks_class_name"] == "FaithDiffSDXLAutoBlocks"
    assert index["force_zeros_for_empty_prompt"] is False
    assert index["alignment"][:2] == ["faithdiff_pipeline.alignment", "FaithDiffAlignmentModel"]
    assert index["unet"][2] == {
        "pretrained_model_name_or_path": str(folder.resolve()),
        "revision": None,
        "subfolder": "unet",
        "type_hint": ["diffusers", "UNet2DConditionModel"],
        "variant": None,
    }
    assert "captioner" not in index


def test_plain_diffusers_loads_a_saved_folder_as_a_modular_pipeline(saved, wide_lq) -> None:
    folder, pipe = saved
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        ModularPipeline.from_pretrained(folder)
    modular = ModularPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(modular).__name__ == "StableDiffusionXLModularPipeline"
    # diffusers ran the folder's file, which handed it the installed package's blocks.
    assert type(modular.blocks) is FaithDiffSDXLAutoBlocks
    modular.load_components()
    assert type(modular.alignment).__name__ == "FaithDiffAlignmentModel"
    modular.set_progress_bar_config(disable=True)
    restored = modular(image=wide_lq, generator=_seeded(1), output="images", **CALL)
    assert torch.equal(restored, pipe(wide_lq, generator=_seeded(1), **CALL).images)


def test_our_modular_loader_never_runs_the_folders_code(saved, tmp_path, wide_lq) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(saved[0], folder)
    marker = tmp_path / "ran"
    (folder / BLOCKS_CODE).write_text(f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('ran')\n")
    modular = FaithDiffSDXLModularPipeline.from_pretrained(folder)
    modular.load_components()
    assert not marker.exists()
    assert type(modular.blocks) is FaithDiffSDXLAutoBlocks
    modular.set_progress_bar_config(disable=True)
    restored = modular(image=wide_lq, generator=_seeded(1), output="images", **CALL)
    assert torch.equal(restored, saved[1](wide_lq, generator=_seeded(1), **CALL).images)


def test_folders_from_before_the_modular_files_load_with_our_class(saved, tmp_path) -> None:
    folder = tmp_path / "old"
    shutil.copytree(saved[0], folder)
    for name in ("modular_model_index.json", "modular_config.json", BLOCKS_CODE):
        (folder / name).unlink()
    modular = FaithDiffSDXLModularPipeline.from_pretrained(folder)
    modular.load_components()
    loaded = {name for name, component in modular.components.items() if component is not None}
    assert {name for name, component in saved[1].components.items() if component is not None} <= loaded
    assert type(modular.lq_encoder).__name__ == "FaithDiffLQEncoder"


def test_a_modular_pipeline_saves_and_loads_again(saved, tmp_path, wide_lq) -> None:
    FaithDiffSDXLModularPipeline.from_pipe(saved[1]).save_pretrained(tmp_path / "modular")
    assert (tmp_path / "modular" / BLOCKS_CODE).is_file()
    modular = ModularPipeline.from_pretrained(tmp_path / "modular", trust_remote_code=True)
    modular.load_components()
    modular.set_progress_bar_config(disable=True)
    restored = modular(image=wide_lq, generator=_seeded(1), output="images", **CALL)
    assert torch.equal(restored, saved[1](wide_lq, generator=_seeded(1), **CALL).images)


def test_blocks_saved_beside_a_pipeline_that_diffusers_saved(saved, tmp_path, wide_lq) -> None:
    loaded = ModularPipeline.from_pretrained(saved[0], trust_remote_code=True)
    loaded.load_components()
    folder = tmp_path / "resaved"
    # diffusers saves the components and their index, not the blocks: they are saved beside them.
    loaded.save_pretrained(str(folder), overwrite_modular_index=True)
    assert not (folder / "modular_config.json").exists()
    loaded.blocks.save_pretrained(folder)
    assert (folder / BLOCKS_CODE).read_text() == hub.custom_code_source("FaithDiffSDXLAutoBlocks", hub.MODULAR_LOADER)
    again = ModularPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(again.blocks) is FaithDiffSDXLAutoBlocks
    again.load_components()
    again.set_progress_bar_config(disable=True)
    restored = again(image=wide_lq, generator=_seeded(1), output="images", **CALL)
    assert torch.equal(restored, saved[1](wide_lq, generator=_seeded(1), **CALL).images)


def test_an_fp16_folder_names_its_variant(saved, tmp_path) -> None:
    folder = tmp_path / "fp16"
    FaithDiffSDXLPipeline.from_pretrained(saved[0]).to(torch.float16).save_pretrained(folder, variant="fp16")
    index = json.loads((folder / "modular_model_index.json").read_text())
    assert index["unet"][2]["variant"] == "fp16"
    assert index["tokenizer"][2]["variant"] is None
    modular = FaithDiffSDXLModularPipeline.from_pretrained(folder)
    modular.load_components(dtype=torch.float16)
    assert modular.unet.dtype == torch.float16
    # A folder with both precisions: the variant asked for.
    saved[1].save_pretrained(folder)
    full = FaithDiffSDXLModularPipeline.from_pretrained(folder)
    assert full.get_component_spec("unet").variant is None
    half = FaithDiffSDXLModularPipeline.from_pretrained(folder, variant="fp16")
    assert half.get_component_spec("unet").variant == "fp16"


def _push(pipe: FaithDiffSDXLPipeline, folder: Path, root: Path, monkeypatch) -> None:
    """save_pretrained(push_to_hub=True) into the stand-in Hub under ``root``."""

    class Card:
        def save(self, path: str) -> None:
            Path(path).write_text("card")

    def upload_folder(repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, root / repo_id, dirs_exist_ok=True)

    monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kwargs: type("Repo", (), {"repo_id": repo_id}))
    monkeypatch.setattr(hub, "upload_folder", upload_folder)
    monkeypatch.setattr("diffusers.utils.hub_utils.load_or_create_model_card", lambda *args, **kwargs: Card())
    monkeypatch.setattr("diffusers.utils.hub_utils.populate_model_card", lambda card, **kwargs: card)
    pipe.save_pretrained(folder, push_to_hub=True, repo_id=REPO_ID)


# Run by the child process: json arguments in argv[1]; a file-based Hub under args["hub_root"], installed where
# diffusers and transformers import it from before they are imported. Files are fetched into huggingface_hub's own
# cache layout, where transformers looks for them after a download.
CHILD = r'''
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

args = json.loads(sys.argv[1])
root, commit = Path(args["hub_root"]), "0" * 40
fetched = []


def snapshot(repo_id):
    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def repo_files(repo_id):
    folder = root / repo_id
    if not folder.is_dir():
        raise FileNotFoundError(f"Repository {repo_id} not found")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def fetch(repo_id, relative):
    source = root / repo_id / relative
    if not source.is_file():
        raise huggingface_hub.errors.EntryNotFoundError(f"{relative} not in {repo_id}")
    target = snapshot(repo_id) / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    fetched.append(relative)
    return str(target)


def model_info(repo_id, revision=None, token=None, **kwargs):
    return SimpleNamespace(sha=commit, siblings=[SimpleNamespace(rfilename=name) for name in repo_files(repo_id)])


def hf_hub_download(repo_id, filename, subfolder=None, **kwargs):
    return fetch(repo_id, f"{subfolder}/{filename}" if subfolder else filename)


def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
    files = filter_repo_objects(repo_files(repo_id), allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    for relative in files:
        fetch(repo_id, relative)
    return str(snapshot(repo_id))


def resolve_revision(repo_id, revision=None, **kwargs):
    return revision


for function in (model_info, hf_hub_download, snapshot_download, resolve_revision):
    setattr(huggingface_hub, function.__name__, function)
# transformers lists a repository's files to find a tokenizer's.
huggingface_hub.HfApi.list_repo_files = lambda self, repo_id, **kwargs: repo_files(repo_id)

import torch
from diffusers import ModularPipeline
from PIL import Image

pipe = ModularPipeline.from_pretrained(args["repo_id"], trust_remote_code=True)
pipe.load_components()
pipe.set_progress_bar_config(disable=True)
generator = torch.Generator().manual_seed(1)
images = pipe(image=Image.open(args["image"]), generator=generator, output="images", **args["call"])
torch.save(images, args["output"])
result = {
    "class": type(pipe).__name__,
    "blocks": f"{type(pipe.blocks).__module__}.{type(pipe.blocks).__qualname__}",
    "components": {name: type(c).__name__ for name, c in pipe.components.items()},
    "fetched": fetched,
}
Path(args["result"]).write_text(json.dumps(result))
'''


def test_a_pushed_pipeline_loads_from_the_hub_as_a_modular_pipeline(saved, tmp_path, monkeypatch, wide_lq) -> None:
    root = tmp_path / "hub"
    _push(saved[1], tmp_path / "pushed", root, monkeypatch)
    index = json.loads((root / REPO_ID / "modular_model_index.json").read_text())
    assert {entry[2]["pretrained_model_name_or_path"] for entry in index.values() if isinstance(entry, list)} == {
        REPO_ID
    }
    work = tmp_path / "child"
    work.mkdir()
    (work / "load.py").write_text(CHILD)
    wide_lq.save(work / "lq.png")
    args = {
        "hub_root": str(root),
        "repo_id": REPO_ID,
        "image": str(work / "lq.png"),
        "call": CALL,
        "output": str(work / "images.pt"),
        "result": str(work / "result.json"),
    }
    env = {**os.environ, "HF_HOME": str(work / "hf-home"), "HF_MODULES_CACHE": str(work / "modules")}
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("DIFFUSERS_DISABLE_REMOTE_CODE", None)
    done = subprocess.run(
        [sys.executable, str(work / "load.py"), json.dumps(args)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((work / "result.json").read_text())
    assert result["class"] == "StableDiffusionXLModularPipeline"
    assert result["blocks"] == "faithdiff_pipeline.modular.modular_blocks_faithdiff_sdxl.FaithDiffSDXLAutoBlocks"
    assert result["components"]["alignment"] == "FaithDiffAlignmentModel"
    assert {"modular_config.json", BLOCKS_CODE, "modular_model_index.json"} <= set(result["fetched"])
    expected = saved[1](PIL.Image.open(work / "lq.png"), generator=_seeded(1), **CALL).images
    # Same weights; the last float32 bits may differ between processes (BLAS kernels depend on memory alignment).
    torch.testing.assert_close(torch.load(work / "images.pt"), expected, rtol=0, atol=1e-5)


# --- The official parity fixtures -------------------------------------------------------------------------------


def _case_params() -> list:
    folder = locate_shared("parity", "cases", env="FAITHDIFF_PARITY_CASES")
    if not (folder / "cases.json").is_file():
        return [pytest.param(None, id="fixtures-missing")]
    with open(folder / "cases.json", encoding="utf-8") as handle:
        return [pytest.param(dict(case, folder=folder), id=case["name"]) for case in json.load(handle)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    release = shared_path("parity", "tiny-official", env="FAITHDIFF_PARITY_MODEL")
    output = tmp_path_factory.mktemp("converted") / "faithdiff"
    convert_official_release(release / "FaithDiff.bin", release / "base", release / "vae-fp16-fix", output)
    return output


@pytest.fixture(scope="module")
def parity_pipes(converted) -> tuple[FaithDiffSDXLPipeline, ModularPipeline]:
    classic = FaithDiffSDXLPipeline.from_pretrained(converted)
    modular = ModularPipeline.from_pretrained(converted, trust_remote_code=True)
    modular.load_components()
    for pipe in (classic, modular):
        pipe.set_progress_bar_config(disable=True)
    return classic, modular


def test_the_converter_writes_the_modular_files(converted) -> None:
    index = json.loads((converted / "modular_model_index.json").read_text())
    assert index["unet"][2]["pretrained_model_name_or_path"] == str(converted.resolve())
    assert (converted / BLOCKS_CODE).is_file() and (converted / "modular_config.json").is_file()


@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("case", _case_params())
def test_official_cases_restore_as_the_pipeline_and_the_release(parity_pipes, case, guided) -> None:
    if case is None:
        shared_path("parity", "cases", "cases.json", env="FAITHDIFF_PARITY_CASES")
    tensors = load_file(case["folder"] / f"{case['name']}.safetensors")
    classic, modular = parity_pipes
    lq = PIL.Image.fromarray(tensors["lq_uint8"].numpy())
    call = {
        "prompt": case["prompt"],
        "negative_prompt": case["negative_prompt"],
        "upscale": case["upscale"],
        "num_inference_steps": case["steps"],
        "guidance_scale": case["guidance"] if guided else 1.0,
        "start_point": "noise",
        "latents": tensors["initial_noise"],
        "tile_size": case["tile_px"],
        "tile_stride": 8 * math.ceil(case["tile_px"] // 8 * case["overlap"]),
    }
    outputs = (("latent", None, "final_latents"), ("pt", None, "image"), ("pt", "adain", "image_adain"))
    for output_type, color_fix, fixture in outputs:
        ours = modular(image=lq, output_type=output_type, color_fix=color_fix, output="images", **call)
        expected = classic(lq, output_type=output_type, color_fix=color_fix, **call).images
        assert (ours - expected).abs().max() <= PARITY_ATOL, (output_type, color_fix)
        if guided:
            reference = tensors[fixture]
            tolerance = LATENT_RTOL * reference.abs().max() if output_type == "latent" else IMAGE_ATOL
            assert (ours - reference).abs().max() <= tolerance, fixture
