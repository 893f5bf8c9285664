"""DAAM attention maps of the caption's words: the recorder leaves the restoration untouched, maps words to the right
tokens, tiles and samples, and faithdiff-explain writes the overlays."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from tiny_models import fast_call, tiny_captioner, tiny_components, tiny_tokenizer

from faithdiff_pipeline import FaithDiffSDXLPipeline
from faithdiff_pipeline.attention_maps import (
    AttentionMapRecorder,
    cross_attention_layers,
    cross_attention_probabilities,
    heat_colours,
    overlay_heat_map,
    word_positions,
)
from faithdiff_pipeline.explain import main
from faithdiff_pipeline.tiling import LatentTiling

PROMPT = "A red house, by the old TREE."
FAST = ["--steps", "2", "--tile-size", "64", "--device", "cpu", "--dtype", "float32"]


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _photo(size=(64, 48)) -> PIL.Image.Image:
    """Upscaled x2 it gives a 12 x 16 latent: six 64-px tiles."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    return PIL.Image.fromarray(np.stack([x * 4, y * 5, (x * y) % 256], axis=-1).astype(np.uint8))


def _restore(pipe, image, recorder=None, **overrides) -> torch.Tensor:
    kwargs = fast_call(prompt=PROMPT, generator=_seeded(), **overrides)
    return pipe(image, **kwargs, attention_maps=recorder).images


@pytest.fixture(scope="module")
def pipe() -> FaithDiffSDXLPipeline:
    pipe = FaithDiffSDXLPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiled_run(pipe) -> tuple[torch.Tensor, torch.Tensor, AttentionMapRecorder]:
    """The same six-tile restoration without and with a recorder of two words (tiles batched two by two)."""
    recorder = AttentionMapRecorder(["house", "tree"])
    plain = _restore(pipe, _photo(), tile_batch_size=2)
    recorded = _restore(pipe, _photo(), recorder, tile_batch_size=2)
    return plain, recorded, recorder


def test_recording_leaves_the_image_bit_identical(tiled_run) -> None:
    plain, recorded, _ = tiled_run
    assert torch.equal(plain, recorded)


def test_maps_are_normalised_finite_and_at_the_result_size(tiled_run) -> None:
    _, recorded, recorder = tiled_run
    assert set(recorder.maps) == {"house", "tree"}
    for heat in recorder.maps.values():
        assert heat.shape == (1, *recorded.shape[-2:])
        assert np.isfinite(heat).all() and heat.min() == 0.0 and heat.max() == pytest.approx(1.0)


def test_maps_of_two_words_differ(tiled_run) -> None:
    _, _, recorder = tiled_run
    assert np.abs(recorder.maps["house"] - recorder.maps["tree"]).max() > 0.1


def test_every_tile_is_recorded_once_per_layer_and_step(tiled_run, pipe) -> None:
    _, _, recorder = tiled_run
    # The tiling of a 12 x 16 latent in 8-latent tiles at the default stride, as the pipeline lays it out.
    tiling = LatentTiling.for_latent(12, 16, 8, 4)
    assert len(tiling) == 6
    assert (recorder.coverage > 0).all()
    expected = tiling.weight_sum * len(recorder.recorded_layers) * 2  # two steps
    torch.testing.assert_close(recorder.coverage, expected, rtol=1e-5, atol=0)
    assert torch.isfinite(recorder.latent_maps).all() and recorder.latent_maps.shape == (1, 2, 12, 16)


def test_maps_do_not_depend_on_how_tiles_are_batched(tiled_run, pipe) -> None:
    _, _, batched = tiled_run
    one_by_one = AttentionMapRecorder(["house", "tree"])
    _restore(pipe, _photo(), one_by_one, tile_batch_size=1)
    torch.testing.assert_close(one_by_one.latent_maps, batched.latent_maps, rtol=1e-4, atol=1e-6)


def test_each_image_of_a_batch_gets_its_own_maps(pipe) -> None:
    # Two tiles of two images in one UNet call: rows are CFG half, then tile, then image.
    images = [_photo((40, 24)), _photo((40, 24)).transpose(PIL.Image.ROTATE_180)]
    prompts = ["a red house", "a house by a tree"]
    together = AttentionMapRecorder("house")
    pipe(images, **fast_call(prompt=prompts, generator=[_seeded(1), _seeded(2)]), attention_maps=together)
    assert together.prompts == prompts
    assert together.token_positions[0]["house"] != together.token_positions[1]["house"]
    assert len(LatentTiling.for_latent(6, 10, 8, 4)) == 2
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        alone = AttentionMapRecorder("house")
        pipe(image, **fast_call(prompt=prompt, generator=_seeded(index + 1)), attention_maps=alone)
        np.testing.assert_allclose(together.maps["house"][index], alone.maps["house"][0], atol=1e-3)


def test_only_the_conditional_half_of_the_guided_batch_is_recorded(pipe, lq_image) -> None:
    # At the first step both runs give the UNet the same latents and prompt embeddings; guidance only adds the
    # unconditional copies, which must not count.
    guided, unguided = AttentionMapRecorder("house", steps=[0]), AttentionMapRecorder("house", steps=[0])
    _restore(pipe, lq_image, guided, guidance_scale=5.0)
    _restore(pipe, lq_image, unguided, guidance_scale=1.0)
    torch.testing.assert_close(guided.latent_maps, unguided.latent_maps, rtol=1e-4, atol=1e-6)


def test_recomputed_probabilities_are_the_ones_the_layer_used(pipe) -> None:
    name, layer = next(iter(cross_attention_layers(pipe.unet).items()))
    assert name.endswith("attn2")
    generator = _seeded(3)
    hidden = torch.randn(3, 20, layer.query_dim, generator=generator)
    context = torch.randn(3, 77, layer.cross_attention_dim, generator=generator)
    with torch.no_grad():
        probabilities = cross_attention_probabilities(layer, hidden, context)
        # softmax(QK^T * scale) V through the output projection is the layer's own output.
        value = layer.to_v(context).unflatten(-1, (layer.heads, -1)).transpose(1, 2)
        mixed = (probabilities @ value).transpose(1, 2).flatten(2)
        torch.testing.assert_close(layer.to_out[0](mixed), layer(hidden, encoder_hidden_states=context))
    assert probabilities.shape == (3, layer.heads, 20, 77)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3, layer.heads, 20))


def test_an_absent_word_is_an_error_naming_it_and_the_prompt(pipe, lq_image) -> None:
    with pytest.raises(ValueError, match=r"The word 'dog' is not in the prompt 'A red house, by the old TREE\.'"):
        _restore(pipe, lq_image, AttentionMapRecorder(["house", "dog"]))
    assert all(not layer._forward_pre_hooks for layer in cross_attention_layers(pipe.unet).values())


def test_no_hook_is_left_after_a_failed_run(pipe, lq_image) -> None:
    def fail(pipe, step, timestep, tensors):
        raise RuntimeError("user callback failed")

    with pytest.raises(RuntimeError, match="user callback failed"):
        _restore(pipe, lq_image, AttentionMapRecorder("house"), callback_on_step_end=fail)
    assert all(not layer._forward_pre_hooks for layer in cross_attention_layers(pipe.unet).values())


def test_the_captioners_caption_is_the_prompt_searched(lq_image) -> None:
    model, processor = tiny_captioner()
    pipe = FaithDiffSDXLPipeline(**tiny_components(), captioner=model, captioner_processor=processor)
    pipe.set_progress_bar_config(disable=True)
    caption = pipe.caption(lq_image, _seeded(0))[0]
    word = caption.split()[1].strip(".,")
    recorder = AttentionMapRecorder(word)
    pipe(lq_image, **fast_call(prompt=None, generator=_seeded(0)), attention_maps=recorder)
    assert recorder.prompts == [caption]
    assert recorder.maps[word].shape == (1, 40, 48)


def test_chosen_steps_and_layers_are_recorded_alone(pipe, lq_image) -> None:
    recorder = AttentionMapRecorder("house", layers=["mid_block"], steps=[1])
    _restore(pipe, lq_image, recorder)
    assert recorder.recorded_layers and all(name.startswith("mid_block.") for name in recorder.recorded_layers)
    tiling = LatentTiling.for_latent(5, 6, 8, 4)
    torch.testing.assert_close(recorder.coverage, tiling.weight_sum * len(recorder.recorded_layers))
    everything = AttentionMapRecorder("house")
    _restore(pipe, lq_image, everything)
    assert len(everything.recorded_layers) > len(recorder.recorded_layers)
    assert not torch.allclose(everything.latent_maps, recorder.latent_maps)


def test_layer_selection(pipe) -> None:
    assert AttentionMapRecorder("a").select_layers(pipe.unet).keys() == cross_attention_layers(pipe.unet).keys()
    up = AttentionMapRecorder("a", layers=["up_blocks.*"]).select_layers(pipe.unet)
    assert up and all(name.startswith("up_blocks.0.") for name in up)
    # The tiny UNet's cross-attention all runs at half the latent size.
    assert len(AttentionMapRecorder("a", downsampling=[2]).select_layers(pipe.unet)) == len(up) * 2
    with pytest.raises(ValueError, match=r"`layers` pattern\(s\) \['nowhere'\] match no cross-attention layer"):
        AttentionMapRecorder("a", layers=["nowhere"]).select_layers(pipe.unet)
    with pytest.raises(ValueError, match=r"`downsampling` \[4\] selects no layer.*downsampled by \[2\]"):
        AttentionMapRecorder("a", downsampling=[2, 4]).select_layers(pipe.unet)


def test_steps_beyond_the_run_are_an_error(pipe, lq_image) -> None:
    with pytest.raises(ValueError, match=r"`steps` \[2\] of the attention-map recorder are beyond the 2 denoising"):
        _restore(pipe, lq_image, AttentionMapRecorder("house", steps=[0, 2]))


def test_prompt_embeds_and_wrong_recorders_are_refused(pipe, lq_image) -> None:
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    with pytest.raises(ValueError, match="pass `prompt` instead of `prompt_embeds`"):
        pipe(
            lq_image,
            **fast_call(prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled),
            attention_maps=AttentionMapRecorder("house"),
        )
    with pytest.raises(TypeError, match="`attention_maps` must be an AttentionMapRecorder, got dict"):
        pipe(lq_image, **fast_call(), attention_maps={"words": ["photo"]})


@pytest.mark.parametrize(
    "words, error, pattern",
    [
        ([], ValueError, "must name at least one word"),
        (["cat", "CAT"], ValueError, r"names \['CAT', 'cat'\] more than once"),
        (["..."], ValueError, "empty once surrounding spaces and punctuation are dropped"),
        ([3], TypeError, r"must hold strings, got int \(3\)"),
    ],
)
def test_bad_words(words, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        AttentionMapRecorder(words)


def test_words_are_matched_whole_in_any_case_across_tokens() -> None:
    tokenizer = tiny_tokenizer()  # one token per character: every word is several tokens
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(PROMPT)["input_ids"])
    tree = word_positions(tokenizer, PROMPT, "Tree")
    assert "".join(tokens[i] for i in tree) == "tree</w>"
    assert word_positions(tokenizer, PROMPT, "ree") == []  # inside "tree", not a word
    assert word_positions(tokenizer, PROMPT, "old tree") == list(range(tree[0] - 3, tree[-1] + 1))
    assert word_positions(tokenizer, "a cat and cats, a cat.", "cat") == [2, 3, 4, 14, 15, 16]
    assert AttentionMapRecorder([" house, "]).words == ["house"]
    long_prompt = "a " * 80 + "dog"
    with pytest.raises(ValueError, match="lies beyond the 77 tokens the text encoder reads"):
        word_positions(tokenizer, long_prompt, "dog")


def test_heat_colours_and_overlay() -> None:
    colours = heat_colours(np.array([0.0, 0.5, 1.0, 2.0]))
    np.testing.assert_allclose(colours[0], [0, 0, 0.5])  # dark blue
    np.testing.assert_allclose(colours[1], [0.5, 1, 0.5])  # green, half-way between cyan and yellow
    np.testing.assert_allclose(colours[2], [0.5, 0, 0])  # dark red
    np.testing.assert_allclose(colours[3], colours[2])  # clipped
    image = np.random.default_rng(0).random((4, 5, 3)).astype(np.float32)
    heat = np.linspace(0, 1, 20).reshape(4, 5)
    np.testing.assert_allclose(overlay_heat_map(image, heat, opacity=0.0), image)
    np.testing.assert_allclose(overlay_heat_map(image, heat), 0.5 * image + 0.5 * heat_colours(heat), atol=1e-6)
    with pytest.raises(ValueError, match=r"`heat` must be \[H, W\] = \(4, 5\)"):
        overlay_heat_map(image, heat[:3])


# ---------------------------------------------------------------------------------------------- faithdiff-explain


def test_explain_writes_the_restored_image_overlays_and_raw_maps(tiny_model_dir, tmp_path, capsys) -> None:
    _photo((24, 20)).save(tmp_path / "house.png")
    out = tmp_path / "maps"
    args = [str(tmp_path / "house.png"), "--words", "house, Tree.", "--prompt", PROMPT, "-o", str(out)]
    assert main([*args, "--model", str(tiny_model_dir), *FAST]) == 0
    assert "1 explained, 0 skipped (already explained), 0 failed" in capsys.readouterr().out
    names = ["house.png", "house_house.png", "house_house_map.png", "house_tree.png", "house_tree_map.png"]
    assert sorted(path.name for path in out.iterdir()) == names
    with PIL.Image.open(out / "house.png") as restored:
        assert restored.size == (48, 40) and restored.text["caption"] == PROMPT
    for word in ("house", "tree"):
        with PIL.Image.open(out / f"house_{word}.png") as overlay:
            assert overlay.mode == "RGB" and overlay.size == (48, 40)
            assert overlay.text["prompt"] == PROMPT
        with PIL.Image.open(out / f"house_{word}_map.png") as raw:
            assert raw.mode == "I;16" and raw.size == (48, 40)
            values = np.asarray(raw)
        assert values.min() == 0 and values.max() == 65535
    with PIL.Image.open(out / "house_house_map.png") as a, PIL.Image.open(out / "house_tree_map.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_explain_reports_an_absent_word_per_image(tiny_model_dir, tmp_path, capsys, monkeypatch) -> None:
    _photo((24, 20)).save(tmp_path / "a.png")
    args = [str(tmp_path / "a.png"), "--words", "dog", "--prompt", PROMPT, "-o", str(tmp_path / "out")]
    assert main([*args, "--model", str(tiny_model_dir), *FAST]) == 1
    assert "failed: a.png: The word 'dog' is not in the prompt" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    # Found from the prompt's text before any model loads.
    from faithdiff_pipeline import loading

    def never(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(loading, "load_pipeline", never)
    assert main([*args, "--model", str(tiny_model_dir), *FAST]) == 1
    assert "failed: a.png: The word 'dog' is not in the prompt" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--words", ""], "--words takes a comma-separated list without empty entries, got ''"),
        (["--words", "cat,,dog"], "without empty entries, got 'cat,,dog'"),
        (["--words", "cat,CAT"], "--words names ['CAT', 'cat'] more than once"),
        (["--words", "cat", "--record-steps", "a"], "--record-steps takes step numbers and ranges"),
        (["--words", "cat", "--record-steps", "3-1"], "--record-steps takes step numbers and ranges"),
        (["--words", "cat", "--record-steps", "0-20"], "--record-steps [20] are beyond the 20 denoising steps"),
        (["--words", "cat", "--downsampling", "0"], "--downsampling takes positive whole numbers"),
        (["--words", "cat", "--layers", "up_blocks.*,"], "--layers takes a comma-separated list"),
        (["--words", "cat", "--compile"], "drop --compile"),
        (["--words", "cat", "--caption", "none"], "--caption none leaves no prompt to find --words in"),
        (["--words", "cat", "--upscale", "0"], "--upscale must be a finite number > 0"),
    ],
)
def test_mistakes_are_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, args, message) -> None:
    from faithdiff_pipeline import loading

    def never(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(loading, "load_pipeline", never)
    _photo((24, 20)).save(tmp_path / "a.png")
    assert main([str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("faithdiff-explain: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_layer_pattern_the_model_lacks_is_one_line(tiny_model_dir, tmp_path, capsys) -> None:
    _photo((24, 20)).save(tmp_path / "a.png")
    args = [str(tmp_path / "a.png"), "--words", "house", "--prompt", PROMPT, "--layers", "nowhere"]
    assert main([*args, "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--layers pattern(s) ['nowhere'] match no cross-attention layer" in err
    assert not (tmp_path / "out").exists()
