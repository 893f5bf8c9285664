"""The web demo (examples/gradio_demo.py): its callbacks without a browser, then the app served, driven in Chromium."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

# A test never reports usage to gradio's servers (read when gradio is imported).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import PIL.Image
import pytest
import torch

from shared_data import shared_path

from tiny_models import tiny_captioner, tiny_components
from faithdiff_pipeline import FaithDiffSDXLPipeline, loading
from faithdiff_pipeline.captioning import Captioner
from faithdiff_pipeline.fidelity import HEAT_FULL_SCALE, fidelity_heat_map, measure_fidelity
from faithdiff_pipeline.image_io import read_image

try:
    import gradio as gr
except ImportError:
    if os.environ.get("CI"):  # a test extra: CI must have it
        raise
    pytest.skip('gradio is not installed: pip install -e ".[test]"', allow_module_level=True)

DEMO = Path(__file__).resolve().parents[1] / "examples" / "gradio_demo.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def demo() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("gradio_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs, as `python examples/gradio_demo.py` registers __main__: dataclasses look their
    # module up there.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


GIB = 1024**3
CUDA = torch.device("cuda")
LLAVA_13B = "llava-hf/llava-1.5-13b-hf"


def _pipe(with_captioner: bool) -> FaithDiffSDXLPipeline:
    captioner = dict(zip(("captioner", "captioner_processor"), tiny_captioner())) if with_captioner else {}
    pipe = FaithDiffSDXLPipeline(**tiny_components(), **captioner)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def captioning_pipe() -> FaithDiffSDXLPipeline:
    """The reference: a pipeline holding the tiny captioner as its components, captioning in pipe.caption and
    pipe(prompt=None)."""
    return _pipe(with_captioner=True)


@pytest.fixture(scope="module")
def plain_pipe() -> FaithDiffSDXLPipeline:
    return _pipe(with_captioner=False)


@pytest.fixture(scope="module")
def captioning_models(demo, plain_pipe) -> Any:
    """What the demo serves: the same tiny components, and the same tiny captioner kept apart from them."""
    return demo.DemoModels(plain_pipe, Captioner(*tiny_captioner()))


@pytest.fixture(scope="module")
def plain_models(demo, plain_pipe) -> Any:
    return demo.DemoModels(plain_pipe)


def spy_prompts(pipe: FaithDiffSDXLPipeline, monkeypatch: pytest.MonkeyPatch) -> list:
    """The prompts that reach the text encoders, one list per pipeline call."""
    seen = []
    original = pipe.encode_prompt

    def encode_prompt(*args, **kwargs):
        seen.append(kwargs["prompt"])
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", encode_prompt)
    return seen


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("gradio_demo.py: error: ") and "Traceback" not in lines[0]
    return lines[0]


# --- Callbacks, without a browser ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 42])
def test_caption_button_gives_the_caption_of_pipe_caption_and_of_the_cli(
    demo, captioning_models, captioning_pipe, plain_models, lq_image, tmp_path, seed
) -> None:
    """One seed convention: the demo's caption for a photo and seed is ``Captioner.caption([photo], seed=seed)``,
    which faithdiff-upscale --seed writes, and what pipe.caption gives with a generator seeded so."""
    photo = tmp_path / "photo.png"
    lq_image.save(photo)
    caption = demo.caption_image(captioning_models, str(photo), seed=float(seed))  # gr.Number gives floats
    assert isinstance(caption, str) and caption
    assert caption == demo.caption_image(captioning_models, lq_image, seed=seed)
    assert caption == captioning_pipe.caption(lq_image, torch.Generator().manual_seed(seed))[0]
    assert caption == Captioner(*tiny_captioner()).caption([lq_image], seed=seed)[0]
    with pytest.raises(gr.Error, match="without a captioner"):
        demo.caption_image(plain_models, lq_image, seed=seed)


def test_restore_with_an_empty_box_captions_and_returns_the_upscaled_result(
    demo, captioning_models, captioning_pipe, lq_image
) -> None:
    progress = []
    before, after, path, used = demo.restore_image(
        captioning_models,
        lq_image,
        "",
        upscale=2,
        steps=2,
        tile_size=64,
        progress=lambda value, **kwargs: progress.append((value, kwargs["desc"])),
    )
    assert before.size == after.size == (48, 40)  # 24 x 20, twice
    with PIL.Image.open(path) as saved:
        assert (saved.format, saved.size) == ("PNG", (48, 40))
        assert np.array_equal(np.asarray(saved), np.asarray(after))
    # The box gets the caption that was used; the result is the one pipe(prompt=None) gives with the captioner as
    # a component of the pipeline.
    generator = torch.Generator("cpu").manual_seed(42)
    assert used == captioning_pipe.caption(lq_image, generator)[0]
    expected = captioning_pipe(lq_image, num_inference_steps=2, tile_size=64, generator=generator).images[0]
    assert np.array_equal(np.asarray(after), np.asarray(expected))
    assert progress == [(0.0, "Captioning"), ((1, 2), "Denoising"), ((2, 2), "Denoising")]


def test_an_edited_caption_is_the_prompt_unchanged(demo, captioning_models, lq_image, monkeypatch) -> None:
    prompts = spy_prompts(captioning_models.pipe, monkeypatch)
    monkeypatch.setattr(captioning_models, "caption", lambda *args, **kwargs: pytest.fail("captioned an edited box"))
    edited = "  An old photo of a cat; grainy, faded.\n"
    *_, used = demo.restore_image(captioning_models, lq_image, edited, steps=1, tile_size=64)
    assert prompts == [[edited]] and used == edited


def test_empty_box_without_a_captioner_restores_with_an_empty_prompt(
    demo, plain_models, lq_image, monkeypatch
) -> None:
    prompts = spy_prompts(plain_models.pipe, monkeypatch)
    *_, used = demo.restore_image(plain_models, lq_image, "", steps=1, tile_size=64)
    assert prompts == [[""]] and used == ""


def test_bad_inputs_are_gradio_errors_with_the_message(demo, plain_models, lq_image, tmp_path) -> None:
    with pytest.raises(gr.Error, match="Upload a photo first"):
        demo.restore_image(plain_models, None, "a cat")
    with pytest.raises(gr.Error, match="Upload a photo first"):
        demo.caption_image(plain_models, None)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    with pytest.raises(gr.Error, match="could not be read as an image") as error:
        demo.restore_image(plain_models, str(corrupt), "a cat", steps=1)
    assert "Traceback" not in error.value.message and error.value.title == "Restoration failed"
    with pytest.raises(gr.Error, match="`tile_size` must be a multiple of 8"):
        demo.restore_image(plain_models, lq_image, "a cat", steps=1, tile_size=100)
    with pytest.raises(gr.Error, match="Enter a seed"):
        demo.restore_image(plain_models, lq_image, "a cat", seed=None)


@pytest.mark.parametrize("kind", ["grey16", "rgb16", "rgba"])
def test_the_download_keeps_the_uploads_bit_depth_greyscale_and_alpha(demo, plain_models, tmp_path, kind) -> None:
    """Uploads reach the callbacks as the file itself (gradio's ``type="filepath"``), read through image_io; the
    PNG offered for download is written by ``image_io.save_result`` with what the photo had."""
    from faithdiff_pipeline.image_io import read_image

    y, x = np.mgrid[0:20, 0:24]
    photo = tmp_path / f"{kind}.png"
    if kind == "grey16":
        PIL.Image.fromarray((8000 + 1500 * x + 900 * y).astype(np.uint16)).save(photo)
    elif kind == "rgb16":
        imagecodecs = pytest.importorskip("imagecodecs")
        rgb = np.stack([x * 2500, y * 3000, (x * y) * 100], axis=-1).astype(np.uint16)
        photo.write_bytes(imagecodecs.png_encode(rgb))
    else:
        rgba = np.stack([x * 10, y * 12, (x * y) % 256, np.where(x < 12, 255, 0)], axis=-1).astype(np.uint8)
        PIL.Image.fromarray(rgba, "RGBA").save(photo)
    source = read_image(photo)
    before, after, path, _ = demo.restore_image(plain_models, str(photo), "a photo", steps=1, tile_size=64)
    assert before.size == after.size == (48, 40) and after.mode == "RGB"
    result = read_image(path)
    assert (result.size, result.bit_depth, result.greyscale) == ((48, 40), source.bit_depth, source.greyscale)
    assert (result.alpha is None) == (source.alpha is None)
    shown = np.asarray(after, dtype=np.float64) / 255  # the result rounded to 8 bits
    if kind == "rgba":
        assert result.alpha[:, :16].min() == 255 and result.alpha[:, 32:].max() == 0  # LANCZOS rings at the edge
        assert np.array_equal(result.pixels[:, :16], np.asarray(after)[:, :16])
    elif kind == "grey16":  # the luminance (Rec. 709) of the restored colour, in 16 bits
        assert np.abs(result.as_float()[..., 0] - shown @ [0.2126, 0.7152, 0.0722]).max() <= 1 / 255
    else:
        assert np.abs(result.as_float() - shown).max() <= 0.5 / 255 + 1e-6


def test_command_line_loads_a_converted_folder_and_a_captioner_apart(
    demo, captioning_pipe, tmp_path, lq_image
) -> None:
    captioning_pipe.captioner.save_pretrained(tmp_path / "captioner")
    captioning_pipe.captioner_processor.save_pretrained(tmp_path / "captioner")
    _pipe(with_captioner=False).save_pretrained(tmp_path / "pipeline")
    args = demo.parse_args(
        [
            "--model",
            str(tmp_path / "pipeline"),
            "--captioner",
            str(tmp_path / "captioner"),
            "--device",
            "cpu",
            "--port",
            "7999",
        ]
    )
    assert (args.port, args.host, args.share, args.offload) == (7999, "127.0.0.1", False, False)
    device, dtype, plan = demo.check_arguments(args)
    assert (device, dtype) == (torch.device("cpu"), torch.float32)
    assert plan == loading.CaptionerPlan(str(tmp_path / "captioner"), "full")  # float32 on the CPU, as the CLI
    models = demo.load_models(args.model, device, dtype, plan, args.offload)
    assert models.pipe.captioner is None and not models.swap  # the captioner is no pipeline component
    assert type(models.captioner.model).__name__ == "LlavaForConditionalGeneration"
    assert models.captioner.model.dtype == torch.float32 and models.captioner.model.device.type == "cpu"
    reference = captioning_pipe.caption(lq_image, torch.Generator().manual_seed(7))[0]
    assert demo.caption_image(models, lq_image, 7) == reference
    assert demo.build_demo(models) is not None


@pytest.mark.parametrize(
    ("cuda", "free_gib", "bitsandbytes", "model", "precision"),
    [
        (True, 40, True, LLAVA_13B, "half"),
        (True, 20, True, LLAVA_13B, "8bit"),
        (True, 20, False, None, None),
        (False, 0, True, None, None),
    ],
)
def test_the_default_captioner_follows_the_clis_rule(
    demo, monkeypatch, cuda, free_gib, bitsandbytes, model, precision
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(loading, "free_gpu_memory", lambda device: free_gib * GIB)
    monkeypatch.setattr(loading, "installed", lambda module: module != "bitsandbytes" or bitsandbytes)
    device, dtype, plan = demo.check_arguments(demo.parse_args([]))
    assert device == loading.resolve_device("auto") == torch.device("cuda" if cuda else "cpu")
    assert dtype == loading.resolve_dtype("auto", device) == (torch.float16 if cuda else torch.float32)
    assert plan == loading.plan_captioner("auto", device, "auto")
    assert (plan.model, plan.precision) == (model, precision)


def test_start_up_prints_the_captioner_plans_note_once_and_serves(
    demo, tiny_model_dir, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    served = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: served.append(kwargs))
    built = []
    build = demo.build_demo
    monkeypatch.setattr(demo, "build_demo", lambda models: built.append(models) or build(models))
    assert demo.main(["--model", str(tiny_model_dir), "--port", "7998"]) == 0
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gradio_demo.py:")]
    assert ours == [f"gradio_demo.py: {loading.plan_captioner('auto', torch.device('cpu')).note}"]
    assert "no CUDA GPU" in ours[0]
    assert served == [{"server_name": "127.0.0.1", "server_port": 7998, "share": False}]
    assert not built[0].can_caption and built[0].pipe.device.type == "cpu"


@pytest.mark.parametrize(
    ("flags", "missing", "expected"),
    [
        (["--offload"], "accelerate", "--offload needs accelerate, which is not installed: pip install 'faithdiff"),
        (["--captioner-quantization", "8bit"], "bitsandbytes", "pip install 'faithdiff-pipeline[caption]'"),
        (["--device", "cuda"], None, "--device 'cuda' asks for a CUDA GPU, but torch sees none"),
        (["--device", "tpu9"], None, "--device 'tpu9' is not a torch device"),
        (["--model", "./no-such-folder"], None, "--model './no-such-folder' does not exist"),
        (["--captioner", "none", "--captioner-quantization", "4bit"], None, "drop --captioner-quantization"),
        (["--captioner", "some/llava", "--captioner-quantization", "4bit"], None, "needs a CUDA GPU"),
    ],
)
def test_option_mistakes_and_missing_extras_are_one_line_before_any_model_loads(
    demo, monkeypatch, capsys, flags, missing, expected
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "installed", lambda module: module != missing)
    for name in ("load_pipeline", "load_planned_captioner"):
        monkeypatch.setattr(loading, name, lambda *args, **kwargs: pytest.fail("a model loaded"))
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: pytest.fail("served"))
    assert demo.main(flags) == 2
    assert expected in _one_error_line(capsys)


def test_a_port_in_use_is_one_line_naming_port_before_any_model_loads(
    demo, tiny_model_dir, monkeypatch, capsys
) -> None:
    for name in ("load_pipeline", "load_planned_captioner"):
        monkeypatch.setattr(loading, name, lambda *args, **kwargs: pytest.fail("a model loaded"))
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: pytest.fail("served"))
    # A second copy of the demo: the first one listens on the port, on the loopback only.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
        first.bind(("127.0.0.1", 0))
        first.listen()
        port = first.getsockname()[1]
        args = ["--model", str(tiny_model_dir), "--captioner", "none", "--device", "cpu", "--port", str(port)]
        assert demo.main(args) == 2
        error = _one_error_line(capsys)
    assert f"port {port} on 127.0.0.1 is in use" in error and "pass --port" in error, error
    assert "server_port" not in error and "GRADIO_SERVER_PORT" not in error
    assert demo.main(["--model", str(tiny_model_dir), "--port", "70000"]) == 2
    assert "--port must be from 0 to 65535, got 70000." in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("device", "precision", "free_gib", "offloaded", "fits"),
    [
        ("cpu", "full", None, False, True),  # one pool of memory: nothing moves
        ("mps", "half", None, False, True),
        ("cuda", "half", 40, False, True),
        ("cuda", "half", 20, False, False),  # 28 GiB in half precision
        ("cuda", "8bit", 20, False, True),
        ("cuda", "4bit", 8, False, False),
        ("cuda", "half", 80, True, False),  # offloaded: the pipeline comes onto the GPU for each restoration
    ],
)
def test_the_captioner_stays_on_the_gpu_only_where_both_fit(
    demo, device, precision, free_gib, offloaded, fits
) -> None:
    plan = loading.CaptionerPlan(LLAVA_13B, precision)
    free = None if free_gib is None else free_gib * GIB
    assert demo.captioner_fits_beside(plan, torch.device(device), free, offloaded) is fits
    # A model whose size is unknown is never assumed to fit on a GPU.
    unknown = loading.CaptionerPlan("someone/other-llava", precision)
    assert demo.captioner_fits_beside(unknown, torch.device(device), free, offloaded) is (device != "cuda")


@pytest.mark.parametrize(
    ("precision", "free_gib", "offload", "loaded_on", "swap"),
    [
        ("half", 40, False, "cuda", False),
        ("half", 20, False, "cpu", True),  # waits in host memory, visits the GPU to caption
        ("8bit", 20, False, "cuda", False),
        ("8bit", 10, False, None, True),  # bitsandbytes weights live on the GPU: loaded for each caption
        ("half", 40, True, "cpu", True),
    ],
)
def test_start_up_places_the_captioner_by_the_memory_left_beside_the_pipeline(
    demo, plain_pipe, monkeypatch, capsys, precision, free_gib, offload, loaded_on, swap
) -> None:
    loads = []
    monkeypatch.setattr(
        loading, "load_pipeline", lambda model, device, dtype, offload: loads.append(offload) or plain_pipe
    )
    monkeypatch.setattr(loading, "free_gpu_memory", lambda device: free_gib * GIB)
    captioners = []

    def load_planned_captioner(plan, device, dtype):
        captioners.append(device.type)
        return Captioner(*tiny_captioner())

    monkeypatch.setattr(loading, "load_planned_captioner", load_planned_captioner)
    models = demo.load_models(None, CUDA, torch.float16, loading.CaptionerPlan(LLAVA_13B, precision), offload)
    assert loads == ["model" if offload else "none"]
    assert captioners == ([loaded_on] if loaded_on else []) and models.swap is swap and models.offloaded is offload
    assert models.can_caption and (models.load_captioner is not None) == (loaded_on is None)
    assert ("cannot stay on the GPU" in capsys.readouterr().err) is swap
    if loaded_on is None:
        models.load_captioner()
        assert captioners == ["cuda"]


def _record_moves(models, monkeypatch, events: list, captioner: Captioner | None = None) -> None:
    """Replaces the moves between devices with records (this machine has no GPU) and records each caption."""
    monkeypatch.setattr(models.pipe, "to", lambda device: events.append(("pipeline", str(device))))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    for each in [c for c in (models.captioner, captioner) if c is not None]:
        model, raw = each.model, each.raw_captions
        monkeypatch.setattr(model, "to", lambda device, _m=model: events.append(("captioner", str(device))) or _m)
        monkeypatch.setattr(each, "raw_captions", lambda *a, _raw=raw, **k: events.append("caption") or _raw(*a, **k))
    denoise = models.pipe.predict_noise
    monkeypatch.setattr(models.pipe, "predict_noise", lambda *a, **k: events.append("denoise") or denoise(*a, **k))


def test_where_both_do_not_fit_the_captioner_is_on_the_gpu_only_while_it_captions(
    demo, plain_pipe, lq_image, monkeypatch
) -> None:
    """Each request is captioned first, with the pipeline's models off the GPU, then restored with the captioner off
    it; the caption and the result are those of the captioner and pipeline left in place."""
    resident = demo.DemoModels(plain_pipe, Captioner(*tiny_captioner()))
    expected = demo.restore_image(resident, lq_image, "", steps=1, tile_size=64)
    models = demo.DemoModels(plain_pipe, Captioner(*tiny_captioner()), device=CUDA, swap=True)
    events = []
    _record_moves(models, monkeypatch, events)
    before, after, _, used = demo.restore_image(models, lq_image, "", steps=1, tile_size=64)
    assert events == [
        ("pipeline", "cpu"),
        "empty_cache",
        ("captioner", "cuda"),
        "caption",
        ("captioner", "cpu"),
        "empty_cache",
        ("pipeline", "cuda"),
        "denoise",
    ]
    assert used == expected[3] and np.array_equal(np.asarray(after), np.asarray(expected[1]))

    # A failed caption still leaves the captioner off the GPU and the pipeline back on it.
    events.clear()
    monkeypatch.setattr(models.captioner, "raw_captions", lambda *a, **k: events.append("caption") or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        models.caption(lq_image, 42)
    assert events[-3:] == [("captioner", "cpu"), "empty_cache", ("pipeline", "cuda")]


def test_an_offloaded_pipeline_stays_put_and_a_quantised_captioner_is_loaded_per_caption(
    demo, plain_pipe, lq_image, monkeypatch
) -> None:
    events = []
    fresh = Captioner(*tiny_captioner())
    models = demo.DemoModels(
        plain_pipe, device=CUDA, swap=True, offloaded=True, load_captioner=lambda: events.append("load") or fresh
    )
    _record_moves(models, monkeypatch, events, captioner=fresh)
    release = loading.release
    monkeypatch.setattr(loading, "release", lambda captioner: events.append("release") or release(captioner))
    caption = demo.caption_image(models, lq_image, 3)
    assert events == ["load", "caption", "release"]  # offload hooks keep the pipeline in host memory meanwhile
    assert fresh.model is None  # freed
    assert caption == Captioner(*tiny_captioner()).caption([lq_image], seed=3)[0]


def test_without_an_image_slider_before_and_after_are_side_by_side(
    demo, plain_models, restored_view, monkeypatch
) -> None:
    monkeypatch.delattr(gr, "ImageSlider", raising=False)  # as in a gradio without one
    app = demo.build_demo(plain_models)
    labels = [block.label for block in app.blocks.values() if type(block) is gr.Image]
    assert labels == ["Low-quality photo", "Before", "After", "Fidelity map"]
    # The map alone, without the result to slide against.
    layer = _handler(app, "on_map")(restored_view, "consistency", 0.75)
    assert isinstance(layer, PIL.Image.Image) and layer.size == restored_view[0].size


# --- Fidelity -----------------------------------------------------------------------------------------------------


def _handler(app: gr.Blocks, name: str) -> Any:
    """The function an event of ``app`` calls, by name, to drive the page's wiring without a browser."""
    (function,) = [block_fn.fn for block_fn in app.fns.values() if block_fn.name == name]
    return function


@pytest.fixture(scope="module")
def restored_view(demo, plain_models) -> tuple:
    """A result and its fidelity report, as the page keeps them to draw the maps."""
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    restoration = demo.restore(plain_models, image, "a photo", steps=1, tile_size=64, fidelity=True)
    return restoration.after, restoration.fidelity


def test_fidelity_is_measured_on_the_result_against_the_photo_and_kept_in_the_png(
    demo, plain_models, lq_image, tmp_path
) -> None:
    """As faithdiff-upscale --fidelity: the float result against the photo's colour, the numbers in the PNG's
    ``fidelity`` text; measuring changes nothing of the result."""
    photo = tmp_path / "photo.png"
    lq_image.save(photo)
    restoration = demo.restore(plain_models, str(photo), "a photo", steps=1, tile_size=64, fidelity=True)
    expected = measure_fidelity(restoration.result, read_image(photo).as_float())
    assert restoration.fidelity.as_metadata() == expected.as_metadata()
    for name, values in expected.maps().items():
        assert np.array_equal(restoration.fidelity.maps()[name], values)
    with PIL.Image.open(restoration.path) as saved:
        assert json.loads(saved.text["fidelity"]) == expected.as_metadata()
        assert saved.text["caption"] == "a photo" and "parameters" in saved.text
        assert np.array_equal(np.asarray(saved), np.asarray(restoration.after))
    before, after, path, used = demo.restore_image(plain_models, str(photo), "a photo", steps=1, tile_size=64)
    assert np.array_equal(np.asarray(after), np.asarray(restoration.after))
    assert np.array_equal(np.asarray(before), np.asarray(restoration.before))
    with PIL.Image.open(path) as saved:
        assert "fidelity" not in saved.text  # not measured, not claimed


def test_the_numbers_are_the_reports_with_how_to_read_them(demo, restored_view) -> None:
    _, report = restored_view
    summary = demo.fidelity_summary(report)
    assert f"**LR-PSNR {report.lr_psnr:.2f} dB**" in summary
    assert f"**LR-SSIM {report.lr_ssim:.4f}**" in summary
    assert f"**added detail {100 * report.added_detail_share:.1f} %** of the pixels" in summary
    assert "closer to the photo" in summary
    assert "(docs/fidelity.md)](gradio_api/file=" in summary and demo.FIDELITY_GUIDE.is_file()
    assert "not measured" in demo.fidelity_summary(None)


@pytest.mark.parametrize("map_name", ["consistency", "added_detail"])
@pytest.mark.parametrize("opacity", [0.0, 0.75])
def test_the_layer_is_the_chosen_heat_map_over_the_result_at_its_size(demo, restored_view, map_name, opacity) -> None:
    after, report = restored_view
    layer = demo.fidelity_layer(after, report, map_name, opacity)
    assert (layer.size, layer.mode) == (after.size, "RGB")
    heat = fidelity_heat_map(after, report.maps()[map_name], HEAT_FULL_SCALE[map_name], opacity)
    assert np.array_equal(np.asarray(layer), (heat * 255).round().astype(np.uint8))


def test_the_page_shows_the_result_under_its_map_and_redraws_it_without_restoring(
    demo, plain_models, lq_image, monkeypatch
) -> None:
    app = demo.build_demo(plain_models)
    on_restore, on_map = _handler(app, "on_restore"), _handler(app, "on_map")
    options = [2, 1, 5, 42, "lr", "adain", 64]
    comparison, download, used, layer, numbers, view = on_restore(
        lq_image, "a photo", *options, True, "added_detail", 0.5, progress=lambda *args, **kwargs: None
    )
    after, report = view
    assert comparison[1] is after and layer[0] is after
    assert np.array_equal(np.asarray(layer[1]), np.asarray(demo.fidelity_layer(after, report, "added_detail", 0.5)))
    assert numbers == demo.fidelity_summary(report)
    offered = download.value["path"] if isinstance(download.value, dict) else download.value  # gradio's FileData
    with PIL.Image.open(offered) as saved:
        assert json.loads(saved.text["fidelity"]) == report.as_metadata()

    # Another map or opacity is drawn from what the page kept.
    monkeypatch.setattr(plain_models.pipe, "predict_noise", lambda *a, **k: pytest.fail("restored again"))
    redrawn = on_map(view, "consistency", 0.75)
    assert np.array_equal(np.asarray(redrawn[1]), np.asarray(demo.fidelity_layer(after, report)))
    monkeypatch.undo()

    # Unticked: no map, no numbers, nothing to redraw.
    *_, layer, numbers, view = on_restore(lq_image, "a photo", *options, False, "consistency", 0.75, progress=None)
    assert layer is None and view is None and "not measured" in numbers
    assert on_map(view, "added_detail", 0.75) is None


def test_a_photo_too_small_to_measure_is_restored_with_a_warning(demo, plain_models, lq_image) -> None:
    with pytest.warns(UserWarning, match="Fidelity not measured: .*LR-SSIM needs at least 11x11"):
        restoration = demo.restore(plain_models, lq_image.resize((10, 8)), "a photo", steps=1, fidelity=True)
    assert restoration.fidelity is None and restoration.after.size == (20, 16)


# --- The app in a real browser ------------------------------------------------------------------------------------


def _require(available: bool, what: str) -> None:
    """Skips on a user's machine without ``what``; CI must have it (same convention as conftest.shared_path)."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing; CI must install it (.ci/run) so that the browser test runs.")
    pytest.skip(f"{what} not found: the browser test needs it (apt-get install chromium; pip install playwright).")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium, and playwright to drive it (checked before anything is served)."""
    _require(CHROMIUM.exists(), str(CHROMIUM))
    _require(importlib.util.find_spec("playwright") is not None, "The playwright Python package")
    return CHROMIUM


@pytest.fixture
def served_demo(demo, captioning_models) -> Iterator[str]:
    """The app around tiny random components and a tiny captioner, served on 127.0.0.1; its URL."""
    app = demo.build_demo(captioning_models)
    _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True)
    try:
        yield url
    finally:
        app.close()


@pytest.mark.browser
def test_the_app_in_chromium(chromium, served_demo, captioning_models, monkeypatch, tmp_path) -> None:
    """Upload, Caption, Restore, look at the fidelity maps and Download as a user would; the screenshot is left in
    tmp_path."""
    from playwright.sync_api import expect, sync_playwright

    photo = tmp_path / "chelsea_small.png"
    with PIL.Image.open(shared_path("samples") / "chelsea.png") as original:
        original.convert("RGB").resize((96, 64), PIL.Image.LANCZOS).save(photo)
    steps = []
    denoise = captioning_models.pipe.predict_noise
    monkeypatch.setattr(captioning_models.pipe, "predict_noise", lambda *a, **k: steps.append(1) or denoise(*a, **k))

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            _stay_local(page, served_demo)
            page.goto(served_demo)
            page.locator("#input-image input[type=file]").set_input_files(photo)
            expect(page.locator("#input-image img")).to_be_visible()
            steps_box = page.locator("#steps input[type=number]")
            steps_box.fill("2")
            steps_box.blur()

            page.click("#caption-button")
            expect(page.locator("#caption textarea")).not_to_have_value("", timeout=30_000)

            page.click("#restore-button")
            expect(page.locator("#download")).to_be_enabled(timeout=30_000)
            expect(page.locator("#comparison img")).to_have_count(2)
            numbers = page.locator("#fidelity-numbers")
            expect(numbers).to_contain_text("LR-PSNR")
            expect(numbers).to_contain_text("added detail")
            layer = page.locator("#fidelity-layer img")
            expect(layer).to_have_count(2)  # the result under its map
            consistency = layer.nth(1).get_attribute("src")
            page.get_by_label("Added detail").check()
            expect(layer.nth(1)).not_to_have_attribute("src", consistency, timeout=30_000)
            # The link as the browser resolves it: relative to the page.
            guide = page.request.get(numbers.get_by_role("link").evaluate("link => link.href"))
            assert guide.ok and guide.text().startswith("# Fidelity")
            page.get_by_label("Consistency").check()
            expect(layer.nth(1)).to_have_attribute("src", consistency, timeout=30_000)
            page.screenshot(path=tmp_path / "demo.png", full_page=True)

            with page.expect_download() as download:
                page.click("#download")
            download.value.save_as(tmp_path / "restored.png")
        finally:
            browser.close()
    with PIL.Image.open(tmp_path / "restored.png") as restored:
        assert (restored.format, restored.size) == ("PNG", (192, 128))  # the photo, upscaled twice
        assert set(json.loads(restored.text["fidelity"])) >= {"lr_psnr", "lr_ssim", "added_detail_share"}
    assert len(steps) == 2  # the steps typed in the page reached the pipeline


def _stay_local(page, url: str) -> None:
    """Fails any request that leaves the served app (fonts, analytics): the test runs offline and must not hang."""

    def route(request_route) -> None:
        if request_route.request.url.startswith((url.rstrip("/"), "data:", "blob:")):
            request_route.continue_()
        else:
            request_route.abort()

    page.route("**/*", route)
