"""The web demo (examples/gradio_demo.py): its callbacks without a browser, then the app served, driven in Chromium."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from types import ModuleType
from typing import Iterator

# A test never reports usage to gradio's servers (read when gradio is imported).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import shared_path, tiny_captioner, tiny_components
from faithdiff_pipeline import FaithDiffSDXLPipeline

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
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gradio_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pipe(with_captioner: bool) -> FaithDiffSDXLPipeline:
    captioner = dict(zip(("captioner", "captioner_processor"), tiny_captioner())) if with_captioner else {}
    pipe = FaithDiffSDXLPipeline(**tiny_components(), **captioner)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def captioning_pipe() -> FaithDiffSDXLPipeline:
    return _pipe(with_captioner=True)


@pytest.fixture(scope="module")
def plain_pipe() -> FaithDiffSDXLPipeline:
    return _pipe(with_captioner=False)


def spy_prompts(pipe: FaithDiffSDXLPipeline, monkeypatch: pytest.MonkeyPatch) -> list:
    """The prompts that reach the text encoders, one list per pipeline call."""
    seen = []
    original = pipe.encode_prompt

    def encode_prompt(*args, **kwargs):
        seen.append(kwargs["prompt"])
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", encode_prompt)
    return seen


# --- Callbacks, without a browser ---------------------------------------------------------------------------------


def test_caption_button_fills_the_box_with_the_captioners_caption(demo, captioning_pipe, plain_pipe, lq_image) -> None:
    caption = demo.caption_image(captioning_pipe, lq_image, seed=42)
    assert isinstance(caption, str) and caption
    assert caption == captioning_pipe.caption(lq_image, torch.Generator("cpu").manual_seed(42))[0]
    with pytest.raises(gr.Error, match="without a captioner"):
        demo.caption_image(plain_pipe, lq_image, seed=42)


def test_restore_with_an_empty_box_captions_and_returns_the_upscaled_result(demo, captioning_pipe, lq_image) -> None:
    progress = []
    before, after, path, used = demo.restore_image(
        captioning_pipe,
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
    # The box gets the caption that was used; the result is the one pipe(prompt=None) gives.
    generator = torch.Generator("cpu").manual_seed(42)
    assert used == captioning_pipe.caption(lq_image, generator)[0]
    expected = captioning_pipe(lq_image, num_inference_steps=2, tile_size=64, generator=generator).images[0]
    assert np.array_equal(np.asarray(after), np.asarray(expected))
    assert progress == [(0.0, "Captioning"), ((1, 2), "Denoising"), ((2, 2), "Denoising")]


def test_an_edited_caption_is_the_prompt_unchanged(demo, captioning_pipe, lq_image, monkeypatch) -> None:
    prompts = spy_prompts(captioning_pipe, monkeypatch)
    monkeypatch.setattr(captioning_pipe, "caption", lambda *args, **kwargs: pytest.fail("captioned an edited box"))
    edited = "  An old photo of a cat; grainy, faded.\n"
    *_, used = demo.restore_image(captioning_pipe, lq_image, edited, steps=1, tile_size=64)
    assert prompts == [[edited]] and used == edited


def test_empty_box_without_a_captioner_restores_with_an_empty_prompt(demo, plain_pipe, lq_image, monkeypatch) -> None:
    prompts = spy_prompts(plain_pipe, monkeypatch)
    *_, used = demo.restore_image(plain_pipe, lq_image, "", steps=1, tile_size=64)
    assert prompts == [[""]] and used == ""


def test_bad_inputs_are_gradio_errors_with_the_message(demo, plain_pipe, lq_image, tmp_path) -> None:
    with pytest.raises(gr.Error, match="Upload a photo first"):
        demo.restore_image(plain_pipe, None, "a cat")
    with pytest.raises(gr.Error, match="Upload a photo first"):
        demo.caption_image(plain_pipe, None)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    with pytest.raises(gr.Error, match="could not be read as an image") as error:
        demo.restore_image(plain_pipe, str(corrupt), "a cat", steps=1)
    assert "Traceback" not in error.value.message and error.value.title == "Restoration failed"
    with pytest.raises(gr.Error, match="`tile_size` must be a multiple of 8"):
        demo.restore_image(plain_pipe, lq_image, "a cat", steps=1, tile_size=100)
    with pytest.raises(gr.Error, match="Enter a seed"):
        demo.restore_image(plain_pipe, lq_image, "a cat", seed=None)


@pytest.mark.parametrize("kind", ["grey16", "rgb16", "rgba"])
def test_the_download_keeps_the_uploads_bit_depth_greyscale_and_alpha(demo, plain_pipe, tmp_path, kind) -> None:
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
    before, after, path, _ = demo.restore_image(plain_pipe, str(photo), "a photo", steps=1, tile_size=64)
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


def test_command_line_loads_a_converted_folder_and_a_captioner(demo, captioning_pipe, tmp_path) -> None:
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
    assert (args.dtype, args.port, args.host, args.share) == (torch.float32, 7999, "127.0.0.1", False)
    pipe = demo.load_pipeline(args.model, args.captioner, args.device, args.dtype, args.offload)
    assert type(pipe.captioner).__name__ == "LlavaForConditionalGeneration" and pipe.captioner_processor is not None
    assert demo.build_demo(pipe) is not None


def test_without_an_image_slider_before_and_after_are_side_by_side(demo, plain_pipe, monkeypatch) -> None:
    monkeypatch.delattr(gr, "ImageSlider", raising=False)  # as in a gradio without one
    app = demo.build_demo(plain_pipe)
    labels = [block.label for block in app.blocks.values() if type(block) is gr.Image]
    assert labels == ["Low-quality photo", "Before", "After"]


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
def served_demo(demo, captioning_pipe) -> Iterator[str]:
    """The app around tiny random components, served on 127.0.0.1; its URL."""
    app = demo.build_demo(captioning_pipe)
    _, url, _ = app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True)
    try:
        yield url
    finally:
        app.close()


def test_the_app_in_chromium(chromium, served_demo, captioning_pipe, monkeypatch, tmp_path) -> None:
    """Upload, Caption, Restore and Download as a user would; the screenshot is left in tmp_path."""
    from playwright.sync_api import expect, sync_playwright

    photo = tmp_path / "chelsea_small.png"
    with PIL.Image.open(shared_path("samples") / "chelsea.png") as original:
        original.convert("RGB").resize((96, 64), PIL.Image.LANCZOS).save(photo)
    steps = []
    denoise = captioning_pipe.predict_noise
    monkeypatch.setattr(captioning_pipe, "predict_noise", lambda *a, **k: steps.append(1) or denoise(*a, **k))

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
            page.screenshot(path=tmp_path / "demo.png", full_page=True)

            with page.expect_download() as download:
                page.click("#download")
            download.value.save_as(tmp_path / "restored.png")
        finally:
            browser.close()
    with PIL.Image.open(tmp_path / "restored.png") as restored:
        assert (restored.format, restored.size) == ("PNG", (192, 128))  # the photo, upscaled twice
    assert len(steps) == 2  # the steps typed in the page reached the pipeline


def _stay_local(page, url: str) -> None:
    """Fails any request that leaves the served app (fonts, analytics): the test runs offline and must not hang."""

    def route(request_route) -> None:
        if request_route.request.url.startswith((url.rstrip("/"), "data:", "blob:")):
            request_route.continue_()
        else:
            request_route.abort()

    page.route("**/*", route)
