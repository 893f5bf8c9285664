"""Every user mistake gets a ValueError/TypeError that names the argument and what was expected."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from tiny_models import fast_call


def _call(pipe, image, **overrides):
    return pipe(image, **fast_call(**overrides))


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        ({"upscale": 0}, ValueError, r"`upscale` must be a number > 0, got 0"),
        ({"upscale": -2}, ValueError, r"`upscale`.*-2"),
        ({"upscale": "2"}, ValueError, r"`upscale`.*'2'"),
        ({"tile_size": 56}, ValueError, r"`tile_size`.*at least 64.*56"),
        ({"tile_size": 100}, ValueError, r"`tile_size`.*multiple of 8.*100"),
        (
            {"tile_size": 64, "tile_stride": 72},
            ValueError,
            r"`tile_stride` must be a multiple of 8 between 8 and `tile_size` \(64\) pixels, got 72",
        ),
        ({"tile_stride": 12}, ValueError, r"`tile_stride`.*multiple of 8.*12"),
        (
            {"color_fix": "histogram"},
            ValueError,
            r"`color_fix` must be one of \('adain', 'wavelet'\) or None, got 'histogram'",
        ),
        ({"start_point": "image"}, ValueError, r"`start_point` must be one of \('lr', 'noise'\), got 'image'"),
        ({"output_type": "jpeg"}, ValueError, r"`output_type`.*'jpeg'"),
        ({"num_inference_steps": 0}, ValueError, r"`num_inference_steps` must be a positive integer, got 0"),
        ({"num_images_per_prompt": 1.5}, ValueError, r"`num_images_per_prompt`.*1.5"),
        ({"tile_batch_size": 0}, ValueError, r"`tile_batch_size`.*0"),
        ({"prompt": ["a", "b"]}, ValueError, r"`prompt` has 2 entries but 1 images"),
        ({"negative_prompt": ["a", "b"]}, ValueError, r"`negative_prompt` has 2 entries"),
        ({"prompt": 3}, TypeError, r"`prompt` must be a string or a list of strings, got int"),
        (
            {"generator": [torch.Generator(), torch.Generator()]},
            ValueError,
            r"`generator` is a list of 2 generators, expected 1",
        ),
        (
            {"latents": torch.randn(1, 4, 6, 6)},
            ValueError,
            r"`latents` must have shape \(1, 4, 5, 6\).*\(1, 4, 6, 6\)",
        ),
        (
            {"callback_on_step_end_tensor_inputs": ["noise_pred"]},
            ValueError,
            r"`callback_on_step_end_tensor_inputs`.*noise_pred",
        ),
    ],
)
def test_bad_arguments(tiny_pipe, lq_image, overrides, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        _call(tiny_pipe, lq_image, **overrides)


def test_bad_images(tiny_pipe, lq_image, tmp_path) -> None:
    with pytest.raises(ValueError, match="`image` is required"):
        _call(tiny_pipe, None)
    with pytest.raises(TypeError, match=r"`image\[0\]` must be a PIL image.*got dict"):
        _call(tiny_pipe, {"pixels": 1})
    with pytest.raises(ValueError, match="empty list"):
        _call(tiny_pipe, [])
    with pytest.raises(ValueError, match=r"`image\[0\]` is empty or too small: 0x5"):
        _call(tiny_pipe, np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"`image\[0\]` array must be \[H, W, 3\]"):
        _call(tiny_pipe, np.zeros((4, 5, 4), dtype=np.uint8))
    with pytest.raises(TypeError, match=r"uint8, uint16 or floating point.*int64"):
        _call(tiny_pipe, np.zeros((4, 5, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"`image\[0\]` tensor must be \[3, H, W\]"):
        _call(tiny_pipe, torch.zeros(5, 4, 4))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match=r"`image` '.*corrupt.png' could not be read as an image"):
        _call(tiny_pipe, str(corrupt))
    with pytest.raises(ValueError, match=r"could not be read"):
        _call(tiny_pipe, tmp_path / "missing.png")
    with pytest.raises(ValueError, match="same size after upscaling"):
        _call(tiny_pipe, [lq_image, lq_image.resize((10, 10))])


def test_prompt_embeds_mistakes(tiny_pipe, lq_image) -> None:
    embeds, negative, pooled, negative_pooled = tiny_pipe.encode_prompt("a cat", negative_prompt="", device="cpu")
    with pytest.raises(ValueError, match="`pooled_prompt_embeds` is required"):
        _call(tiny_pipe, lq_image, prompt=None, prompt_embeds=embeds)
    with pytest.raises(ValueError, match="either `prompt` or `prompt_embeds`"):
        _call(tiny_pipe, lq_image, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match=r"`prompt_embeds` has batch size 2, expected one per image \(1\)"):
        _call(
            tiny_pipe,
            lq_image,
            prompt=None,
            prompt_embeds=embeds.repeat(2, 1, 1),
            pooled_prompt_embeds=pooled.repeat(2, 1),
        )
    with pytest.raises(ValueError, match="`negative_pooled_prompt_embeds` is required"):
        _call(tiny_pipe, lq_image, negative_prompt=None, negative_prompt_embeds=negative)


def test_nothing_is_left_hooked_after_an_error(tiny_pipe, lq_image) -> None:
    def fail(pipe, step, timestep, tensors):
        raise RuntimeError("user callback failed")

    with pytest.raises(RuntimeError, match="user callback failed"):
        _call(tiny_pipe, lq_image, callback_on_step_end=fail)
    hooks = list(tiny_pipe.unet.conv_in._forward_hooks.values())
    assert all(getattr(hook, "condition", None) is None for hook in hooks)  # the UNet is plain SDXL again


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"upscale": float("nan")}, r"`upscale` must be a number > 0, got nan"),
        ({"upscale": float("inf")}, r"`upscale` must be a number > 0, got inf"),
        ({"guidance_scale": float("nan")}, r"`guidance_scale` must be a finite number, got nan"),
        ({"guidance_scale": float("-inf")}, r"`guidance_scale` must be a finite number, got -inf"),
        ({"max_output_pixels": 0}, r"`max_output_pixels` must be a positive integer or None, got 0"),
    ],
)
def test_non_finite_numbers_are_refused(tiny_pipe, lq_image, overrides, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        _call(tiny_pipe, lq_image, **overrides)


def test_numpy_numbers_are_accepted(tiny_pipe, lq_image) -> None:
    seeded = dict(generator=torch.Generator().manual_seed(0))
    plain = _call(tiny_pipe, lq_image, upscale=2.0, guidance_scale=5.0, **seeded).images
    seeded = dict(generator=torch.Generator().manual_seed(0))
    numpy_typed = _call(tiny_pipe, lq_image, upscale=np.float32(2.0), guidance_scale=np.float64(5.0), **seeded).images
    assert torch.equal(plain, numpy_typed)


def test_float_images_outside_0_1_are_an_error_not_clipped(tiny_pipe) -> None:
    with pytest.raises(ValueError, match=r"`image\[0\]` has float values from 0 to 255.*\[0, 1\]"):
        _call(tiny_pipe, np.linspace(0, 255, 20 * 24 * 3).reshape(20, 24, 3))
    with pytest.raises(ValueError, match=r"`image\[0\]` has float values from -0.5 to 1"):
        _call(tiny_pipe, torch.linspace(-0.5, 1, 3 * 20 * 24).reshape(3, 20, 24))


def test_uint16_arrays_are_16_bit(tiny_pipe) -> None:
    levels = np.random.default_rng(0).integers(0, 65536, (20, 24, 3)).astype(np.uint16)
    as_uint16 = _call(tiny_pipe, levels, generator=torch.Generator().manual_seed(0)).images
    as_float = _call(tiny_pipe, levels.astype(np.float32) / 65535.0, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(as_uint16, as_float)


def test_results_below_the_models_minimum_are_padded_and_above_the_pixel_limit_refused(tiny_pipe) -> None:
    minimum = tiny_pipe.min_output_size
    assert minimum == 16  # 8 (VAE) x 2 (the tiny UNet's two levels)
    # Once refused; now padded up to the minimum and cropped back (see the test below).
    assert _call(tiny_pipe, PIL.Image.new("RGB", (1, 1))).images.shape[-2:] == (2, 2)
    with pytest.raises(ValueError, match=r"gives 512000x340000 = .* more than `max_output_pixels` \(67108864\)"):
        _call(tiny_pipe, PIL.Image.new("RGB", (512, 340)), upscale=1000)
    # The limit is the caller's to raise; None removes it (checked here on a small image only).
    assert _call(tiny_pipe, PIL.Image.new("RGB", (24, 20)), max_output_pixels=None).images.shape[-2:] == (40, 48)


def test_an_image_below_the_models_minimum_is_restored_padded_with_its_edges_and_cropped(tiny_pipe) -> None:
    """A 7x13 icon at upscale 1 gives a 7x13 result: what the pipeline gives for the icon padded by hand with its
    edge pixels to the minimum side (16 for the tiny UNet), then cropped."""
    icon = np.random.default_rng(3).integers(0, 256, (13, 7, 3), dtype=np.uint8)
    minimum = tiny_pipe.min_output_size
    by_hand = np.pad(icon, ((0, minimum - 13), (0, minimum - 7), (0, 0)), mode="edge")
    run = dict(upscale=1, color_fix=None, output_type="np")
    small = _call(tiny_pipe, icon, generator=torch.Generator().manual_seed(0), **run).images
    padded = _call(tiny_pipe, by_hand, generator=torch.Generator().manual_seed(0), **run).images
    assert small.shape == (1, 13, 7, 3)
    np.testing.assert_allclose(small, padded[:, :13, :7], rtol=0, atol=1e-6)
    # With the colour fix (against the icon itself), through PIL, and in a batch: the icon's size.
    assert _call(tiny_pipe, PIL.Image.fromarray(icon), upscale=1, output_type="pil").images[0].size == (7, 13)
    assert _call(tiny_pipe, [icon, icon], upscale=1).images.shape == (2, 3, 13, 7)


def test_the_command_restores_an_icon_at_its_size(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from faithdiff_pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    PIL.Image.fromarray(np.random.default_rng(4).integers(0, 256, (13, 7, 3), dtype=np.uint8)).save("icon.png")
    common = ["--model", str(tiny_model_dir), "--steps", "2", "--device", "cpu", "--dtype", "float32", "--prompt", "x"]
    assert main(["icon.png", "-o", "out", "--upscale", "1", *common]) == 0
    with PIL.Image.open("out/icon.png") as result:
        assert result.size == (7, 13)
