"""Web demo: restore and upscale a photo with FaithDiff in the browser.

Upload a photo, let the captioner describe it (or write the caption yourself), restore it, compare before and after
with the slider and download the PNG, which keeps the photo's bit depth (8 or 16), greyscale, alpha and metadata, as
faithdiff-upscale writes it. With "Measure fidelity", the result's fidelity to the photo (LR-PSNR, LR-SSIM, the share
of added detail; see docs/fidelity.md) is shown beside it, its consistency or added-detail map laid over it, and kept
in the PNG's metadata as ``faithdiff-upscale --fidelity`` keeps it. Needs gradio (``pip install
"faithdiff-pipeline[demo]"``).

The device, dtype, weights, captioner and offload are chosen by :mod:`faithdiff_pipeline.loading`, as
faithdiff-upscale chooses them: by default the release's LLaVA-1.5-13B captions on a CUDA GPU that can hold it (in
8 or 4 bits if that is what fits), and nothing captions elsewhere. The captioner is kept apart from the pipeline:
a request is captioned first, then restored, and where the GPU cannot hold both, the captioner is on it only while
it captions. The same photo and seed give the same caption as ``faithdiff-upscale --seed`` and ``pipe.caption``.

    python examples/gradio_demo.py                                # the official release, converted on first use
    python examples/gradio_demo.py --captioner llava-hf/llava-1.5-7b-hf --captioner-quantization 4bit
    python examples/gradio_demo.py --model ./faithdiff-sdxl --captioner none --offload --port 7861
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import functools
import json
import math
import shutil
import socket
import sys
import tempfile
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch

from faithdiff_pipeline import FaithDiffSDXLPipeline, loading
from faithdiff_pipeline.captioning import Captioner
from faithdiff_pipeline.fidelity import HEAT_FULL_SCALE, FidelityReport, fidelity_heat_map, measure_fidelity
from faithdiff_pipeline.application.options import OPTIONS
from faithdiff_pipeline.application.restoring import restore_photo, result_metadata
from faithdiff_pipeline.application.settings import RestorationSettings
from faithdiff_pipeline.image_io import ImageFile, from_pil, read_image, save_result

try:
    import gradio as gr
except ImportError as error:  # gradio is an optional extra: say how to get it instead of a bare ImportError
    raise ImportError(
        'The web demo needs gradio: pip install "faithdiff-pipeline[demo]" (or pip install gradio).'
    ) from error

PROG = "gradio_demo.py"
START_POINTS = {"From the photo (release)": "lr", "From pure noise": "noise"}
COLOR_FIXES = {"AdaIN (release)": "adain", "Wavelet": "wavelet", "None": None}
# The maps of FidelityReport.maps() that a single restoration has (the seed spread needs several).
FIDELITY_MAPS = {"Consistency": "consistency", "Added detail": "added_detail"}
# faithdiff-upscale's heat maps are drawn at fidelity_heat_map's default opacity; the page starts from the same look.
DEFAULT_MAP_OPACITY = 0.75
# The guide to the numbers, in a checkout of the repository; the app serves this one file so that its link opens.
FIDELITY_GUIDE = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"
_GIB = 1024**3
# A progress reporter: gr.Progress in the app, anything with the same call signature in tests.
Progress = Callable[..., Any]


@dataclass
class DemoModels:
    """The restoration pipeline and the captioner that the demo serves, kept apart (the captioner is no component of
    the pipeline), so that a request is captioned first and restored after, as faithdiff-upscale does for a job.

    Attributes:
        pipe: The restoration pipeline.
        captioner: The captioner, or ``None`` (no captions, or one that is loaded for each caption).
        device: Where the models run.
        swap: The GPU cannot hold the captioner beside the pipeline: the captioner waits in host memory and is on
            the device only while it captions, with the pipeline's models off it meanwhile.
        offloaded: The pipeline's models wait in host memory between calls (``--offload``).
        load_captioner: Loads the captioner on the device, for a quantised captioner under ``swap``: bitsandbytes
            weights cannot wait in host memory, so it is loaded for each caption and freed after.
    """

    pipe: FaithDiffSDXLPipeline
    captioner: Captioner | None = None
    device: torch.device = torch.device("cpu")
    swap: bool = False
    offloaded: bool = False
    load_captioner: Callable[[], Captioner] | None = None

    @property
    def can_caption(self) -> bool:
        return self.captioner is not None or self.load_captioner is not None

    def caption(self, image: PIL.Image.Image, seed: int) -> str:
        """The prompt for ``image``: ``Captioner.caption([image], seed=seed)[0]``, which is what faithdiff-upscale
        writes with ``--seed seed`` and ``pipe.caption(image, torch.Generator().manual_seed(seed))`` gives."""
        if not self.can_caption:
            raise ValueError("This demo has no captioner; pass `caption` or start it with --captioner MODEL.")
        if not self.swap:
            return self.captioner.caption([image], seed=seed)[0]
        with self._captioner_alone_on_device() as captioner:
            return captioner.caption([image], seed=seed)[0]

    @contextlib.contextmanager
    def _captioner_alone_on_device(self) -> Iterator[Captioner]:
        """The captioner on the device with the pipeline's models off it; both back where they were afterwards, even
        when captioning fails."""
        # Offloaded models are already in host memory between calls; moving them would undo the offload hooks.
        move_pipeline = not self.offloaded
        if move_pipeline:
            self.pipe.to("cpu")
            _empty_cache(self.device)
        try:
            if self.load_captioner is not None:
                captioner = self.load_captioner()
                try:
                    yield captioner
                finally:
                    loading.release(captioner)
            else:
                self.captioner.model.to(self.device)
                try:
                    yield self.captioner
                finally:
                    self.captioner.model.to("cpu")
                    _empty_cache(self.device)
        finally:
            if move_pipeline:
                self.pipe.to(self.device)


def _empty_cache(device: torch.device) -> None:
    # Without this, the memory of the models that left stays reserved by torch and the next model cannot use it.
    if device.type == "cuda":
        torch.cuda.empty_cache()


def captioner_fits_beside(
    plan: loading.CaptionerPlan, device: torch.device, free_memory: int | None, offloaded: bool = False
) -> bool:
    """Whether the captioner of ``plan`` can stay on ``device`` beside the loaded pipeline, ``free_memory`` bytes
    being free there with the pipeline loaded (``None`` off CUDA).

    Off CUDA it always can: the CPU's memory (and MPS's, shared with it) is one pool, so moving would only cost
    time. On CUDA, it needs :data:`loading.CAPTIONER_MEMORY_GIB` in its precision. A model of unknown size, or a
    pipeline that is offloaded (its models come onto the GPU during each restoration, which ``free_memory`` does not
    show), keeps the captioner off the GPU except while it captions.
    """
    if device.type != "cuda":
        return True
    needs = loading.CAPTIONER_MEMORY_GIB.get(plan.model, {}).get(plan.precision)
    return not offloaded and needs is not None and free_memory is not None and needs * _GIB <= free_memory


def load_models(
    model: str | None,
    device: torch.device,
    dtype: torch.dtype,
    plan: loading.CaptionerPlan,
    offload: bool = False,
) -> DemoModels:
    """The pipeline from ``model`` (default: the converted release) on ``device`` or offloaded to it, and the
    captioner of ``plan``, where the GPU memory left after the pipeline decides (:func:`captioner_fits_beside`)."""
    # Everything is in host memory on the CPU already: model offload would only add hooks.
    offloaded = offload and device.type != "cpu"
    pipe = loading.load_pipeline(model, device, dtype, offload="model" if offloaded else "none")
    models = DemoModels(pipe, device=device, offloaded=offloaded)
    if plan.model is None:
        return models
    free = loading.free_gpu_memory(device) if device.type == "cuda" else None
    if captioner_fits_beside(plan, device, free, offloaded):
        models.captioner = loading.load_planned_captioner(plan, device, dtype)
        return models
    models.swap = True
    if plan.quantization is None:
        models.captioner = loading.load_planned_captioner(plan, torch.device("cpu"), dtype)
        how = "it moves onto the GPU for each caption"
    else:
        models.load_captioner = functools.partial(loading.load_planned_captioner, plan, device, dtype)
        how = f"it is loaded ({plan.precision}) for each caption"
    if offloaded:
        why = "the pipeline is offloaded"
    elif plan.model in loading.CAPTIONER_MEMORY_GIB:
        why = f"{free / _GIB:.1f} GiB free"
    else:
        why = "its size is unknown"
    print(f"{PROG}: captioner {plan.model} cannot stay on the GPU beside the pipeline ({why}): {how}", file=sys.stderr)
    return models


@functools.cache
def _results_folder() -> Path:
    # Results are written here for the download button; gradio copies them into its own cache, so the folder only
    # has to outlive the process.
    folder = Path(tempfile.mkdtemp(prefix="faithdiff-demo-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _seed(seed: float | None) -> int:
    if seed is None:  # a cleared number box
        raise gr.Error("Enter a seed (a whole number).", title="No seed")
    return int(seed)


def _require_image(image: PIL.Image.Image | str | None, action: str) -> None:
    if image is None:
        raise gr.Error(f"Upload a photo first, then {action}.", title="No photo")


def caption_image(models: DemoModels, image: PIL.Image.Image | str | None, seed: float | None = 42) -> str:
    """The captioner's prompt for ``image`` (the release's LLaVA request and post-processing), for the caption box;
    sampled with ``seed``, so that the same photo and seed give the same caption here, in faithdiff-upscale and in
    ``pipe.caption``."""
    _require_image(image, "ask for a caption")
    if not models.can_caption:
        raise gr.Error(
            "This demo was started without a captioner (start it with --captioner MODEL), so write the caption "
            "yourself, or leave it empty to restore without a prompt.",
            title="No captioner",
        )
    seed = _seed(seed)
    try:
        # The 8-bit RGB photo, as faithdiff-upscale gives it to the captioner.
        caption = models.caption(_read(image).to_pil(), seed)
    except (ValueError, TypeError, OSError) as error:
        raise gr.Error(str(error), title="Captioning failed") from error
    except torch.OutOfMemoryError as error:
        raise gr.Error(
            "Out of GPU memory while captioning: restart the demo with --captioner-quantization 4bit, or write the "
            "caption yourself.",
            title="Out of memory",
        ) from error
    if not caption:
        gr.Warning("The captioner returned an empty caption; write one, or restore without a prompt.")
    return caption


@dataclass(frozen=True)
class Restoration:
    """One restored photo, as the page shows it.

    Attributes:
        before: The photo upscaled to the result's size with LANCZOS, as the pipeline upscales it, so that the two
            line up in the slider.
        after: The result in 8 bits, what ``output_type="pil"`` gives.
        path: The PNG offered for download.
        caption: The prompt used: the box's, or the captioner's when the box was empty.
        result: The result as the pipeline returned it, float ``[H, W, 3]`` in [0, 1] (16 bits kept); the PNG and
            the fidelity are of it.
        fidelity: The result's fidelity to the photo, when it was measured.
    """

    before: PIL.Image.Image
    after: PIL.Image.Image
    path: Path
    caption: str
    result: np.ndarray
    fidelity: FidelityReport | None = None


def restore(
    models: DemoModels,
    image: PIL.Image.Image | str | None,
    caption: str | None,
    upscale: float = OPTIONS["upscale"].default,
    steps: float = OPTIONS["steps"].default,
    guidance: float = OPTIONS["guidance"].default,
    seed: float | None = OPTIONS["seed"].default,
    start_point: str = OPTIONS["start_point"].default,
    color_fix: str | None = OPTIONS["color_fix"].default,
    tile_size: float = OPTIONS["tile_size"].default,
    fidelity: bool = False,
    progress: Progress | None = None,
) -> Restoration:
    """Restores ``image`` (a path, as the app passes uploads, or a PIL image) and, with ``fidelity``, measures the
    result's fidelity to it.

    The photo is read through :mod:`faithdiff_pipeline.image_io` (upright, in sRGB, 16-bit kept), restored by the
    application layer with the same settings, seeds and result metadata as faithdiff-upscale, and the PNG is written
    with what the photo had: its bit depth, greyscale, alpha and metadata, and the provenance of the result. A
    non-empty ``caption`` is the prompt, unchanged. An empty one is filled by the captioner first (returned, so that
    the box shows what was used), with the caption that ``caption_image`` gives for the same seed; without a
    captioner, the prompt is empty. The result is the one that a pipeline holding the same captioner gives with
    ``pipe(prompt=None)``. Fidelity is measured as ``faithdiff-upscale --fidelity`` measures it (the float result
    against the photo's colour) and its numbers are stored in the PNG's ``fidelity`` text; a photo it cannot measure
    (under 11 pixels a side) is restored all the same, with a warning. Errors of the pipeline become ``gr.Error``
    with their message.
    """
    _require_image(image, "restore it")
    pipe = models.pipe
    try:
        settings = RestorationSettings.from_options(
            upscale=float(upscale),
            steps=int(steps),
            guidance=float(guidance),
            seed=_seed(seed),
            start_point=start_point,
            color_fix=color_fix or "none",
            tile_size=int(tile_size),
        )
        source = _read(image)
        prompt = caption if caption and caption.strip() else None
        if prompt is None and models.can_caption:
            _report(progress, 0.0, "Captioning")
            prompt = models.caption(source.to_pil(), settings.seed)
        # Floats, not 8-bit PIL: a 16-bit photo's result keeps its 16 bits in the PNG.
        reporter = _step_reporter(progress, settings.steps)
        restored = restore_photo(source, prompt or "", settings, pipe, callback_on_step_end=reporter)
        report = _measure(restored, source, progress) if fidelity else None
        path = _save_result(restored, source, settings, prompt or "", report)
    except (ValueError, TypeError, OSError) as error:
        raise gr.Error(str(error), title="Restoration failed") from error
    except torch.OutOfMemoryError as error:
        raise gr.Error(
            "Out of GPU memory: lower the upscale or the tile size, or restart the demo with --offload.",
            title="Out of memory",
        ) from error
    after = pipe.image_processor.numpy_to_pil(restored[None])[0]  # what output_type="pil" gives
    before = source.to_pil().resize(after.size, PIL.Image.LANCZOS)
    return Restoration(before, after, path, prompt or "", restored, report)


def restore_image(
    models: DemoModels,
    image: PIL.Image.Image | str | None,
    caption: str | None,
    upscale: float = OPTIONS["upscale"].default,
    steps: float = OPTIONS["steps"].default,
    guidance: float = OPTIONS["guidance"].default,
    seed: float | None = OPTIONS["seed"].default,
    start_point: str = OPTIONS["start_point"].default,
    color_fix: str | None = OPTIONS["color_fix"].default,
    tile_size: float = OPTIONS["tile_size"].default,
    progress: Progress | None = None,
) -> tuple[PIL.Image.Image, PIL.Image.Image, Path, str]:
    """:func:`restore` without fidelity: returns (before, after, PNG path, caption used)."""
    restoration = restore(
        models, image, caption, upscale, steps, guidance, seed, start_point, color_fix, tile_size, progress=progress
    )
    return restoration.before, restoration.after, restoration.path, restoration.caption


def _measure(restored: np.ndarray, source: ImageFile, progress: Progress | None) -> FidelityReport | None:
    _report(progress, None, "Measuring fidelity")
    try:
        # The photo's colour as the pipeline took it, in sRGB: what faithdiff-upscale --fidelity measures against.
        return measure_fidelity(restored, source.as_float())
    except ValueError as error:
        # Only a photo too small for LR-SSIM's window gets here; its restoration is still worth having.
        gr.Warning(f"Fidelity not measured: {error}")
        return None


def fidelity_layer(
    after: PIL.Image.Image,
    report: FidelityReport,
    map_name: str = "consistency",
    opacity: float = DEFAULT_MAP_OPACITY,
) -> PIL.Image.Image:
    """The map ``map_name`` of ``report`` (a key of :meth:`FidelityReport.maps`) laid over the result ``after`` as
    faithdiff-upscale --fidelity draws its heat maps, in 8 bits at the result's size, with the colour at ``opacity``
    where the map is at its full scale."""
    heat = fidelity_heat_map(after, report.maps()[map_name], HEAT_FULL_SCALE[map_name], float(opacity))
    return PIL.Image.fromarray((heat * 255.0).round().astype(np.uint8))


def fidelity_summary(report: FidelityReport | None) -> str:
    """The numbers of ``report`` in Markdown, with a line on how to read them and the link to the guide."""
    if report is None:
        return "Fidelity not measured: tick *Measure fidelity* and restore."
    lr_psnr = f"{report.lr_psnr:.2f}" if math.isfinite(report.lr_psnr) else "∞"
    return (
        f"**LR-PSNR {lr_psnr} dB** · **LR-SSIM {report.lr_ssim:.4f}** · "
        f"**added detail {100 * report.added_detail_share:.1f} %** of the pixels\n\n"
        "Higher LR-PSNR and LR-SSIM: the result, reduced to the photo's size, is closer to the photo (a plain "
        "upscale scores about 42–47 dB); added detail is detail finer than the photo's pixels, drawn by the model, "
        f"which they cannot judge. {_guide_link()}"
    )


def _guide_link() -> str:
    if not FIDELITY_GUIDE.is_file():  # the example copied out of the repository
        return "More in docs/fidelity.md of the FaithDiff pipeline."
    # Relative, so that it also opens where the app is served under a path (behind a proxy, or mounted).
    return f"[How to read them (docs/fidelity.md)](gradio_api/file={urllib.parse.quote(str(FIDELITY_GUIDE))})"


def _report(progress: Progress | None, value: float | tuple[int, int] | None, desc: str) -> None:
    """Moves the progress bar to ``value``; ``None`` shows ``desc`` alone, for work without steps."""
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


def _save_result(
    restored: np.ndarray,
    source: ImageFile,
    settings: RestorationSettings,
    prompt: str,
    report: FidelityReport | None = None,
) -> Path:
    """Writes the result (float ``[H, W, 3]`` in [0, 1]) as a PNG with the source's bit depth, greyscale, alpha and
    metadata, and faithdiff-upscale's parameters and provenance (with ``report``, its fidelity numbers too)."""
    # One folder per result: concurrent users never overwrite each other, and every download has the same name.
    folder = _results_folder() / uuid.uuid4().hex
    folder.mkdir()
    name = source.path.name if source.path is not None else "upload.png"
    metadata = result_metadata(settings, name, prompt)
    if report is not None:
        metadata["fidelity"] = json.dumps(report.as_metadata())
    return save_result(restored, folder / "faithdiff_restored.png", source=source, options=settings.output,
                       text=metadata)


def _option_controls() -> list[gr.components.Component]:
    """The pipeline's options, defaults from the release; the order is restore_image's."""
    with gr.Accordion("Options", open=True):
        with gr.Row():
            upscale = gr.Slider(1, 4, value=OPTIONS["upscale"].default, step=0.5, label="Upscale", elem_id="upscale")
            steps = gr.Slider(1, 50, value=OPTIONS["steps"].default, step=1, label="Steps", elem_id="steps")
            guidance = gr.Slider(
                1, 10, value=OPTIONS["guidance"].default, step=0.5, label="Guidance (1: off)", elem_id="guidance"
            )
        with gr.Row():
            seed = gr.Number(OPTIONS["seed"].default, precision=0, label="Seed", elem_id="seed")
            tile_size = gr.Slider(
                64,
                2048,
                value=OPTIONS["tile_size"].default,
                step=64,
                label="Tile size (px)",
                info="smaller tiles need less GPU memory",
                elem_id="tile-size",
            )
        with gr.Row():
            start_point = gr.Radio(
                list(START_POINTS.items()),
                value=OPTIONS["start_point"].default,
                label="Start point",
                elem_id="start-point",
            )
            color_fix = gr.Radio(
                [(label, value or "none") for label, value in COLOR_FIXES.items()],
                value=OPTIONS["color_fix"].default,
                label="Colour fix",
                elem_id="color-fix",
            )
    return [upscale, steps, guidance, seed, start_point, color_fix, tile_size]


def build_demo(models: DemoModels) -> gr.Blocks:
    """The demo's interface around ``models``: photo, caption, options, before/after, download and fidelity."""
    has_captioner = models.can_caption
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
                measure, map_name, opacity, layer, numbers = _fidelity_outputs()
        # The result and its report, for drawing another map or opacity without measuring again.
        measured = gr.State()

        def on_caption(image: str | None, seed: float) -> str:
            return caption_image(models, image, seed)

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
            fidelity: bool,
            map_name: str,
            opacity: float,
            progress: gr.Progress = gr.Progress(),
        ) -> list[Any]:
            restoration = restore(
                models,
                image,
                caption,
                upscale,
                steps,
                guidance,
                seed,
                start_point,
                None if color_fix == "none" else color_fix,
                tile_size,
                fidelity=fidelity,
                progress=progress,
            )
            before, after, report = restoration.before, restoration.after, restoration.fidelity
            images = [(before, after)] if len(comparison) == 1 else [before, after]
            view = None if report is None else (after, report)
            return [
                *images,
                gr.DownloadButton(value=str(restoration.path), interactive=True),
                restoration.caption,
                on_map(view, map_name, opacity),
                fidelity_summary(report),
                view,
            ]

        def on_map(view: tuple[PIL.Image.Image, FidelityReport] | None, map_name: str, opacity: float) -> Any:
            if view is None:
                return None
            after, report = view
            shown = fidelity_layer(after, report, map_name, opacity)
            return shown if type(layer) is gr.Image else (after, shown)

        # One queue for both buttons: the models are not thread-safe, and a caption may move them between the GPU
        # and host memory, so a caption never runs beside a restoration.
        seed = options[3]
        caption_button.click(on_caption, [image, seed], caption, concurrency_id="pipeline")
        restore_button.click(
            on_restore,
            [image, caption, *options, measure, map_name, opacity],
            [*comparison, download, caption, layer, numbers, measured],
            concurrency_id="pipeline",
        )
        # Drawing a map needs no model, so it does not wait behind a restoration; while the opacity is dragged, only
        # the last value is drawn.
        gr.on(
            [map_name.change, opacity.change],
            on_map,
            [measured, map_name, opacity],
            layer,
            trigger_mode="always_last",
        )
    return demo


def _comparison_outputs() -> list[gr.components.Component]:
    """A before/after slider where the installed gradio has one, else the two images side by side."""
    if hasattr(gr, "ImageSlider"):
        return [gr.ImageSlider(label="Before / after", type="pil", format="png", elem_id="comparison")]
    with gr.Row(elem_id="comparison"):
        return [gr.Image(label="Before", type="pil", format="png"), gr.Image(label="After", type="pil", format="png")]


def _fidelity_outputs() -> tuple[gr.Checkbox, gr.Radio, gr.Slider, gr.components.Component, gr.Markdown]:
    """The fidelity controls, the result with its map laid over it (a slider between the two where the installed
    gradio has one, else the map alone) and the numbers."""
    if FIDELITY_GUIDE.is_file():
        gr.set_static_paths([FIDELITY_GUIDE])  # that one file, for the numbers' link
    with gr.Accordion("Fidelity to the photo", open=True, elem_id="fidelity"):
        if hasattr(gr, "ImageSlider"):
            layer = gr.ImageSlider(label="Result / fidelity map", type="pil", format="png", elem_id="fidelity-layer")
        else:
            layer = gr.Image(label="Fidelity map", type="pil", format="png", elem_id="fidelity-layer")
        numbers = gr.Markdown(elem_id="fidelity-numbers")
        with gr.Row():
            measure = gr.Checkbox(
                value=True,
                label="Measure fidelity",
                info="a few seconds per megapixel of the result, on the CPU",
                elem_id="measure-fidelity",
            )
            map_name = gr.Radio(
                list(FIDELITY_MAPS.items()), value="consistency", label="Map", elem_id="fidelity-map"
            )
            opacity = gr.Slider(
                0, 1, value=DEFAULT_MAP_OPACITY, step=0.05, label="Map opacity", elem_id="fidelity-opacity"
            )
    return measure, map_name, opacity, layer, numbers


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="converted pipeline folder or Hub id (default: the release, converted)")
    parser.add_argument(
        "--captioner",
        default="auto",
        help="auto (default): the release's llava-hf/llava-1.5-13b-hf on a CUDA GPU that holds it, as "
        "faithdiff-upscale; any LLaVA-family id or folder; none: no captioner",
    )
    parser.add_argument(
        "--captioner-quantization",
        choices=["auto", *loading.CAPTIONER_PRECISIONS],
        default="auto",
        help="captioner precision: auto (by free GPU memory), half, 8bit or 4bit (bitsandbytes, the [caption] extra)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--dtype",
        choices=["auto", *loading.DTYPE_NAMES],
        default="auto",
        help="auto: float16 on a GPU, float32 on the CPU",
    )
    parser.add_argument(
        "--offload", action="store_true", help="model CPU offload (less GPU memory, slower; the [offload] extra)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, loading.CaptionerPlan]:
    """The device, dtype and captioner plan of ``args``, decided by :mod:`faithdiff_pipeline.loading` as
    faithdiff-upscale decides them; raises ``ValueError`` (one line, naming the option) before any model loads."""
    if args.captioner == "none" and args.captioner_quantization != "auto":
        raise ValueError("--captioner none loads no captioner; drop --captioner-quantization")
    try:
        loading.check_options("model" if args.offload else "none", args.captioner_quantization)
        loading.check_model_source(args.model)
    except ValueError as error:
        raise ValueError(str(error).replace("`model`", "--model").replace("offload 'model'", "--offload")) from error
    try:
        device = loading.resolve_device(args.device)
    except ValueError as error:
        raise ValueError(str(error).replace("`device`", "--device")) from error
    dtype = loading.resolve_dtype(args.dtype, device)
    plan = loading.plan_captioner(args.captioner or "auto", device, args.captioner_quantization)
    check_port(args.host, args.port)
    return device, dtype, plan


def check_port(host: str, port: int) -> None:
    """Refuses, in one line naming --host/--port, an address the demo could not serve on: a port in use (a second
    copy of the demo, say), out of range, or a host that is not this machine's. gradio would find out only after
    the models have loaded, and name its own options."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {port}.")
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ValueError(f"--host {host!r} is not an address of this machine ({error.strerror}).") from error
    with socket.socket(family, kind, protocol) as probe:
        # As the server binds: an address left in TIME_WAIT by a demo that has exited is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ValueError(
                    f"port {port} on {host} is in use (another copy of the demo?); pass --port with a free port, "
                    f"e.g. --port {port + 1 if port < 65535 else 7860}."
                ) from error
            raise ValueError(
                f"cannot serve on {host} port {port} ({error.strerror}); pass another --host or --port."
            ) from error


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device, dtype, plan = check_arguments(args)
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    if plan.note:
        print(f"{PROG}: {plan.note}", file=sys.stderr)
    try:
        models = load_models(args.model, device, dtype, plan, args.offload)
    except (ValueError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"{PROG}: error: could not load the models: {reason}", file=sys.stderr)
        return 2
    build_demo(models).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
