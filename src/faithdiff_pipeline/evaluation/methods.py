"""The methods ``faithdiff-eval`` compares: the LANCZOS baseline, FaithDiff pipelines run here, and folders of results
made elsewhere. :func:`parse_method` builds one from its ``--method`` text."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import PIL.Image

from .. import loading
from ..image_io import image_size, read_image
from .datasets import ImagePair, format_names, list_images, missing_names

if TYPE_CHECKING:
    import torch

    from .cli import Run

SETTINGS_NAME = "settings.json"
_METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class EvaluationMethod(ABC):
    """A method to evaluate, named ``name`` in the reports; ``results`` maps each image of the set to the file its
    result is (or will be) in."""

    kind: ClassVar[str]

    def __init__(self, name: str, source: str | None = None) -> None:
        self.name = name
        self.source = source
        self.results: dict[str, Path] = {}

    @abstractmethod
    def prepare(self, run: Run) -> None:
        """Fixes where each result is and checks what can be checked before any image is processed."""

    def todo(self, run: Run) -> list[ImagePair]:
        """The images this method still has to restore."""
        return []

    def load(self, run: Run) -> None:
        """Loads what restoring needs, before any image is processed, so that a wrong path fails at once."""


class ComputedMethod(EvaluationMethod):
    """A method whose results are made here, under ``<out>/results/<name>``; ``settings`` is what they depend on
    (written to ``settings.json`` and checked when a run resumes)."""

    def __init__(self, name: str, source: str | None = None) -> None:
        super().__init__(name, source)
        self.settings: dict[str, Any] = {}

    def prepare(self, run: Run) -> None:
        folder = self.folder(run)
        self.results = {pair.name: folder / f"{pair.name}.png" for pair in run.dataset.pairs}
        self.settings = {"method": self.kind, "lq_dir": str(run.dataset.lq_dir.resolve()), **self.own_settings(run)}
        _check_settings(folder, self.settings, run.args.overwrite)

    def folder(self, run: Run) -> Path:
        return run.out / "results" / self.name

    def own_settings(self, run: Run) -> dict[str, Any]:
        """The settings that only this kind of method has."""
        return {}

    def todo(self, run: Run) -> list[ImagePair]:
        """The images still to restore (all of them with ``--overwrite``)."""
        return [p for p in run.dataset.pairs if run.args.overwrite or not self.results[p.name].is_file()]

    @abstractmethod
    def restore(self, pair: ImagePair) -> PIL.Image.Image:
        """The result of one image of the set."""


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

    def prepare(self, run: Run) -> None:
        try:
            loading.check_model_source(self.source)
        except ValueError as error:
            raise ValueError(str(error).replace("`model`", f"`--method {self.name}`")) from error
        super().prepare(run)

    def own_settings(self, run: Run) -> dict[str, Any]:
        args = run.args
        upscale = args.upscale if args.upscale is not None else run.dataset.scale
        if not upscale > 0:
            raise ValueError(f"`--upscale` must be a number > 0, got {upscale}.")
        if args.captions == "sidecar" and args.prompt:
            raise ValueError("`--prompt` gives one prompt for every image; it conflicts with `--captions sidecar`.")
        if args.tile_size < 64 or args.tile_size % 8:
            raise ValueError(f"`--tile-size` must be a multiple of 8 of at least 64 pixels, got {args.tile_size}.")
        for pair in run.dataset.pairs:
            output = (round(pair.lq_size[0] * upscale), round(pair.lq_size[1] * upscale))
            if output != pair.hq_size:
                raise ValueError(
                    f"`--upscale` {upscale} turns LQ image {pair.name!r} ({pair.lq_size[0]}x{pair.lq_size[1]}) into "
                    f"{output[0]}x{output[1]}, but its HQ image is {pair.hq_size[0]}x{pair.hq_size[1]}; "
                    f"use the set's scale {run.dataset.scale}."
                )
        source = Path(self.source)
        return {
            "pipeline": str(source.resolve()) if source.exists() else self.source,
            "variant": args.variant,
            "dtype": str(run.dtype).removeprefix("torch."),
            "steps": args.steps,
            "upscale": upscale,
            "seed": args.sample_seed,
            "prompt": args.prompt,
            "captions": args.captions,
            "tile_size": args.tile_size,
        }

    def load(self, run: Run) -> None:
        try:
            self.pipeline = load_faithdiff(self.source, run.args.variant, run.device, run.dtype)
        except (OSError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"`--method faithdiff={self.source}` could not be loaded: {reason}") from error
        self.pipeline.set_progress_bar_config(disable=True)

    def restore(self, pair: ImagePair) -> PIL.Image.Image:
        import torch

        from ..captioning import read_caption

        settings = self.settings
        prompt = read_caption(pair.lq) if settings["captions"] == "sidecar" else settings["prompt"]
        if prompt is None:
            raise ValueError(f"no caption sidecar {pair.lq.with_suffix('.json').name} beside the LQ image")
        return self.pipeline(
            read_image(pair.lq).pipeline_input(),
            prompt=prompt,
            upscale=settings["upscale"],
            num_inference_steps=settings["steps"],
            tile_size=settings["tile_size"],
            generator=torch.Generator("cpu").manual_seed(settings["seed"]),
            output_type="pil",
        ).images[0]


class FolderMethod(EvaluationMethod):
    """Results of another method, made elsewhere: a folder (``source``) with one image per image of the set, paired
    by file name and at the HQ size."""

    kind = "folder"

    def prepare(self, run: Run) -> None:
        pairs = run.dataset.pairs
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


def _check_settings(folder: Path, settings: dict[str, Any], overwrite: bool) -> None:
    path = folder / SETTINGS_NAME
    if path.is_file() and not overwrite:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != settings:
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            before = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
            now = ", ".join(f"{k}={settings.get(k)!r}" for k in changed)
            raise ValueError(
                f"results in {str(folder)!r} were made with other settings ({before}; now {now}); "
                "pass --overwrite or choose another --out."
            )
