"""Web demo: restore and upscale a photo with FaithDiff in the browser.

Upload a photo, let the captioner describe it (or write the caption yourself), restore it, compare before and after
with the slider and download the PNG, which keeps the photo's bit depth (8 or 16), greyscale, alpha and metadata, as
faithdiff-upscale writes it. Needs gradio (``pip install "faithdiff-pipeline[demo]"``).

    python examples/gradio_demo.py                                      # the official release, converted on first use
    python examples/gradio_demo.py --captioner llava-hf/llava-1.5-13b-hf  # with the release's captioner
    python examples/gradio_demo.py --model ./faithdiff-sdxl --offload --port 7861
"""

from __future__ import annotations

import argparse
import atexit
import functools
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image
import torch

from faithdiff_pipeline import FaithDiffSDXLPipeline, converted_release
from faithdiff_pipeline.captioning import load_captioner
from faithdiff_pipeline.image_io import ImageFile, from_pil, read_image, save_result

try:
    import gradio as gr
except ImportError as error:  # gradio is an optional extra: say how to get it instead of a bare ImportError
    raise ImportError(
        'The web demo needs gradio: pip install "faithdiff-pipeline[demo]" (or pip install gradio).'
    ) from error

START_POINTS = {"From the photo (release)": "lr", "From pure noise": "noise"}
COLOR_FIXES = {"AdaIN (release)": "adain", "Wavelet": "wavelet", "None": None}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# A progress reporter: gr.Progress in the app, anything with the same call signature in tests.
Progress = Callable[..., Any]


@functools.cache
def _results_folder() -> Path:
    # Results are written here for the download button; gradio copies them into its own cache, so the folder only
    # has to outlive the process.
    folder = Path(tempfile.mkdtemp(prefix="faithdiff-demo-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _generator(seed: float | None) -> torch.Generator:
    if seed is None:  # a cleared number box
        raise gr.Error("Enter a seed (a whole number).", title="No seed")
    # CPU generator, as faithdiff-upscale uses: the same seed gives the same result on any device.
    return torch.Generator("cpu").manual_seed(int(seed))


def _require_image(image: PIL.Image.Image | str | None, action: str) -> None:
    if image is None:
        raise gr.Error(f"Upload a photo first, then {action}.", title="No photo")


def caption_image(pipe: FaithDiffSDXLPipeline, image: PIL.Image.Image | str | None, seed: float | None = 42) -> str:
    """The pipeline captioner's prompt for ``image`` (the release's LLaVA request and post-processing), for the
    caption box; sampled with ``seed`` so that the same photo and seed give the same caption."""
    _require_image(image, "ask for a caption")
    if pipe.captioner is None or pipe.captioner_processor is None:
        raise gr.Error(
            "This demo was started without a captioner (start it with --captioner MODEL), so write the caption "
            "yourself, or leave it empty to restore without a prompt.",
            title="No captioner",
        )
    try:
        caption = pipe.caption(_read(image).pipeline_input(), generator=_generator(seed))[0]
    except (ValueError, TypeError, OSError) as error:
        raise gr.Error(str(error), title="Captioning failed") from error
    if not caption:
        gr.Warning("The captioner returned an empty caption; write one, or restore without a prompt.")
    return caption


def restore_image(
    pipe: FaithDiffSDXLPipeline,
    image: PIL.Image.Image | str | None,
    caption: str | None,
    upscale: float = 2,
    steps: float = 20,
    guidance: float = 5.0,
    seed: float | None = 42,
    start_point: str = "lr",
    color_fix: str | None = "adain",
    tile_size: float = 1024,
    progress: Progress | None = None,
) -> tuple[PIL.Image.Image, PIL.Image.Image, Path, str]:
    """Restores ``image`` (a path, as the app passes uploads, or a PIL image): returns (before, after, PNG path,
    caption used).

    The photo is read through :mod:`faithdiff_pipeline.image_io` (upright, in sRGB, 16-bit kept) and the PNG is
    written by ``image_io.save_result`` with what the photo had: its bit depth, greyscale, alpha and metadata. A
    non-empty ``caption`` is the prompt, unchanged. An empty one lets the pipeline decide, as ``pipe(prompt=None)``
    does: its captioner writes the prompt (returned, so that the box shows what was used), or, without a captioner,
    the prompt is empty. "Before" is the photo upscaled to the result's size with LANCZOS, as the pipeline upscales
    it, so that the two line up in the slider. Errors of the pipeline become ``gr.Error`` with their message.
    """
    _require_image(image, "restore it")
    steps = int(steps)
    generator = _generator(seed)
    try:
        source = _read(image)
        lq = source.pipeline_input()
        prompt = caption if caption and caption.strip() else None
        if prompt is None and pipe.captioner is not None:
            # Caption here instead of inside pipe(...) to show the caption; pipe.caption does not advance the
            # generator, so the result is the one pipe(prompt=None) gives.
            _report(progress, 0.0, "Captioning")
            prompt = pipe.caption(lq, generator=generator)[0]
        # Floats, not 8-bit PIL: a 16-bit photo's result keeps its 16 bits in the PNG.
        restored = pipe(
            lq,
            prompt=prompt or "",
            upscale=float(upscale),
            num_inference_steps=steps,
            guidance_scale=float(guidance),
            start_point=start_point,
            tile_size=int(tile_size),
            color_fix=color_fix,
            generator=generator,
            output_type="np",
            callback_on_step_end=_step_reporter(progress, steps),
        ).images[0]
        path = _save_result(restored, source)
    except (ValueError, TypeError, OSError) as error:
        raise gr.Error(str(error), title="Restoration failed") from error
    except torch.OutOfMemoryError as error:
        raise gr.Error(
            "Out of GPU memory: lower the upscale or the tile size, or restart the demo with --offload.",
            title="Out of memory",
        ) from error
    after = pipe.image_processor.numpy_to_pil(restored[None])[0]  # what output_type="pil" gives
    before = source.to_pil().resize(after.size, PIL.Image.LANCZOS)
    return before, after, path, prompt or ""


def _report(progress: Progress | None, value: float | tuple[int, int], desc: str) -> None:
    if progress is not None:
        progress(value, desc=desc, unit="steps")


def _step_reporter(progress: Progress | None, steps: int) -> Callable[..., dict] | None:
    """A ``callback_on_step_end`` that moves the progress bar once per diffusion step."""
    if progress is None:
        return None

    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        _report(progress, (step + 1, steps), "Denoising")
        return {}  # change nothing

    return on_step_end


def _read(image: PIL.Image.Image | str) -> ImageFile:
    """The photo as image_io reads it: an upload's file (16-bit, alpha, profile and EXIF as they are) or a PIL
    image."""
    return from_pil(image) if isinstance(image, PIL.Image.Image) else read_image(image)


def _save_result(restored: np.ndarray, source: ImageFile) -> Path:
    """Writes the result (float ``[H, W, 3]`` in [0, 1]) as a PNG with the source's bit depth, greyscale, alpha and
    metadata."""
    # One folder per result: concurrent users never overwrite each other, and every download has the same name.
    folder = _results_folder() / uuid.uuid4().hex
    folder.mkdir()
    return save_result(restored, folder / "faithdiff_restored.png", source=source)


def _option_controls() -> list[gr.components.Component]:
    """The pipeline's options, defaults from the release; the order is restore_image's."""
    with gr.Accordion("Options", open=True):
        with gr.Row():
            upscale = gr.Slider(1, 4, value=2, step=0.5, label="Upscale", elem_id="upscale")
            steps = gr.Slider(1, 50, value=20, step=1, label="Steps", elem_id="steps")
            guidance = gr.Slider(1, 10, value=5, step=0.5, label="Guidance (1: off)", elem_id="guidance")
        with gr.Row():
            seed = gr.Number(42, precision=0, label="Seed", elem_id="seed")
            tile_size = gr.Slider(
                64,
                2048,
                value=1024,
                step=64,
                label="Tile size (px)",
                info="smaller tiles need less GPU memory",
                elem_id="tile-size",
            )
        with gr.Row():
            start_point = gr.Radio(list(START_POINTS.items()), value="lr", label="Start point", elem_id="start-point")
            color_fix = gr.Radio(
                [(label, value or "none") for label, value in COLOR_FIXES.items()],
                value="adain",
                label="Colour fix",
                elem_id="color-fix",
            )
    return [upscale, steps, guidance, seed, start_point, color_fix, tile_size]


def build_demo(pipe: FaithDiffSDXLPipeline) -> gr.Blocks:
    """The demo's interface around ``pipe``: photo, caption, options, before/after and download."""
    has_captioner = pipe.captioner is not None and pipe.captioner_processor is not None
    placeholder = (
        "Empty: the captioner describes the photo when you restore. Or click Caption, then edit."
        if has_captioner
        else "Describe the photo (no captioner loaded; empty restores without a prompt)."
    )
    # Local demo: no usage statistics sent to gradio's servers.
    with gr.Blocks(title="FaithDiff photo restoration", analytics_enabled=False) as demo:
        gr.Markdown(
            "# FaithDiff: restore and upscale a photo\n"
            "Upload a low-quality photo, caption it (or write the caption), restore, then compare and download."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                # The uploaded file itself (type "filepath", no image_mode): gradio would reduce a 16-bit photo to
                # 8 bits and drop its alpha and profile; image_io reads them.
                image = gr.Image(
                    type="filepath",
                    image_mode=None,
                    label="Low-quality photo",
                    height=320,
                    sources=["upload", "clipboard"],
                    elem_id="input-image",
                )
                caption = gr.Textbox(label="Caption (prompt)", lines=3, placeholder=placeholder, elem_id="caption")
                with gr.Row():
                    caption_button = gr.Button("Caption", interactive=has_captioner, elem_id="caption-button")
                    restore_button = gr.Button("Restore", variant="primary", elem_id="restore-button")
                options = _option_controls()
            with gr.Column(scale=1):
                comparison = _comparison_outputs()
                download = gr.DownloadButton("Download PNG", interactive=False, elem_id="download")

        def on_caption(image: str | None, seed: float) -> str:
            return caption_image(pipe, image, seed)

        # gradio finds the progress bar by its default value, so it has to be gr.Progress() there.
        def on_restore(
            image: str | None,
            caption: str,
            upscale: float,
            steps: float,
            guidance: float,
            seed: float,
            start_point: str,
            color_fix: str,
            tile_size: float,
            progress: gr.Progress = gr.Progress(),
        ) -> list[Any]:
            before, after, path, used = restore_image(
                pipe,
                image,
                caption,
                upscale,
                steps,
                guidance,
                seed,
                start_point,
                None if color_fix == "none" else color_fix,
                tile_size,
                progress,
            )
            images = [(before, after)] if len(comparison) == 1 else [before, after]
            return [*images, gr.DownloadButton(value=str(path), interactive=True), used]

        # One queue for both buttons: the pipeline is not thread-safe, so a caption never runs beside a restoration.
        seed = options[3]
        caption_button.click(on_caption, [image, seed], caption, concurrency_id="pipeline")
        restore_button.click(
            on_restore, [image, caption, *options], [*comparison, download, caption], concurrency_id="pipeline"
        )
    return demo


def _comparison_outputs() -> list[gr.components.Component]:
    """A before/after slider where the installed gradio has one, else the two images side by side."""
    if hasattr(gr, "ImageSlider"):
        return [gr.ImageSlider(label="Before / after", type="pil", format="png", elem_id="comparison")]
    with gr.Row(elem_id="comparison"):
        return [gr.Image(label="Before", type="pil", format="png"), gr.Image(label="After", type="pil", format="png")]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def load_pipeline(
    model: str | None, captioner: str | None, device: str, dtype: torch.dtype, offload: bool = False
) -> FaithDiffSDXLPipeline:
    """The pipeline from ``model`` (default: the converted release, fp16 weights unless float32), with the
    captioner ``captioner`` attached if given, placed on ``device`` or offloaded to it."""
    variant = None if dtype == torch.float32 else "fp16"
    source = model if model is not None else converted_release(variant=variant)
    components = {}
    if captioner is not None:
        # Loaded on the CPU: pipe.to() or the offload hooks place it with the rest.
        loaded = load_captioner(captioner, dtype=dtype)
        components = {"captioner": loaded.model, "captioner_processor": loaded.processor}
    pipe = FaithDiffSDXLPipeline.from_pretrained(
        source, dtype=dtype, variant=variant if model is None else None, **components
    )
    if offload and device != "cpu":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="converted pipeline folder or Hub id (default: the release, converted)")
    parser.add_argument("--captioner", help="captioner model id or folder, e.g. llava-hf/llava-1.5-13b-hf")
    parser.add_argument("--device", default=None, help="torch device (default: cuda, else mps, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on a GPU, float32 on the CPU")
    parser.add_argument("--offload", action="store_true", help="model CPU offload (less GPU memory, slower)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    args = parser.parse_args(argv)
    args.device = args.device or default_device()
    args.dtype = DTYPES[args.dtype] if args.dtype else torch.float32 if args.device == "cpu" else torch.float16
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    pipe = load_pipeline(args.model, args.captioner, args.device, args.dtype, args.offload)
    build_demo(pipe).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
