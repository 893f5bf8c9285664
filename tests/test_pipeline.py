"""FaithDiffSDXLPipeline behaves like a diffusers pipeline: batching, seeding, callbacks, outputs, save/load, offload."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from tiny_models import fast_call, tiny_components
from faithdiff_pipeline import FaithDiffSDXLPipeline


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(pipe, image, **overrides) -> torch.Tensor:
    return pipe(image, **fast_call(generator=_seeded(), **overrides)).images


@pytest.fixture
def big_lq(lq_image) -> PIL.Image.Image:
    """Upscaled x2 it gives a 12 x 16 latent: six 64-px tiles."""
    return lq_image.resize((64, 48))


def test_same_seed_same_image_and_other_seed_differs(tiny_pipe, lq_image) -> None:
    first = _run(tiny_pipe, lq_image)
    assert torch.equal(first, _run(tiny_pipe, lq_image))
    assert not torch.allclose(first, tiny_pipe(lq_image, **fast_call(generator=_seeded(1))).images, atol=1e-3)


def test_output_size_is_the_upscaled_input(tiny_pipe, lq_image) -> None:
    image = _run(tiny_pipe, lq_image, upscale=1.5)
    assert image.shape == (1, 3, 30, 36)
    assert image.min() >= 0 and image.max() <= 1


def test_output_types_agree(tiny_pipe, lq_image) -> None:
    pt = _run(tiny_pipe, lq_image)
    np_images = _run(tiny_pipe, lq_image, output_type="np")
    pil = _run(tiny_pipe, lq_image, output_type="pil")
    latents = _run(tiny_pipe, lq_image, output_type="latent")
    assert isinstance(np_images, np.ndarray) and np_images.shape == (1, 40, 48, 3)
    np.testing.assert_allclose(np_images[0], pt[0].permute(1, 2, 0).numpy(), atol=1e-6)
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (48, 40)
    assert np.abs(np.asarray(pil[0], dtype=np.float32) - np_images[0] * 255).max() <= 1.0
    assert latents.shape == (1, 4, 5, 6)
    (tuple_images,) = tiny_pipe(lq_image, **fast_call(generator=_seeded(), return_dict=False))
    assert torch.equal(tuple_images, pt)


def test_batch_of_two_equals_each_alone(tiny_pipe, big_lq) -> None:
    other = big_lq.transpose(PIL.Image.ROTATE_180)
    batch = tiny_pipe(
        [big_lq, other], **fast_call(prompt=["a house", "a tree"], generator=[_seeded(1), _seeded(2)])
    ).images
    alone_a = tiny_pipe(big_lq, **fast_call(prompt="a house", generator=_seeded(1))).images
    alone_b = tiny_pipe(other, **fast_call(prompt="a tree", generator=_seeded(2))).images
    torch.testing.assert_close(batch, torch.cat([alone_a, alone_b]), rtol=0, atol=2e-5)


def test_num_images_per_prompt(tiny_pipe, lq_image) -> None:
    images = _run(tiny_pipe, lq_image, num_images_per_prompt=3)
    assert images.shape == (3, 3, 40, 48)
    assert not torch.allclose(images[0], images[1], atol=1e-3)
    generators = [_seeded(5), _seeded(6)]
    pair = tiny_pipe(lq_image, **fast_call(num_images_per_prompt=2, generator=generators)).images
    torch.testing.assert_close(
        pair[1:], tiny_pipe(lq_image, **fast_call(generator=_seeded(6))).images, rtol=0, atol=2e-5
    )


def test_tile_batch_size_does_not_change_the_result(tiny_pipe, big_lq) -> None:
    one = _run(tiny_pipe, big_lq, tile_batch_size=1)
    torch.testing.assert_close(_run(tiny_pipe, big_lq, tile_batch_size=4), one, rtol=0, atol=2e-5)
    torch.testing.assert_close(_run(tiny_pipe, big_lq, tile_batch_size=6), one, rtol=0, atol=2e-5)


def test_tiles_blend_to_the_whole_latent_for_a_pixelwise_model(tiny_pipe, big_lq) -> None:
    # With a noise prediction that depends on each latent pixel alone, every tile predicts the same value at a pixel,
    # so the normalised Gaussian blend of the six overlapping tiles must give exactly the untiled prediction. A tile
    # cropped or pasted at the wrong place, or weights that do not sum to one, break this.
    def pixelwise(module, args, kwargs, output):
        return (torch.sin(args[0]) * 0.3 + 0.1 * args[0],)

    calls = []
    counter = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    hook = tiny_pipe.unet.register_forward_hook(pixelwise, with_kwargs=True)
    try:
        tiled = _run(tiny_pipe, big_lq)
        assert all(shape[-2:] == (8, 8) for shape in calls) and len(calls) > 2  # really in 64-px tiles
        whole = _run(tiny_pipe, big_lq, tile_size=1024)
    finally:
        hook.remove()
        counter.remove()
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)


def test_no_cfg_calls_the_unet_with_one_copy(tiny_pipe, lq_image) -> None:
    batches = []
    tiny_pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    _run(tiny_pipe, lq_image, guidance_scale=1.0)
    assert batches == [1, 1]
    batches.clear()
    _run(tiny_pipe, lq_image, guidance_scale=5.0)
    assert batches == [2, 2]


def test_guidance_combines_the_two_halves(tiny_pipe, lq_image) -> None:
    # With the prompt as its own negative prompt both CFG halves predict the same noise, so any guidance scale must
    # give the unguided image; with another negative prompt it must not.
    prompt = "a photo"
    unguided = _run(tiny_pipe, lq_image, prompt=prompt, guidance_scale=1.0)
    same = _run(tiny_pipe, lq_image, prompt=prompt, negative_prompt=prompt, guidance_scale=5.0)
    torch.testing.assert_close(same, unguided, rtol=0, atol=1e-5)
    guided = _run(tiny_pipe, lq_image, prompt=prompt, negative_prompt="", guidance_scale=5.0)
    assert (guided - unguided).abs().max() > 1e-3


def test_callback_once_per_step_with_whole_latents_and_can_replace_them(tiny_pipe, big_lq) -> None:
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape), tuple(tensors["prompt_embeds"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 2 else {}

    latents = _run(
        tiny_pipe,
        big_lq,
        num_inference_steps=3,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    assert seen == [(i, (1, 4, 12, 16), (2, 77, 64)) for i in range(3)]
    assert torch.count_nonzero(latents) == 0


def test_interrupt_skips_remaining_steps(tiny_pipe, lq_image) -> None:
    calls = []
    tiny_pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))

    def stop(pipe, step, timestep, tensors):
        pipe._interrupt = True
        return {}

    _run(tiny_pipe, lq_image, num_inference_steps=4, callback_on_step_end=stop)
    assert len(calls) == 1


def test_start_points_and_latents_argument(tiny_pipe, lq_image) -> None:
    noise = torch.randn(1, 4, 5, 6, generator=_seeded(3))
    from_noise = _run(tiny_pipe, lq_image, start_point="noise", latents=noise)
    other_seed = tiny_pipe(lq_image, **fast_call(start_point="noise", latents=noise, generator=_seeded(9))).images
    assert torch.equal(from_noise, other_seed)  # the given noise replaces everything the generator would draw
    from_lr = _run(tiny_pipe, lq_image, start_point="lr", latents=noise)
    assert not torch.allclose(from_noise, from_lr, atol=1e-3)


def test_lr_start_is_ddpm_noising_of_the_vae_latent(tiny_pipe, lq_image) -> None:
    from diffusers import DDPMScheduler

    from faithdiff_pipeline.preprocessing import prepare_lq_images

    noise = torch.randn(1, 4, 5, 6, generator=_seeded(3))
    tiny_pipe.scheduler.set_timesteps(2)
    padded = prepare_lq_images(lq_image, 2).padded
    got = tiny_pipe.prepare_latents(padded, 1, "lr", _seeded(4), noise)
    posterior = tiny_pipe.vae.encode(padded).latent_dist
    gen = _seeded(4)
    z = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)) * 0.13025
    alpha = DDPMScheduler.from_config(tiny_pipe.scheduler.config).alphas_cumprod[999]
    expected = alpha.sqrt() * z + (1 - alpha).sqrt() * noise * tiny_pipe.scheduler.init_noise_sigma
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prompt_embeds_equal_prompt(tiny_pipe, lq_image) -> None:
    embeds, negative, pooled, negative_pooled = tiny_pipe.encode_prompt("a cat", negative_prompt="", device="cpu")
    direct = _run(tiny_pipe, lq_image, prompt="a cat")
    given = _run(
        tiny_pipe,
        lq_image,
        prompt=None,
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=negative,
        negative_pooled_prompt_embeds=negative_pooled,
    )
    assert torch.equal(direct, given)


def test_empty_negative_prompt_is_encoded_not_zeros(tiny_pipe) -> None:
    _, negative, _, negative_pooled = tiny_pipe.encode_prompt("a cat", negative_prompt="", device="cpu")
    assert negative.abs().sum() > 0 and negative_pooled.abs().sum() > 0
    _, default_negative, *_ = tiny_pipe.encode_prompt("a cat", device="cpu")
    assert torch.equal(default_negative, negative)  # force_zeros_for_empty_prompt is off: None means ""


def test_save_load_round_trip(tiny_pipe, lq_image, tmp_path) -> None:
    expected = _run(tiny_pipe, lq_image)
    tiny_pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    # diffusers' custom-code layout (tests/test_diffusers_loading.py loads it with plain diffusers).
    assert index["_class_name"] == ["pipeline_faithdiff_sdxl", "FaithDiffSDXLPipeline"]
    assert index["alignment"] == ["faithdiff_alignment", "FaithDiffAlignmentModel"]
    assert (tmp_path / "alignment" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = FaithDiffSDXLPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "alignment", "lq_encoder", "text_encoder", "text_encoder_2"):
        original, reloaded = getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert original.keys() == reloaded.keys() and all(torch.equal(original[k], reloaded[k]) for k in original), (
            name
        )
    assert loaded.scheduler.config.timestep_spacing == "leading"
    # Weights read from safetensors sit in memory-mapped storage whose alignment can steer BLAS onto other kernels
    # (a few 1e-7 in a text encoder, grown by the sampling). In freshly allocated storage, as the original's, the
    # reloaded pipeline must compute exactly the same image.
    for name in ("unet", "vae", "alignment", "lq_encoder", "text_encoder", "text_encoder_2"):
        for parameter in getattr(loaded, name).parameters():
            parameter.data = parameter.data.clone()
    assert torch.equal(_run(loaded, lq_image), expected)


def test_fp16_variant_round_trip(tiny_pipe, tmp_path) -> None:
    tiny_pipe.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = FaithDiffSDXLPipeline.from_pretrained(tmp_path, variant="fp16", dtype=torch.float16)
    assert loaded.alignment.dtype == torch.float16 and loaded.lq_encoder.dtype == torch.float16


def test_without_lq_encoder_features_come_from_the_vae(lq_image) -> None:
    parts = tiny_components(with_lq_encoder=False)
    pipe = FaithDiffSDXLPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    image = _run(pipe, lq_image)
    from faithdiff_pipeline import FaithDiffLQEncoder

    with_copy = FaithDiffSDXLPipeline(**dict(parts, lq_encoder=FaithDiffLQEncoder.from_vae(parts["vae"])))
    with_copy.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_run(with_copy, lq_image), image, rtol=0, atol=1e-6)


def test_from_pipe_reuses_an_sdxl_pipeline(lq_image) -> None:
    parts = tiny_components()
    faithdiff_parts = {name: parts.pop(name) for name in ("alignment", "lq_encoder")}
    sdxl = StableDiffusionXLPipeline(**parts)
    pipe = FaithDiffSDXLPipeline.from_pipe(sdxl, **faithdiff_parts)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet is sdxl.unet and pipe.text_encoder_2 is sdxl.text_encoder_2
    reference = FaithDiffSDXLPipeline(**parts, **faithdiff_parts)
    reference.set_progress_bar_config(disable=True)
    assert torch.equal(_run(pipe, lq_image), _run(reference, lq_image))


def test_model_cpu_offload_sequence_gives_the_same_result(tiny_pipe, lq_image) -> None:
    expected = _run(tiny_pipe, lq_image)
    tiny_pipe.enable_model_cpu_offload(device="cpu")
    for name in ("text_encoder", "text_encoder_2", "lq_encoder", "unet", "vae"):
        assert hasattr(getattr(tiny_pipe, name), "_hf_hook"), name
    assert not hasattr(tiny_pipe.alignment, "_hf_hook")
    torch.testing.assert_close(_run(tiny_pipe, lq_image), expected, rtol=0, atol=1e-6)


def test_accepts_arrays_tensors_and_paths(tiny_pipe, lq_image, tmp_path) -> None:
    expected = _run(tiny_pipe, lq_image)
    path = tmp_path / "lq.png"
    lq_image.save(path)
    assert torch.equal(_run(tiny_pipe, str(path)), expected)
    assert torch.equal(_run(tiny_pipe, np.asarray(lq_image)), expected)
    as_float = torch.from_numpy(np.asarray(lq_image, dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(
        _run(tiny_pipe, as_float, upscale=1), _run(tiny_pipe, lq_image, upscale=1), rtol=0, atol=1e-5
    )


def test_vae_tiling_tiles_the_lq_encoder_too(tiny_pipe, lq_image) -> None:
    from faithdiff_pipeline.preprocessing import prepare_lq_images
    from faithdiff_pipeline.tiling import tiled_encode

    padded = prepare_lq_images(lq_image.resize((64, 48)), 2).padded  # 96 x 128 pixels
    whole = tiny_pipe.lq_features(padded)
    tiny_pipe.vae.enable_tiling()
    tiny_pipe.vae.tile_sample_min_size, tiny_pipe.vae.tile_latent_min_size = 256, 32
    assert torch.equal(tiny_pipe.lq_features(padded), whole)  # one tile covers the image
    tiny_pipe.vae.tile_sample_min_size, tiny_pipe.vae.tile_latent_min_size = 64, 8
    calls = []
    hook = tiny_pipe.lq_encoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[-2:]))
    tiled = tiny_pipe.lq_features(padded)
    hook.remove()
    assert tiled.shape == whole.shape and len(calls) > 1 and all(max(size) <= 64 for size in calls)
    # The VAE's tile settings are the ones used (tiled_encode itself is checked against untiled encoders in test_tiling).
    assert torch.equal(tiled, tiled_encode(tiny_pipe.lq_encoder, padded, 64, tiny_pipe.vae.tile_overlap_factor))
    assert not torch.allclose(tiled, whole, atol=1e-3)
    image = _run(tiny_pipe, lq_image.resize((64, 48)))
    assert image.shape == (1, 3, 96, 128) and torch.isfinite(image).all()
