"""diffusers-native use, round 2: shared components in threads, encode-only pipelines, diffusers' own callbacks and
dynamic CFG, diffusers' argument order, and the LoRA lifecycle."""

from __future__ import annotations

import ast
import copy
import inspect
import threading
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
from diffusers.callbacks import SDXLCFGCutoffCallback
from tiny_models import fast_call, tiny_components

import faithdiff_pipeline.attention_maps as attention_maps_module
from faithdiff_pipeline import FaithDiffSDXLPipeline
from faithdiff_pipeline.attention_maps import AttentionMapRecorder

THREADS = 16


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _photo(seed: int, size: tuple[int, int] = (20, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe() -> FaithDiffSDXLPipeline:
    pipe = FaithDiffSDXLPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _request_copy(pipe, pipeline_class=FaithDiffSDXLPipeline):
    """One request's pipeline, as diffusers' server examples make it: ``from_pipe`` shares the weights; the scheduler
    (per-run state) and the tokenizers (transformers' tokenizers change their padding state on every call, so a shared
    one is not thread-safe, with a stock SDXL pipeline too) are the request's own."""
    copied = pipeline_class.from_pipe(
        pipe,
        scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config),
        tokenizer=copy.deepcopy(pipe.tokenizer),
        tokenizer_2=copy.deepcopy(pipe.tokenizer_2),
    )
    copied.set_progress_bar_config(disable=True)
    return copied


def _concurrently(jobs: list) -> list:
    """Runs the jobs in threads released together; their results (or exceptions), in order."""
    results: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = jobs[index]()
        except Exception as error:  # noqa: BLE001 (a failed job is a result the test reports)
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# ------------------------------------------------------------------------------------------- 1. shared components


def test_concurrent_from_pipe_copies_each_get_their_own_result(pipe) -> None:
    def restore(copied, index):
        return copied(_photo(index), **fast_call(generator=_seeded(index))).images

    sequential = [restore(pipe, index) for index in range(THREADS)]
    copies = [_request_copy(pipe) for _ in range(THREADS)]
    concurrent = _concurrently([lambda c=c, i=i: restore(c, i) for i, c in enumerate(copies)])
    wrong = [i for i in range(THREADS) if not isinstance(concurrent[i], torch.Tensor)]
    wrong += [i for i in range(THREADS) if i not in wrong and not torch.equal(concurrent[i], sequential[i])]
    assert wrong == [], f"{len(wrong)} of {THREADS} concurrent results differ from the sequential ones"
    # The inputs differ, so equal results above mean each thread got its own condition.
    assert len({round(float(result.sum()), 3) for result in sequential}) == THREADS


def test_a_stock_sdxl_pipeline_sharing_the_unet_is_unaffected(pipe) -> None:
    def img2img(stock):
        image = torch.from_numpy(_photo(7, (64, 64))).permute(2, 0, 1)[None].float() / 255
        return stock(
            "a photo", image=image, num_inference_steps=4, strength=1.0, output_type="pt", generator=_seeded(7)
        ).images

    def restore(copied, index):
        # A 64 x 64 result: the FaithDiff condition has the shape of the stock pipeline's conv_in output.
        return copied(_photo(index, (32, 32)), **fast_call(generator=_seeded(index), num_inference_steps=4)).images

    solo = img2img(_request_copy(pipe, StableDiffusionXLImg2ImgPipeline))
    jobs = [lambda c=_request_copy(pipe, StableDiffusionXLImg2ImgPipeline): img2img(c) for _ in range(THREADS // 2)]
    jobs += [lambda c=_request_copy(pipe), i=i: restore(c, i) for i in range(THREADS // 2)]
    results = _concurrently(jobs)
    stock_results = results[: THREADS // 2]
    assert [result for result in results if not isinstance(result, torch.Tensor)] == []
    assert all(torch.equal(result, solo) for result in stock_results)


def test_an_attention_recording_ignores_other_threads_calls_of_the_shared_unet(pipe) -> None:
    def explain(copied, recorder):
        return copied(_photo(0), **fast_call(generator=_seeded(0)), attention_maps=recorder).images

    solo = AttentionMapRecorder("photo")
    explain(_request_copy(pipe), solo)
    shared = AttentionMapRecorder("photo")
    jobs = [lambda c=_request_copy(pipe): explain(c, shared)]
    jobs += [lambda c=_request_copy(pipe), i=i: c(_photo(i, (32, 40)), **fast_call(generator=_seeded(i))).images
             for i in range(1, THREADS // 2)]
    results = _concurrently(jobs)
    assert [result for result in results if not isinstance(result, torch.Tensor)] == []
    torch.testing.assert_close(shared.latent_maps, solo.latent_maps, rtol=0, atol=0)
    torch.testing.assert_close(shared.coverage, solo.coverage, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- 2. encode in isolation


@pytest.fixture(scope="module")
def model_folder(pipe, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("round2") / "model"
    pipe.save_pretrained(folder)
    return folder


def test_text_encoders_alone_encode_and_a_pipeline_without_them_restores(model_folder) -> None:
    def loaded(**components):
        pipeline = FaithDiffSDXLPipeline.from_pretrained(model_folder, **components)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    full = loaded()
    encoder = loaded(unet=None, vae=None, alignment=None, lq_encoder=None)
    denoiser = loaded(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    encode = dict(prompt="a photo", negative_prompt="", device="cpu", do_classifier_free_guidance=True)
    embeddings = encoder.encode_prompt(**encode)
    for encoded, expected in zip(embeddings, full.encode_prompt(**encode)):
        assert torch.equal(encoded, expected)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    given = dict(zip(names, embeddings))
    restored = denoiser(_photo(0), **fast_call(prompt=None, generator=_seeded(0)), **given).images
    assert torch.equal(restored, full(_photo(0), **fast_call(generator=_seeded(0))).images)
    # Each refuses, in one error naming what it lacks, the restoration it cannot run.
    lacks = r"Restoring images needs \['unet', 'alignment', 'vae'\], which this pipeline has as None"
    with pytest.raises(ValueError, match=lacks):
        encoder(_photo(0), **fast_call())
    lacks = r"needs \['text_encoder', 'text_encoder_2', 'tokenizer', 'tokenizer_2'\].*pass `prompt_embeds`"
    with pytest.raises(ValueError, match=lacks):
        denoiser(_photo(0), **fast_call())
    # As diffusers builds one to compute embeddings: the text encoders and tokenizers, everything else None.
    text_only = {name: getattr(full, name) for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    built = FaithDiffSDXLPipeline(vae=None, unet=None, alignment=None, scheduler=None, **text_only)
    for encoded, expected in zip(built.encode_prompt(**encode), embeddings):
        assert torch.equal(encoded, expected)


# ---------------------------------------------------------------------------------- 3. callbacks and dynamic CFG

SIX_TILES = dict(num_inference_steps=4, tile_batch_size=3, output_type="latent")  # a 12 x 16 latent, 2 batches of 3


def _unet_batch_sizes(pipe) -> tuple[list[int], object]:
    sizes: list[int] = []
    return sizes, pipe.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))


def _guided_then_unguided(pipe, image, cutoff: int, **overrides) -> torch.Tensor:
    """An independent computation of a run whose guidance stops after step ``cutoff``: a guided run's latents after
    that step, continued by an unguided run."""
    after_cutoff: dict = {}

    def keep(pipe, step, timestep, tensors):
        if step == cutoff:
            after_cutoff["latents"] = tensors["latents"]
        return {}

    pipe(image, **fast_call(generator=_seeded(0), **SIX_TILES, **overrides), callback_on_step_end=keep)
    return pipe(
        image,
        **fast_call(generator=_seeded(0), guidance_scale=1.0, **SIX_TILES, **overrides),
        callback_on_step_end=lambda pipe, step, timestep, tensors: dict(after_cutoff) if step == cutoff else {},
    ).images


def test_diffusers_cfg_cutoff_callback_halves_the_unet_batch_from_its_step(pipe) -> None:
    image = _photo(0, (48, 64))
    sizes, handle = _unet_batch_sizes(pipe)
    try:
        cutoff = SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
        cut = pipe(image, **fast_call(generator=_seeded(0), **SIX_TILES), callback_on_step_end=cutoff).images
    finally:
        handle.remove()
    # Steps 0 and 1 guided (both copies of 3 tiles), steps 2 and 3 not.
    assert sizes == [6, 6, 6, 6, 3, 3, 3, 3]
    assert torch.equal(cut, _guided_then_unguided(pipe, image, cutoff=1))
    # The guidance made a difference, so the equality above could fail.
    assert not torch.equal(cut, pipe(image, **fast_call(generator=_seeded(0), **SIX_TILES)).images)


@pytest.mark.parametrize("recipe", ["guidance scale alone", "prompt embeddings halved"])
def test_dynamic_cfg_from_a_callback(pipe, recipe) -> None:
    """diffusers' dynamic-CFG recipe sets ``pipe._guidance_scale = 0`` at a step (and halves ``prompt_embeds``)."""

    def dynamic_cfg(pipe, step, timestep, tensors):
        if step == int(pipe.num_timesteps * 0.4):
            pipe._guidance_scale = 0.0
            if recipe == "prompt embeddings halved":
                tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
        return tensors

    image = _photo(0, (48, 64))
    cut = pipe(
        image,
        **fast_call(generator=_seeded(0), **SIX_TILES),
        callback_on_step_end=dynamic_cfg,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    ).images
    assert torch.equal(cut, _guided_then_unguided(pipe, image, cutoff=1))


def test_cfg_cutoff_keeps_attention_maps_right(pipe) -> None:
    image = _photo(0, (48, 64))
    cutoff = SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)
    after_cutoff = AttentionMapRecorder("photo", steps=[1, 2, 3])
    guided = fast_call(generator=_seeded(0), **SIX_TILES)
    pipe(image, **guided, callback_on_step_end=cutoff, attention_maps=after_cutoff)
    kept: dict = {}

    def keep(pipe, step, timestep, tensors):
        kept.setdefault("latents", tensors["latents"])
        return {}

    pipe(image, **fast_call(generator=_seeded(0), **SIX_TILES), callback_on_step_end=keep)
    unguided = AttentionMapRecorder("photo", steps=[1, 2, 3])
    pipe(
        image,
        **fast_call(generator=_seeded(0), guidance_scale=1.0, **SIX_TILES),
        callback_on_step_end=lambda pipe, step, timestep, tensors: dict(kept) if step == 0 else {},
        attention_maps=unguided,
    )
    torch.testing.assert_close(after_cutoff.latent_maps, unguided.latent_maps, rtol=0, atol=0)
    torch.testing.assert_close(after_cutoff.coverage, unguided.coverage, rtol=0, atol=0)


def test_add_time_ids_reach_the_callback_and_condition_the_next_steps(pipe) -> None:
    image = _photo(0, (48, 64))
    seen: dict = {}

    def shift_original_size(pipe, step, timestep, tensors):
        seen.setdefault("add_time_ids", tensors["add_time_ids"])
        return {"add_time_ids": tensors["add_time_ids"] + torch.tensor([64.0, 64.0, 0, 0, 0, 0])}

    shifted = pipe(
        image,
        **fast_call(generator=_seeded(0), **SIX_TILES),
        callback_on_step_end=shift_original_size,
        callback_on_step_end_tensor_inputs=["add_time_ids"],
    ).images
    # Each sample's micro-conditioning, both CFG copies: the padded input's size, crop (0, 0), the tile size.
    assert seen["add_time_ids"].tolist() == [[96.0, 128.0, 0.0, 0.0, 64.0, 64.0]] * 2
    assert not torch.equal(shifted, pipe(image, **fast_call(generator=_seeded(0), **SIX_TILES)).images)


def test_a_cutoff_callback_that_drops_samples_is_a_clear_error(pipe) -> None:
    # SDXLCFGCutoffCallback keeps one row ([-1:]): like SDXL itself, it serves one image at a time.
    refused = r"`prompt_embeds` has 1 rows after the step callback of step 0; with guidance off the next steps need 2"
    with pytest.raises(ValueError, match=refused):
        pipe(
            [_photo(0), _photo(1)],
            **fast_call(generator=[_seeded(0), _seeded(1)]),
            callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0),
        )


def test_attention_maps_know_nothing_of_the_pipeline() -> None:
    tree = ast.parse(Path(attention_maps_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("pipeline" in (module or "") for module in imported)
    source = Path(attention_maps_module.__file__).read_text()
    assert "do_classifier_free_guidance" not in source and "vae_scale_factor" not in source


# ------------------------------------------------------------------------------------------- 4. argument order


def test_diffusers_argument_order_and_the_image_first_order(pipe, tmp_path) -> None:
    photo = PIL.Image.fromarray(_photo(0))
    photo.save(tmp_path / "photo.png")
    kwargs = {name: value for name, value in fast_call().items() if name != "prompt"}

    def restore(*args, **call_kwargs):
        return pipe(*args, **call_kwargs, **kwargs, generator=_seeded(0)).images

    expected = restore(prompt="a photo", image=photo)
    assert list(inspect.signature(FaithDiffSDXLPipeline.__call__).parameters)[1:3] == ["prompt", "image"]
    styles = {
        'pipe("a photo", photo)': restore("a photo", photo),
        'pipe("a photo", image=photo)': restore("a photo", image=photo),
        'pipe(photo, prompt="a photo")': restore(photo, prompt="a photo"),
        'pipe(photo, "a photo")': restore(photo, "a photo"),
        'pipe("photo.png", prompt="a photo")': restore(str(tmp_path / "photo.png"), prompt="a photo"),
        'pipe("a photo", "photo.png")': restore("a photo", str(tmp_path / "photo.png")),
    }
    for style, result in styles.items():
        assert torch.equal(result, expected), style
    assert torch.equal(restore(photo), restore(image=photo))
    assert not torch.equal(restore(photo), expected)  # the prompt matters, so the checks above could fail
    with pytest.raises(TypeError, match=r"`image` given twice"):
        restore(photo, image=photo)
    with pytest.raises(ValueError, match=r"A string alone is the prompt; pass a file path as `image=`"):
        restore(str(tmp_path / "photo.png"))


# ------------------------------------------------------------------------------------------------------- 5. LoRA


def _save_lora(folder: Path, target_modules: list[str], seed: int) -> Path:
    """A random LoRA of the tiny UNet, made with peft and saved as diffusers saves one."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_components()["unet"]
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=target_modules))
    FaithDiffSDXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


def test_peft_is_in_the_lora_and_test_extras() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and up
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for extra in ("lora", "test"):
        assert any(requirement.startswith("peft") for requirement in extras[extra]), extra


@pytest.fixture
def lora_pipe() -> FaithDiffSDXLPipeline:
    pipe = FaithDiffSDXLPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _restore_with(pipe) -> torch.Tensor:
    return pipe(_photo(0), **fast_call(generator=_seeded(0))).images


def test_lora_lifecycle(lora_pipe, tmp_path) -> None:
    attention = ["to_q", "to_k", "to_v", "to_out.0"]
    base = _restore_with(lora_pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers: the LoRA has no text-encoder layers
        lora_pipe.load_lora_weights(_save_lora(tmp_path / "style", attention, seed=1), adapter_name="style")
        lora_pipe.load_lora_weights(_save_lora(tmp_path / "detail", attention, seed=2), adapter_name="detail")
    lora_pipe.set_adapters(["style"], adapter_weights=[1.0])
    style = _restore_with(lora_pipe)
    lora_pipe.set_adapters(["style"], adapter_weights=[0.5])
    half = _restore_with(lora_pipe)
    lora_pipe.set_adapters(["style", "detail"], adapter_weights=[1.0, 0.7])
    both = _restore_with(lora_pipe)
    assert len({round(float((result - base).abs().max()), 4) for result in (style, half, both)}) == 3
    assert min(float((result - base).abs().max()) for result in (style, half, both)) > 0.01
    lora_pipe.fuse_lora()
    torch.testing.assert_close(_restore_with(lora_pipe), both, rtol=0, atol=1e-4)
    lora_pipe.unfuse_lora()
    torch.testing.assert_close(_restore_with(lora_pipe), both, rtol=0, atol=1e-4)
    lora_pipe.unload_lora_weights()
    # Unfusing subtracts what fusing added, so the weights come back up to float rounding (peft, as for SDXL).
    torch.testing.assert_close(_restore_with(lora_pipe), base, rtol=0, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_pipe.load_lora_weights(tmp_path / "style", adapter_name="style")
    torch.testing.assert_close(_restore_with(lora_pipe), style, rtol=0, atol=1e-4)
    lora_pipe.unload_lora_weights()


def test_lora_unload_restores_the_exact_original(lora_pipe, tmp_path) -> None:
    base = _restore_with(lora_pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_pipe.load_lora_weights(_save_lora(tmp_path / "style", ["to_q", "to_v", "conv_in"], seed=1))
    assert not torch.equal(_restore_with(lora_pipe), base)
    lora_pipe.unload_lora_weights()
    assert torch.equal(_restore_with(lora_pipe), base)


def test_a_lora_on_conv_in_composes_with_the_alignment(lora_pipe, tmp_path) -> None:
    base = _restore_with(lora_pipe)  # the alignment hook is in place before the LoRA wraps conv_in
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_pipe.load_lora_weights(_save_lora(tmp_path / "conv_in", ["conv_in"], seed=3))
    seen: dict = {}

    def first_input(name):
        def keep(module, args):
            seen.setdefault(name, args[0])

        return keep

    handles = [
        lora_pipe.unet.register_forward_pre_hook(first_input("sample")),
        lora_pipe.alignment.register_forward_pre_hook(first_input("aligned")),
    ]
    try:
        with_lora = _restore_with(lora_pipe)
    finally:
        for handle in handles:
            handle.remove()
    conv_in = lora_pipe.unet.conv_in
    with torch.no_grad():
        # The alignment fuses the LQ condition with the output of conv_in with its LoRA, as the next layer sees it.
        assert torch.equal(seen["aligned"], conv_in(seen["sample"]))
        assert not torch.allclose(seen["aligned"], conv_in.base_layer(seen["sample"]), atol=1e-3)
    assert not torch.equal(with_lora, base)
    lora_pipe.unload_lora_weights()
    assert torch.equal(_restore_with(lora_pipe), base)
    # Fused into conv_in's weights the LoRA gives what it gives beside them: the alignment sees the same input.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_pipe.load_lora_weights(tmp_path / "conv_in")
    lora_pipe.fuse_lora()
    torch.testing.assert_close(_restore_with(lora_pipe), with_lora, rtol=0, atol=1e-4)
    lora_pipe.unfuse_lora()
    lora_pipe.unload_lora_weights()
    torch.testing.assert_close(_restore_with(lora_pipe), base, rtol=0, atol=1e-4)
