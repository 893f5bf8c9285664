"""The one loading path: device, dtype and variant, the captioner's precision, missing extras, captions first."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from tiny_models import tiny_captioner, tiny_components
from faithdiff_pipeline import FaithDiffSDXLPipeline, loading
from faithdiff_pipeline.captioning import Captioner, read_caption
from faithdiff_pipeline.cli import main

GIB = 1024**3
CUDA = torch.device("cuda")
FAST = ["--steps", "2", "--tile-size", "64", "--device", "cpu", "--dtype", "float32"]


@pytest.mark.parametrize(
    ("requested", "free_gib", "bitsandbytes", "model", "precision"),
    [
        (None, 40, True, "llava-hf/llava-1.5-13b-hf", "half"),
        ("auto", 20, True, "llava-hf/llava-1.5-13b-hf", "8bit"),
        ("auto", 10, True, "llava-hf/llava-1.5-13b-hf", "4bit"),
        ("auto", 20, False, None, None),  # 8-bit would fit, but bitsandbytes is missing
        ("auto", 6, True, None, None),
        ("llava-hf/llava-1.5-7b-hf", 10, True, "llava-hf/llava-1.5-7b-hf", "8bit"),
        ("llava-hf/llava-1.5-7b-hf", 16, False, "llava-hf/llava-1.5-7b-hf", "half"),
        ("someone/other-llava", 1, False, "someone/other-llava", "half"),  # size unknown before loading
        ("none", 80, True, None, None),
    ],
)
def test_captioner_precision_follows_free_cuda_memory(requested, free_gib, bitsandbytes, model, precision) -> None:
    plan = loading.plan_captioner(requested, CUDA, free_memory=free_gib * GIB, bitsandbytes=bitsandbytes)
    assert (plan.model, plan.precision) == (model, precision)
    if model is None and requested != "none":
        assert "restoring without captions" in plan.note
        assert ("[caption]" in plan.note) == (not bitsandbytes)
    if precision in ("8bit", "4bit"):
        assert plan.quantization == precision and f"loads in {precision}" in plan.note


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_without_cuda_the_default_is_no_captioner_and_a_way_to_turn_it_on(device) -> None:
    plan = loading.plan_captioner("auto", torch.device(device))
    assert plan.model is None and "no CUDA GPU" in plan.note and "--captioner llava-hf/llava-1.5-13b-hf" in plan.note
    explicit = loading.plan_captioner("some/llava", torch.device(device))
    assert explicit.model == "some/llava" and explicit.precision == ("full" if device == "cpu" else "half")
    with pytest.raises(ValueError, match="`captioner_quantization` '4bit' needs a CUDA GPU"):
        loading.plan_captioner("some/llava", torch.device(device), precision="4bit")


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"), [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
def test_device_falls_back_cuda_mps_cpu(monkeypatch, cuda, mps, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert loading.resolve_device("auto").type == expected == loading.resolve_device(None).type
    assert loading.resolve_dtype("auto", loading.resolve_device()) == (
        torch.float32 if expected == "cpu" else torch.float16
    )


def test_named_devices_and_dtypes(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="`device` 'cuda' asks for a CUDA GPU, but torch sees none"):
        loading.resolve_device("cuda")
    with pytest.raises(ValueError, match="`device` 'gpu0' is not a torch device"):
        loading.resolve_device("gpu0")
    assert loading.weights_variant(torch.bfloat16) == loading.weights_variant(torch.float16) == "fp16"
    assert loading.weights_variant(torch.float32) is None
    with pytest.raises(ValueError, match="`dtype` must be auto or one of"):
        loading.resolve_dtype("half", torch.device("cpu"))


@pytest.mark.parametrize(
    ("missing", "options", "message"),
    [
        (
            "accelerate",
            {"offload": "model"},
            "offload 'model' needs accelerate, which is not installed: pip install 'faithdiff-pipeline[offload]'",
        ),
        (
            "bitsandbytes",
            {"captioner_precision": "8bit"},
            "a 8bit captioner needs bitsandbytes, which is not installed: pip install 'faithdiff-pipeline[caption]'",
        ),
        (
            "spandrel",
            {"preclean": "x.pth"},
            "pre-cleaning for the captioner needs spandrel, which is not installed: pip install 'faithdiff-pipeline[preclean]'",
        ),
    ],
)
def test_missing_extras_are_named(monkeypatch, missing, options, message) -> None:
    monkeypatch.setattr(loading, "installed", lambda module: module != missing)
    with pytest.raises(ValueError) as error:
        loading.check_options(**options)
    assert str(error.value) == message


@pytest.mark.parametrize(
    "flags", [["--offload", "model"], ["--captioner-quantization", "4bit"], ["--preclean", "net.pth"]]
)
def test_missing_extras_are_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys, flags) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "installed", lambda module: module not in ("accelerate", "bitsandbytes", "spandrel"))
    PIL.Image.new("RGB", (24, 20)).save(tmp_path / "a.png")
    assert main(["a.png", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("faithdiff-upscale: error: ") and "pip install 'faithdiff-pipeline[" in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    FaithDiffSDXLPipeline(**tiny_components()).save_pretrained(root / "full")
    FaithDiffSDXLPipeline(**tiny_components()).save_pretrained(root / "fp16", variant="fp16")
    model, processor = tiny_captioner()
    model.save_pretrained(root / "captioner")
    processor.save_pretrained(root / "captioner")
    return root


def test_half_types_load_the_fp16_files_of_the_release(folders, monkeypatch) -> None:
    asked = []

    def fake_release(variant=None, cache_dir=None):
        asked.append(variant)
        return folders / "fp16" if variant == "fp16" else folders / "full"

    monkeypatch.setattr("faithdiff_pipeline.conversion.converted_release", fake_release)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        pipe = loading.load_pipeline(None, torch.device("cpu"), dtype)
        assert pipe.unet.dtype == dtype
    assert asked == ["fp16", "fp16", None]
    # A user's folder: its fp16 files where it has them, else the full-precision ones.
    assert loading.load_pipeline(folders / "full", torch.device("cpu"), torch.bfloat16).unet.dtype == torch.bfloat16


def test_a_folder_of_fp16_files_only_loads_in_float32_upcast_and_says_so(tmp_path, caplog) -> None:
    """A folder converted with `--variant fp16` has no full-precision files: float32 on the CPU loads the fp16 files
    and upcasts them, which gives the float32 pipeline with float16-rounded weights."""
    import logging

    half = FaithDiffSDXLPipeline(**tiny_components())
    half.to(dtype=torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    weights = [p.name for p in (tmp_path / "fp16").rglob("*.safetensors")]
    assert weights and all(".fp16." in name for name in weights)
    rounded = FaithDiffSDXLPipeline(**tiny_components())
    with torch.no_grad():
        for component in rounded.components.values():
            if isinstance(component, torch.nn.Module):
                for parameter in component.parameters():
                    parameter.copy_(parameter.half().float())
    exact = FaithDiffSDXLPipeline(**tiny_components())

    with caplog.at_level(logging.WARNING, logger="faithdiff_pipeline"):
        loaded = loading.load_pipeline(tmp_path / "fp16", torch.device("cpu"), torch.float32)
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("faithdiff_pipeline")]
    assert len(notes) == 1 and "only 'fp16' weights" in notes[0] and "cast to torch.float32" in notes[0], notes
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float32}

    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    run = dict(prompt="a photo", num_inference_steps=2, tile_size=64, output_type="np")
    outputs = []
    for pipe in (loaded, rounded, exact):
        pipe.set_progress_bar_config(disable=True)
        outputs.append(pipe(image, generator=torch.Generator().manual_seed(0), **run).images)
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(outputs[0], outputs[2], rtol=0, atol=2e-2)  # float16 rounding of the weights
    assert not np.array_equal(outputs[0], outputs[2])
    # Asked for by name, the variant loads without a note; the half types take it as before.
    caplog.clear()
    loading.load_pipeline(tmp_path / "fp16", torch.device("cpu"), torch.bfloat16)
    assert not [r for r in caplog.records if r.name.startswith("faithdiff_pipeline")]


def _photos(folder, count=2):
    folder.mkdir()
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        path = folder / f"p{i}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_captions_first_then_the_captioner_leaves_then_restoration(folders, tmp_path, monkeypatch, capsys) -> None:
    paths = _photos(tmp_path / "in")
    events = []
    for name in ("load_planned_captioner", "release", "load_pipeline"):
        original = getattr(loading, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            events.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(loading, name, spy)
    args = [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(folders / "full"), *FAST]
    assert main([*args, "--captioner", str(folders / "captioner")]) == 0
    assert events == ["load_planned_captioner", "release", "load_pipeline"]
    captions = [read_caption(path) for path in paths]
    assert all(isinstance(c, str) for c in captions)
    for path, caption in zip(paths, captions):
        with PIL.Image.open(tmp_path / "out" / path.name) as result:
            assert result.text["caption"] == caption
    events.clear()
    assert main([*args, "--captioner", str(folders / "captioner"), "--overwrite"]) == 0
    assert events == ["load_pipeline"]  # every image has its sidecar: nothing is captioned again


def test_one_caption_for_one_image_and_seed_in_cli_and_pipeline(folders, tmp_path) -> None:
    (path,) = _photos(tmp_path / "in", 1)
    assert (
        main(
            [str(path), "--captions-only", "--captioner", str(folders / "captioner"), "--device", "cpu", "--seed", "5"]
        )
        == 0
    )
    model, processor = tiny_captioner()
    pipe = FaithDiffSDXLPipeline(**tiny_components(), captioner=model, captioner_processor=processor)
    from_pipe = pipe.caption(str(path), torch.Generator().manual_seed(5))[0]
    assert read_caption(path) == from_pipe
    raw = json.loads(path.with_suffix(".json").read_text())["caption"]
    assert Captioner(model, processor).raw_captions([PIL.Image.open(path)], seed=5)[0] == raw


def test_preclean_shows_the_captioner_the_cleaned_image_and_restores_the_original(
    folders, tmp_path, monkeypatch
) -> None:
    (path,) = _photos(tmp_path / "in", 1)
    (tmp_path / "net.pth").write_bytes(b"a network file")
    monkeypatch.setattr(loading, "installed", lambda module: True)
    monkeypatch.setattr(
        loading, "load_preclean", lambda file, device: lambda image: PIL.Image.eval(image, lambda v: 255 - v)
    )
    seen_by_captioner, seen_by_pipeline = [], []
    original_raw = Captioner.raw_captions

    def spy_raw(self, images, seed=None):
        seen_by_captioner.extend(np.asarray(image) for image in images)
        return original_raw(self, images, seed)

    original_call = FaithDiffSDXLPipeline.__call__

    def spy_call(self, *args, **kwargs):
        image = kwargs.get("image")  # the photo as read, an ImageFile: decoded once, never again through PIL
        seen_by_pipeline.append(image.pixels)
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(Captioner, "raw_captions", spy_raw)
    monkeypatch.setattr(FaithDiffSDXLPipeline, "__call__", spy_call)
    args = [str(path), "-o", str(tmp_path / "out"), "--model", str(folders / "full"), *FAST]
    assert main([*args, "--captioner", str(folders / "captioner"), "--preclean", str(tmp_path / "net.pth")]) == 0
    original = np.asarray(PIL.Image.open(path))
    assert np.array_equal(seen_by_captioner[0], 255 - original)
    assert np.array_equal(seen_by_pipeline[0], original)
