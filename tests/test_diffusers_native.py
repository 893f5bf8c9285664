"""Behaviours diffusers expects of every pipeline: batch forms, any VAE, optional parts, the example docstring."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AsymmetricAutoencoderKL, AutoencoderTiny, ConsistencyDecoderVAE

from tiny_models import tiny_components
from faithdiff_pipeline import FaithDiffSDXLPipeline

FAST = dict(prompt="a photo", num_inference_steps=2, tile_size=64, output_type="pt")
# Batched UNet calls sum in another order than single ones: about 1e-5 apart in float32 (measured); the parity
# fixtures' image tolerance.
BATCH_ATOL = 1e-4


def _arrays(count=2, size=(20, 24)) -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8) for i in range(count)]


def _run(pipe, image, seeds, **overrides) -> torch.Tensor:
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(image, generator=generator if len(seeds) > 1 else generator[0], **{**FAST, **overrides}).images


@pytest.fixture(scope="module")
def pipe() -> FaithDiffSDXLPipeline:
    pipe = FaithDiffSDXLPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_batch_form_equals_single_runs(pipe) -> None:
    arrays = _arrays()
    singles = torch.cat([_run(pipe, a, [i]) for i, a in enumerate(arrays)])
    uint8_forms = {
        "list of PIL images": [PIL.Image.fromarray(a) for a in arrays],
        "list of 3-D arrays": arrays,
        "list of 4-D arrays": [a[None] for a in arrays],
        "4-D array": np.stack(arrays),
    }
    for name, form in uint8_forms.items():
        torch.testing.assert_close(_run(pipe, form, [0, 1]), singles, atol=BATCH_ATOL, rtol=0, msg=name)
    tensors = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    float_singles = torch.cat([_run(pipe, t, [i]) for i, t in enumerate(tensors)])
    float_forms = {
        "list of 3-D tensors": tensors,
        "list of 4-D tensors": [t[None] for t in tensors],
        "4-D tensor": torch.stack(tensors),
        "list of 3-D float arrays": [t.permute(1, 2, 0).numpy() for t in tensors],
    }
    for name, form in float_forms.items():
        torch.testing.assert_close(_run(pipe, form, [0, 1]), float_singles, atol=BATCH_ATOL, rtol=0, msg=name)


def test_num_images_per_prompt_with_a_list_of_4d_tensors(pipe) -> None:
    tensors = [torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255 for a in _arrays()]
    out = pipe(tensors, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), **FAST).images
    assert out.shape == (4, 3, 40, 48)
    assert not torch.equal(out[0], out[1])  # two restorations of one image, from different noise


def test_other_forms_are_clear_errors(pipe) -> None:
    with pytest.raises(ValueError, match=r"`image\[0\]` tensor must be \[3, H, W\]"):
        pipe([torch.zeros(1, 1, 3, 20, 24)], **FAST)
    with pytest.raises(TypeError, match=r"`image\[1\]` must be a PIL image, a numpy array, a torch tensor or a path, got float"):
        pipe([_arrays(1)[0], 3.5], **FAST)


def _vae(kind: str):
    torch.manual_seed(0)
    if kind == "asymmetric":
        return AsymmetricAutoencoderKL(
            down_block_out_channels=(32, 32, 64, 64),
            up_block_out_channels=(32, 32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_down_block=1,
            layers_per_up_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,
        )
    if kind == "consistency":
        return ConsistencyDecoderVAE(
            encoder_block_out_channels=(32, 32, 64, 64),
            encoder_down_block_types=("DownEncoderBlock2D",) * 4,
            encoder_layers_per_block=1,
            encoder_norm_num_groups=32,
            latent_channels=4,
            decoder_block_out_channels=(32, 64),
            decoder_down_block_types=("ResnetDownsampleBlock2D",) * 2,
            decoder_up_block_types=("ResnetUpsampleBlock2D",) * 2,
            decoder_layers_per_block=1,
            decoder_norm_num_groups=32,
            decoder_num_train_timesteps=1024,
        )
    return AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    )


@pytest.mark.parametrize("kind", ["asymmetric", "consistency", "tiny"])
@pytest.mark.parametrize("start_point", ["lr", "noise"])
def test_any_diffusers_vae_with_both_start_points(kind, start_point) -> None:
    pipe = FaithDiffSDXLPipeline(**{**tiny_components(), "vae": _vae(kind).eval()})
    pipe.set_progress_bar_config(disable=True)
    image = _arrays(1)[0]
    first = _run(pipe, image, [3], start_point=start_point)
    assert first.shape == (1, 3, 40, 48) and torch.isfinite(first).all()
    # Seeded by the generator: the same seed gives the same restoration, another seed another one.
    torch.testing.assert_close(_run(pipe, image, [3], start_point=start_point), first, atol=1e-6, rtol=0)
    assert not torch.allclose(_run(pipe, image, [4], start_point=start_point), first, atol=1e-4)


def test_optional_components_and_missing_required_ones(tmp_path) -> None:
    assert set(FaithDiffSDXLPipeline._optional_components) == {"lq_encoder", "captioner", "captioner_processor"}
    components = {**tiny_components(), "lq_encoder": None}
    FaithDiffSDXLPipeline(**components).save_pretrained(tmp_path / "no-lq-encoder")
    loaded = FaithDiffSDXLPipeline.from_pretrained(tmp_path / "no-lq-encoder")
    assert loaded.lq_encoder is None and loaded.captioner is None
    loaded.set_progress_bar_config(disable=True)
    assert _run(loaded, _arrays(1)[0], [0]).shape == (1, 3, 40, 48)  # LQ features from the VAE encoder
    # The others may be None too, as in diffusers' pipelines; a restoration refuses to run without them, naming them.
    for name in ("text_encoder", "tokenizer", "unet", "alignment"):
        lacking = FaithDiffSDXLPipeline(**{**tiny_components(), name: None})
        with pytest.raises(ValueError, match=rf"Restoring images needs \['{name}'\], which this pipeline has as None"):
            _run(lacking, _arrays(1)[0], [0])


def test_the_example_docstring_is_attached_and_runs_as_written(tmp_path, monkeypatch) -> None:
    doc = FaithDiffSDXLPipeline.__call__.__doc__
    assert "Examples:" in doc and ">>> import torch" in doc
    code = textwrap.dedent(re.search(r"```py\n(.*?)```", doc, re.S).group(1))
    source = "\n".join(line.strip()[4:] for line in code.splitlines() if line.strip().startswith((">>> ", "... ")))
    folder = tmp_path / "model"
    FaithDiffSDXLPipeline(**tiny_components()).save_pretrained(folder)
    fake_release = lambda variant=None: folder  # noqa: E731
    monkeypatch.setattr("faithdiff_pipeline.conversion.converted_release", fake_release)
    # The package's lazy export keeps the function once anything has imported it from there.
    monkeypatch.setattr("faithdiff_pipeline.converted_release", fake_release, raising=False)
    monkeypatch.chdir(tmp_path)
    PIL.Image.fromarray(_arrays(1)[0]).save("old_photo.png")
    exec(compile(source, "example", "exec"), {})
    with PIL.Image.open(tmp_path / "restored.png") as restored:
        assert restored.size == (48, 40)
