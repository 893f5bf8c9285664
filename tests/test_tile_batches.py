"""The pipeline's tile batches: every tensor of a UNet call laid out row for row alike, built once per run, and kept
in step with prompt embeddings that a step callback replaces."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from faithdiff_pipeline.pipeline_faithdiff_sdxl import TileBatch

SAMPLES = 2  # num_images_per_prompt


@pytest.fixture(scope="module")
def wide_lq() -> PIL.Image.Image:
    """48 x 64 pixels: at upscale 2 and 64-pixel tiles, a 12 x 16 latent of 2 x 3 overlapping tiles."""
    y, x = np.mgrid[0:48, 0:64]
    return PIL.Image.fromarray(np.stack([x * 4, y * 5, (x * y) % 256], axis=-1).astype(np.uint8))


def _call(pipe, image, **overrides) -> torch.Tensor:
    kwargs = {
        "prompt": "a photo",
        "num_inference_steps": 2,
        "tile_size": 64,
        "tile_batch_size": 2,
        "guidance_scale": 5.0,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(3),
    }
    kwargs.update(overrides)
    return pipe(image, **kwargs).images


def test_rows_of_a_tile_batch_line_up(tiny_pipe, wide_lq, monkeypatch) -> None:
    seen: dict = {}
    predict, features = tiny_pipe.predict_noise, tiny_pipe.lq_features

    def record_batches(latents, t, tiling, batches, before_unet=None):
        seen.setdefault("tiling", tiling)
        seen.setdefault("batches", []).append(batches)
        return predict(latents, t, tiling, batches, before_unet)

    def record_features(image):
        seen["features"] = features(image)
        return seen["features"]

    def record_prompts(pipe, step, timestep, tensors):
        seen.setdefault("prompts", tensors)
        return {}

    monkeypatch.setattr(tiny_pipe, "predict_noise", record_batches)
    monkeypatch.setattr(tiny_pipe, "lq_features", record_features)
    _call(
        tiny_pipe,
        wide_lq,
        num_images_per_prompt=SAMPLES,
        prompt="a photo",
        negative_prompt="blurry",
        callback_on_step_end=record_prompts,
        callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"],
    )
    tiling, batches = seen["tiling"], seen["batches"][0]
    # Built once: every step gets the very same batch objects.
    assert all(step_batches is batches for step_batches in seen["batches"])
    assert [list(batch.indices) for batch in batches] == [[0, 1], [2, 3], [4, 5]]
    # Batches of as many tiles share their prompt layouts instead of each holding a copy.
    assert all(batch.prompt_embeds is batches[0].prompt_embeds for batch in batches)
    assert all(batch.text_embeds is batches[0].text_embeds for batch in batches)
    features = seen["features"].repeat_interleave(SAMPLES, dim=0)
    prompt_embeds, text_embeds = seen["prompts"]["prompt_embeds"], seen["prompts"]["add_text_embeds"]
    for batch in batches:
        tiles = len(batch.indices)
        for row in range(2 * tiles * SAMPLES):
            half, tile, sample = row // (tiles * SAMPLES), batch.indices[row // SAMPLES % tiles], row % SAMPLES
            top, left = tiling.origins[tile]
            assert batch.time_ids[row].tolist() == [96, 128, top, left, 64, 64]
            assert torch.equal(batch.prompt_embeds[row], prompt_embeds[half * SAMPLES + sample])
            assert torch.equal(batch.text_embeds[row], text_embeds[half * SAMPLES + sample])
            embedded = tiny_pipe.alignment.embed_condition(tiling.crop(features, [tile]))[sample]
            torch.testing.assert_close(batch.condition_embeds[row], embedded, rtol=0, atol=1e-6)


def test_uneven_batches_get_one_prompt_layout_per_size(tiny_pipe, wide_lq, monkeypatch) -> None:
    seen = []
    predict = tiny_pipe.predict_noise

    def record(latents, t, tiling, batches: list[TileBatch], before_unet=None):
        seen.append(batches)
        return predict(latents, t, tiling, batches, before_unet)

    monkeypatch.setattr(tiny_pipe, "predict_noise", record)
    # 8 x 8 tiles 2 apart in the 12 x 16 latent: 3 x 5 = 15 tiles, in batches of 4, 4, 4 and 3.
    _call(tiny_pipe, wide_lq, tile_stride=16, tile_batch_size=4, guidance_scale=1.0)
    batches = seen[0]
    assert [len(batch.indices) for batch in batches] == [4, 4, 4, 3]
    layouts = {id(batch.prompt_embeds) for batch in batches}
    assert len(layouts) == 2
    for batch in batches:
        # Without guidance there is one copy per tile and sample.
        assert batch.prompt_embeds.shape[0] == batch.time_ids.shape[0] == batch.condition_embeds.shape[0]
        assert batch.prompt_embeds.shape[0] == len(batch.indices)


def test_prompt_embeddings_from_a_callback_condition_the_next_steps(tiny_pipe, wide_lq) -> None:
    # Run A denoises with prompt "b". Run B starts with prompt "a" and, after its first step, is handed A's latents and
    # A's embeddings: from then on it must compute exactly what A computes, which it can only do if the tile batches
    # take the new embeddings.
    after_first_step: dict = {}

    def keep(pipe, step, timestep, tensors):
        if step == 0:
            after_first_step.update(tensors)
        return {}

    inputs = ["latents", "prompt_embeds", "add_text_embeds"]
    with_b = _call(
        tiny_pipe,
        wide_lq,
        prompt="b",
        num_inference_steps=3,
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=inputs,
    )
    given = dict(after_first_step)
    switched = _call(
        tiny_pipe,
        wide_lq,
        prompt="a",
        num_inference_steps=3,
        callback_on_step_end=lambda pipe, step, timestep, tensors: dict(given) if step == 0 else {},
        callback_on_step_end_tensor_inputs=inputs,
    )
    kept_a = _call(
        tiny_pipe,
        wide_lq,
        prompt="a",
        num_inference_steps=3,
        callback_on_step_end=lambda pipe, step, timestep, tensors: {"latents": given["latents"]} if step == 0 else {},
        callback_on_step_end_tensor_inputs=inputs,
    )
    assert torch.equal(switched, with_b)
    # The prompt matters to this tiny UNet, so the check above could fail.
    assert not torch.equal(kept_a, with_b)
