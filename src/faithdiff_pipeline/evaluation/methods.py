"""The methods ``faithdiff-eval`` compares: the LANCZOS baseline, FaithDiff pipelines run here, and folders of results
made elsewhere. :func:`parse_method` builds one from its ``--method`` text; each method is given what it needs of a
run as a :class:`MethodContext` (the set, the output folder, the device and the :class:`SamplingSettings`)."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import PIL.Image

from .. import loading
from .. import release_settings as release
from ..checks import check_choice, check_integer, check_tile_arguments, is_real
from ..image_io import image_size, read_image
from .datasets import ImagePair, PairedSet, format_names, list_images, missing_names

if TYPE_CHECKING:
    import numpy as np
    import torch

SETTINGS_NAME = "settings.json"
_METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# Where FaithDiff's prompts come from: one fixed prompt, or each LQ image's caption sidecar.
CAPTION_SOURCES = ("fixed", "sidecar")


@dataclass(frozen=True)
class SamplingSettings:
    """How the ``faithdiff=`` methods sample, checked once where they are made (a ``ValueError`` naming the setting).

    Attributes:
        steps: Denoising steps (the release's 20 by default).
        upscale: The upscale factor; ``None`` takes the set's scale.
        sample_seed: The seed of every image's sampling (the same for each, so that one image's result does not
            depend on the others).
        prompt: One prompt for every image (``captions="fixed"``).
        captions: ``"fixed"`` (``prompt`` for every image) or ``"sidecar"`` (each LQ image's caption sidecar).
        tile_size: The latent tile size in pixels (the release's 1024 by default).
        variant: The weights variant to load; ``None`` lets :func:`faithdiff_pipeline.loading.weights_variant`
            choose by the dtype.
    """

    steps: int = release.NUM_INFERENCE_STEPS
    upscale: float | None = None
    sample_seed: int = 0
    prompt: str = ""
    captions: str = "fixed"
    tile_size: int = release.TILE_SIZE
    variant: str | None = None

    def __post_init__(self) -> None:
        check_integer(self.steps, "steps", 1)
        check_integer(self.sample_seed, "sample_seed")
        if self.upscale is not None and not (is_real(self.upscale) and self.upscale > 0):
            raise ValueError(f"`upscale` must be a number > 0, got {self.upscale}.")
        check_choice(self.captions, "captions", CAPTION_SOURCES)
        if self.captions == "sidecar" and self.prompt:
            raise ValueError("`prompt` gives one prompt for every image; it conflicts with `captions` sidecar.")
        check_tile_arguments(self.tile_size, None)


@dataclass(frozen=True)
class MethodContext:
    """What the methods need of a run: the set, the folder of the reports (results go to ``out/results/<name>``),
    the device and dtype, the sampling settings, and whether results of ours are made again (``overwrite``)."""

    dataset: PairedSet
    out: Path
    device: torch.device
    dtype: torch.dtype
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    overwrite: bool = False


class EvaluationMethod(ABC):
    """A method to evaluate, named ``name`` in the reports; ``results`` maps each image of the set to the file its
    result is (or will be) in."""

    kind: ClassVar[str]

    def __init__(self, name: str, source: str | None = None) -> None:
        self.name = name
        self.source = source
        self.results: dict[str, Path] = {}

    @abstractmethod
    def prepare(self, context: MethodContext) -> None:
        """Fixes where each result is and checks what can be checked before any image is processed."""

    def todo(self, context: MethodContext) -> list[ImagePair]:
        """The images this method still has to restore."""
        return []

    def load(self, context: MethodContext) -> None:
        """Loads what restoring needs, before any image is processed, so that a wrong path fails at once."""


class ComputedMethod(EvaluationMethod):
    """A method whose results are made here, under ``<out>/results/<name>``; ``settings`` is what they depend on
    (written to ``settings.json`` and checked when a run resumes)."""

    def __init__(self, name: str, source: str | None = None) -> None:
        super().__init__(name, source)
        self.settings: dict[str, Any] = {}

    def prepare(self, context: MethodContext) -> None:
        folder = self.folder(context)
        self.results = {pair.name: folder / f"{pair.name}.png" for pair in context.dataset.pairs}
        lq_dir = str(context.dataset.lq_dir.resolve())
        self.settings = {"method": self.kind, "lq_dir": lq_dir, **self.own_settings(context)}
        check_results_folder(folder, self.settings, context.overwrite)

    def folder(self, context: MethodContext) -> Path:
        return context.out / "results" / self.name

    def own_settings(self, context: MethodContext) -> dict[str, Any]:
        """The settings that only this kind of method has."""
        return {}

    def todo(self, context: MethodContext) -> list[ImagePair]:
        """The images still to restore (all of them with ``--overwrite``)."""
        return [p for p in context.dataset.pairs if context.overwrite or not self.results[p.name].is_file()]

    @abstractmethod
    def restore(self, pair: ImagePair) -> PIL.Image.Image | np.ndarray:
        """The result of one image of the set: an 8-bit RGB image, or float ``[H, W, 3]`` in [0, 1]."""


class LanczosMethod(ComputedMethod):
    """The baseline: the LQ image upscaled to the HQ size with LANCZOS."""

    kind = "lanczos"

    def __init__(self) -> None:
        super().__init__("lanczos")

    def restore(self, pair: ImagePair) -> PIL.Image.Image:
        return read_image(pair.lq).to_pil().resize(pair.hq_size, PIL.Image.LANCZOS)


class FaithDiffMethod(ComputedMethod):
    """A FaithDiff pipeline (a folder or Hub id, ``source``) run here with the command's sampling settings."""

    kind = "faithdiff"

    def __init__(self, name: str, source: str) -> None:
        super().__init__(name, source)
        self.pipeline: Any = None

    def prepare(self, context: MethodContext) -> None:
        try:
            loading.check_model_source(self.source)
        except ValueError as error:
            raise ValueError(str(error).replace("`model`", f"`--method {self.name}`")) from error
        super().prepare(context)

    def own_settings(self, context: MethodContext) -> dict[str, Any]:
        sampling, dataset = context.sampling, context.dataset
        upscale = sampling.upscale if sampling.upscale is not None else dataset.scale
        for pair in dataset.pairs:
            output = (round(pair.lq_size[0] * upscale), round(pair.lq_size[1] * upscale))
            if output != pair.hq_size:
                raise ValueError(
                    f"`upscale` {upscale} turns LQ image {pair.name!r} ({pair.lq_size[0]}x{pair.lq_size[1]}) into "
                    f"{output[0]}x{output[1]}, but its HQ image is {pair.hq_size[0]}x{pair.hq_size[1]}; "
                    f"use the set's scale {dataset.scale}."
                )
        source = Path(self.source)
        # The names of settings.json, which a resumed run compares: kept as they have always been written.
        return {
            "pipeline": str(source.resolve()) if source.exists() else self.source,
            "variant": sampling.variant,
            "dtype": str(context.dtype).removeprefix("torch."),
            "steps": sampling.steps,
            "upscale": upscale,
            "seed": sampling.sample_seed,
            "prompt": sampling.prompt,
            "captions": sampling.captions,
            "tile_size": sampling.tile_size,
        }

    def load(self, context: MethodContext) -> None:
        try:
            self.pipeline = load_faithdiff(self.source, context.sampling.variant, context.device, context.dtype)
        except (OSError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"`--method faithdiff={self.source}` could not be loaded: {reason}") from error
        self.pipeline.set_progress_bar_config(disable=True)

    def restore(self, pair: ImagePair) -> np.ndarray:
        """The restored LQ image of ``pair``, as faithdiff-upscale restores a photo (the application layer's
        :func:`~faithdiff_pipeline.application.restoring.restore_photo`), float ``[H, W, 3]`` in [0, 1]."""
        from ..application.restoring import restore_photo
        from ..application.settings import RestorationSettings
        from ..captioning import read_caption

        settings = self.settings
        prompt = read_caption(pair.lq) if settings["captions"] == "sidecar" else settings["prompt"]
        if prompt is None:
            raise ValueError(f"no caption sidecar {pair.lq.with_suffix('.json').name} beside the LQ image")
        restoration = RestorationSettings(
            upscale=settings["upscale"], steps=settings["steps"], tile_size=settings["tile_size"], seed=settings["seed"]
        )
        return restore_photo(read_image(pair.lq), prompt, restoration, self.pipeline)


class FolderMethod(EvaluationMethod):
    """Results of another method, made elsewhere: a folder (``source``) with one image per image of the set, paired
    by file name and at the HQ size."""

    kind = "folder"

    def prepare(self, context: MethodContext) -> None:
        pairs = context.dataset.pairs
        found = list_images(self.source, f"result folder of method {self.name!r}")
        if absent := missing_names((p.name for p in pairs), found):
            raise ValueError(
                f"result folder {self.source!r} of method {self.name!r} lacks {len(absent)} image(s) of the set: "
                f"{format_names(absent)} (results are paired by file name)."
            )
        for pair in pairs:
            size = image_size(found[pair.name])
            if size != pair.hq_size:
                raise ValueError(
                    f"result {str(found[pair.name])!r} of method {self.name!r} is {size[0]}x{size[1]}; "
                    f"expected the HQ size {pair.hq_size[0]}x{pair.hq_size[1]}."
                )
        self.results = {pair.name: found[pair.name] for pair in pairs}


def parse_method(text: str) -> EvaluationMethod:
    """The method of a ``--method`` value: ``lanczos``, ``faithdiff=PIPELINE_DIR_OR_HUB_ID`` or
    ``NAME=RESULT_DIR``."""
    name, sep, source = text.partition("=")
    name, source = name.strip(), source.strip()
    expected = "expected lanczos, faithdiff=PIPELINE_DIR_OR_HUB_ID or NAME=RESULT_DIR"
    if name == "lanczos" and not source:
        return LanczosMethod()
    if not sep or not source:
        raise ValueError(f"`--method` {text!r} is not a method: {expected}.")
    if not _METHOD_NAME.match(name):
        raise ValueError(
            f"`--method` {text!r}: the name {name!r} must be letters, digits, '.', '_', '+' or '-'; {expected}."
        )
    if name == "lanczos":
        raise ValueError(
            f"`--method` {text!r}: 'lanczos' is the built-in baseline and takes no value; write `--method lanczos`."
        )
    return FaithDiffMethod(name, source) if name == "faithdiff" else FolderMethod(name, source)


def load_faithdiff(source: str, variant: str | None, device: torch.device, dtype: torch.dtype) -> Any:
    """The pipeline of ``--method faithdiff=SOURCE`` on ``device``, loaded as faithdiff-upscale loads it: the
    weights variant follows the dtype (:func:`loading.weights_variant`), unless ``--variant`` names one, which then
    loads exactly the files it names, so that the results match what settings.json records."""
    return loading.load_pipeline(source, device, dtype, variant="auto" if variant is None else variant)


def read_results_settings(folder: Path) -> dict[str, Any] | None:
    """The settings.json of a results folder made here, or ``None`` when the folder is new or empty; a folder with
    files but without our settings.json (a folder of the user's with the same name) is refused."""
    from ..application.planning import check_output_dir

    path = folder / SETTINGS_NAME
    check_output_dir(str(folder), "results folder")
    if not path.exists():
        if folder.is_dir() and any(folder.iterdir()):
            raise ValueError(
                f"{str(folder)!r} holds files but no {SETTINGS_NAME}, so they are not results of faithdiff-eval; move "
                "them or choose another `out` (files we did not make are never replaced, `overwrite` or not)."
            )
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        saved = str(error).splitlines()[0]
    if not isinstance(saved, dict) or "method" not in saved:
        raise ValueError(
            f"{str(path)!r} is not the settings of results made by faithdiff-eval; move it or choose another `out` "
            "(files we did not make are never replaced, `overwrite` or not)."
        )
    return saved


def check_results_folder(folder: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuses a results folder that is not ours, or (without ``overwrite``) ours but made with other settings."""
    saved = read_results_settings(folder)
    if saved is not None and not overwrite:
        if saved != settings:
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            before = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
            now = ", ".join(f"{k}={settings.get(k)!r}" for k in changed)
            raise ValueError(
                f"results in {str(folder)!r} were made with other settings ({before}; now {now}); "
                "pass `overwrite` or choose another `out`."
            )
