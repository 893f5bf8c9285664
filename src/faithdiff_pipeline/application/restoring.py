"""Restoring the jobs of a run: one already-read photo through the pipeline, its files written, every job in turn.
The one restore loop of every engine and command; what a command writes per image is its :class:`JobOutputs`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .. import image_io
from . import locations
from .photos import DecodedPhotos
from .planning import Job
from .settings import RestorationSettings

if TYPE_CHECKING:
    import numpy as np
    import PIL.Image


class JobFailed(RuntimeError):
    """The job as a whole could not run: the pipeline did not load, a cluster could not be reached."""


@dataclass
class Summary:
    """What a run did: the names of the images done, skipped (already done) and failed (with the reason)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    # Set by the Ray engine: the deaths of worker processes it survived, and its pool's throughput is reported.
    worker_deaths: int = 0
    pooled: bool = False
    # The fidelity numbers of each result measured (see faithdiff_pipeline.fidelity), by image name.
    fidelity: dict[str, dict[str, Any]] = field(default_factory=dict)

    def below(self, threshold: float) -> list[str]:
        """The results whose consistency with their input (LR-PSNR, dB) is below ``threshold``."""
        return [name for name, numbers in self.fidelity.items() if float(numbers["lr_psnr"]) < threshold]

    def report(self) -> str:
        """The summary in a few lines, as the commands print it."""
        per_image = f", {self.seconds / len(self.done):.1f} s per image" if self.done else ""
        first = f"{len(self.done)} done, {len(self.skipped)} skipped (already restored), {len(self.failed)} failed{per_image}"
        if self.pooled and self.done and self.seconds > 0:
            first += f", {len(self.done) / self.seconds:.2f} images per second"
        if self.worker_deaths:
            first += (
                f"\n  {self.worker_deaths} worker process death(s): each worker was restarted and the work it had "
                "not finished was retried"
            )
        lines = [first, *(f"  failed: {name}: {reason}" for name, reason in self.failed)]
        lines += [f"  fidelity: {name}: {_fidelity_line(numbers)}" for name, numbers in self.fidelity.items()]
        return "\n".join(lines)


def _fidelity_line(numbers: dict[str, Any]) -> str:
    spread = f", seed spread {float(numbers['spread_mean']):.4f}" if "spread_mean" in numbers else ""
    return (f"LR-PSNR {float(numbers['lr_psnr']):.2f} dB, LR-SSIM {float(numbers['lr_ssim']):.4f}, added detail "
            f"{100 * float(numbers['added_detail_share']):.1f}%{spread}")


class JobOutputs(Protocol):
    """What a command makes of each restored photo."""

    def names(self, stem: str) -> list[str]:
        """The file names of the outputs of the input named ``stem``; the result first."""

    def check(self, job: Job, prompt: str) -> None:
        """Refuses (``ValueError``) a job that cannot succeed with ``prompt``, before any model loads."""

    def attach(self, pipe: Any) -> dict[str, Any]:
        """Readies the outputs for ``pipe`` once it is loaded; returns extra pipeline call arguments."""

    def write(self, job: Job, photo: image_io.ImageFile, restorations: list[np.ndarray], prompt: str,
              settings: RestorationSettings) -> dict[str, Any] | None:
        """Writes the outputs of ``job`` (local paths), the result last, from the restorations of ``photo`` (one per
        seed of ``settings.seeds``; the first is the result). Returns the result's fidelity numbers, if measured."""


def result_metadata(settings: RestorationSettings, name: str, prompt: str) -> dict[str, str]:
    """The text a result of the input ``name`` stores: its parameters and caption."""
    return {"parameters": json.dumps(settings.parameters(name, prompt)), "caption": prompt}


def side_by_side(lq: PIL.Image.Image, restored: PIL.Image.Image) -> PIL.Image.Image:
    """The LANCZOS upscale of ``lq`` beside ``restored``."""
    import PIL.Image

    upscaled = lq.convert("RGB").resize(restored.size, PIL.Image.LANCZOS)
    canvas = PIL.Image.new("RGB", (restored.width * 2, restored.height))
    canvas.paste(upscaled, (0, 0))
    canvas.paste(restored, (restored.width, 0))
    return canvas


@dataclass(frozen=True)
class ResultFiles:
    """The outputs of ``faithdiff-upscale``: the result in ``suffix``'s format; with ``compare`` a side-by-side
    ``NAME_compare.png``; with ``fidelity`` the fidelity maps beside it (heat maps and 16-bit raw maps; the spread
    with ``spread``)."""

    suffix: str = ".png"
    compare: bool = False
    fidelity: bool = False
    spread: bool = False

    def names(self, stem: str) -> list[str]:
        result = f"{stem}{self.suffix}"
        maps = self._map_names(result) if self.fidelity else []
        return [result] + ([f"{stem}_compare.png"] if self.compare else []) + maps

    def _map_names(self, result: str) -> list[str]:
        from ..fidelity import fidelity_map_paths

        return [path.name for path in fidelity_map_paths(result, spread=self.spread, raw=True).values()]

    def check(self, job: Job, prompt: str) -> None:
        return None

    def attach(self, pipe: Any) -> dict[str, Any]:
        return {}

    def write(self, job: Job, photo: image_io.ImageFile, restorations: list[np.ndarray], prompt: str,
              settings: RestorationSettings) -> dict[str, Any] | None:
        import PIL.Image

        restored, numbers = restorations[0], None
        metadata = result_metadata(settings, job.name, prompt)
        if self.fidelity:
            from ..fidelity import measure_fidelity, save_fidelity_maps

            spread = restorations if len(restorations) > 1 else None
            report = measure_fidelity(restored, photo.as_float(), seeds_results=spread)
            numbers = report.as_metadata()
            metadata["fidelity"] = json.dumps(numbers)
            save_fidelity_maps(report, restored, job.result, raw=True, text=metadata)
        if self.compare:
            restored_8bit = PIL.Image.fromarray((restored * 255.0).round().clip(0, 255).astype("uint8"))
            image_io.save_result(side_by_side(photo.to_pil(), restored_8bit), job.outputs[1], text=metadata)
        image_io.save_result(
            restored, job.result, source=photo, options=settings.output, text=metadata, signing=settings.signing
        )
        return numbers


def restore_photo(photo: image_io.ImageFile, prompt: str, settings: RestorationSettings, pipe: Any,
                  restoration: int = 0, **call_options: Any) -> np.ndarray:
    """``photo`` restored as ``settings`` say, float ``[H, W, 3]`` in [0, 1] (a 16-bit input keeps its 16 bits);
    ``restoration`` counts the seed on from ``settings.seed``; ``call_options`` go to the pipeline call as well."""
    arguments = {**settings.call_arguments(prompt, restoration), "output_type": "np", **call_options}
    return pipe(image=photo, **arguments).images[0]


def restore_jobs(
    jobs: list[Job],
    settings: RestorationSettings,
    pipe: Any,
    prompts: dict[str, str],
    outputs: JobOutputs,
    photos: DecodedPhotos | None = None,
    progress: bool = True,
    call_options: dict[str, Any] | None = None,
) -> Summary:
    """Restores every job and writes its outputs; an image that fails is listed in the summary and the run goes on.
    Jobs with local outputs only (an engine stages remote files). ``call_options`` are what ``outputs.attach(pipe)``
    gave, for a caller that attached them already."""
    from tqdm.auto import tqdm

    photos = photos or DecodedPhotos()
    call_options = outputs.attach(pipe) if call_options is None else call_options
    summary = Summary()
    start = time.perf_counter()
    for job in tqdm(jobs, desc="images", unit="image", disable=not progress):
        try:
            photo = photos.take(job.source)
            prompt = prompts.get(job.source, "")
            restorations = [
                restore_photo(photo, prompt, settings, pipe, index, **call_options) for index in range(settings.seeds)
            ]
            numbers = outputs.write(job, photo, restorations, prompt, settings)
        except (ValueError, TypeError, OSError, RuntimeError) as error:
            summary.failed.append((job.name, str(error).splitlines()[0] if str(error) else type(error).__name__))
            continue
        summary.done.append(job.name)
        if numbers is not None:
            summary.fidelity[job.name] = numbers
    summary.seconds = time.perf_counter() - start
    return summary


def load_restoration_pipeline(settings: RestorationSettings, device: Any) -> Any:
    """The pipeline as ``settings`` set it up, on ``device``: one call for every engine, so that they never differ.
    A pipeline that cannot load raises :class:`JobFailed` with the reason in one line."""
    from .. import loading

    try:
        return loading.load_pipeline(
            settings.model,
            device,
            loading.resolve_dtype(settings.dtype, device),
            offload=settings.offload,
            compile=settings.compile,
            fp8=settings.fp8,
            low_vram=settings.low_vram,
            vae_tiling=settings.vae_tiling,
        )
    except (ValueError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise JobFailed(f"could not load the pipeline: {reason}") from error


def is_local(job: Job) -> bool:
    return not any(locations.is_uri(location) for location in (job.source, *job.outputs))
