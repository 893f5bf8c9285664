"""``faithdiff-prepare-data``: folders of HQ photos -> aligned HQ/LQ training crops, captions and a manifest.

Output layout::

    OUT/dataset.json     the settings the set was made with (a resumed run must use the same)
    OUT/manifest.jsonl   one record per crop: hq, lq, caption, source, source_size, crop_box, seed, scale
    OUT/hq/<folder>/<name>_<ext>_<k>.png, OUT/lq/...   the crops

Folders given as faces (``--faces``) follow the release's face branch instead: each face is degraded whole into two
LQ versions, and each crop takes one of them, resizes it and the face to a random size (128-192 px LQ for 512 px
crops at x4) and cuts an aligned window (:func:`faithdiff_pipeline.training.data.face_crop`).

Each crop is drawn and degraded with its own seed (from ``--seed``, the image's key and the crop number), so the set
is reproducible and a resumed run makes exactly the crops an uninterrupted one would. Images are written under a
temporary name and renamed when complete, and a crop counts as done once its manifest record is written.

The output folder is ours when it holds our ``dataset.json``; a folder that holds other files and no ``dataset.json``
is refused, so that nothing of the user's is written over. An output folder inside an input folder is left out of
the input scan, so that a rerun never takes the set's own crops for new photos.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..atomic_files import write_text_atomic
from ..checks import check_choice, check_integer
from ..command_line import parser_error_line
from ..degradations import PRESETS, DegradationConfig
from ..image_io import READABLE_SUFFIXES, image_size, save_image
from ..seeds import hashed_seed

# torch, and `.data` which imports it, are imported by the functions that use them: `--help` and usage errors then
# come at once.
if TYPE_CHECKING:
    from .data import ManifestRecord, SourceImage

PROG = "faithdiff-prepare-data"
SETTINGS_NAME = "dataset.json"
CAPTION_SOURCES = ("none", "sidecar", "captioner")
# The release keeps two offline LQ versions of every face and draws one per example.
FACE_LQ_VARIANTS = 2


@dataclass(frozen=True)
class PreparationSettings:
    """What a prepared set depends on; stored in ``dataset.json`` and checked when a run resumes."""

    hq_size: int
    crops_per_image: int
    seed: int
    captions: str
    degradation: dict[str, Any]
    face_folders: tuple[str, ...] = ()


@dataclass
class PreparationSummary:
    """What a run did. ``unreadable`` holds ``(path, reason)``; ``skipped_small`` the images smaller than a crop;
    ``missing_captions`` the images of this run with a crop whose caption is empty (no sidecar, captions off, or an
    empty answer of the captioner)."""

    images: int = 0
    faces: int = 0
    crops_written: int = 0
    crops_already_done: int = 0
    skipped_small: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    missing_captions: int = 0

    def describe(self, hq_size: int) -> str:
        lines = [
            (
                f"{self.images} image(s) ({self.faces} face(s)): {self.crops_written} crop(s) written, "
                f"{self.crops_already_done} already done; "
                f"{len(self.skipped_small)} image(s) smaller than {hq_size} px skipped; {len(self.unreadable)} unreadable."
            )
        ]
        lines += [f"  unreadable: {path}: {reason}" for path, reason in self.unreadable]
        if self.missing_captions:
            lines.append(f"  {self.missing_captions} image(s) without a caption; their crops have an empty caption.")
        return "\n".join(lines)


@dataclass(frozen=True)
class _ImageTask:
    """One source image's crops to make (picklable, for worker processes)."""

    source: SourceImage
    crops: tuple[int, ...]
    output: Path
    settings: PreparationSettings
    face: bool = False


@dataclass(frozen=True)
class _ImageResult:
    task: _ImageTask
    records: tuple[ManifestRecord, ...] = ()
    small: bool = False
    error: str | None = None


def crop_paths(source: SourceImage, crop: int) -> tuple[str, str]:
    """The HQ and LQ paths (relative to the output folder) of crop ``crop`` of ``source``. The extension is part
    of the name, so ``a.jpg`` and ``a.png`` in one folder do not collide."""
    key = Path(source.key)
    name = f"{key.stem}_{key.suffix.lstrip('.').lower()}_{crop:03d}.png"
    relative = (key.parent / name).as_posix()
    return f"hq/{relative}", f"lq/{relative}"


def prepare_training_set(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    hq_size: int = 512,
    crops_per_image: int = 1,
    degradation: DegradationConfig | None = None,
    seed: int = 0,
    captions: str | None = None,
    captioner: Any = None,
    captioner_name: str | None = None,
    caption_batch_size: int = 8,
    workers: int = 0,
    progress: bool = True,
    faces: Sequence[str | os.PathLike] = (),
) -> PreparationSummary:
    """Makes (or completes) a training set in ``output`` from the HQ images under ``inputs``.

    Args:
        inputs: folders of HQ photos, searched recursively (``output``, if it lies inside one, is left out).
        output: the set's folder (created if needed): new, empty, or a set of ours (with its ``dataset.json``).
        hq_size: HQ crop size; the LQ crop is ``hq_size / degradation.scale``.
        crops_per_image: random crops taken from each image.
        degradation: the degradation model (default: FaithDiff's settings).
        seed: the set's seed.
        captions: ``"captioner"`` (``captioner`` captions each HQ crop, as the release does), ``"sidecar"`` (the
            source image's caption sidecar, read with ``faithdiff_pipeline.captioning.read_caption``; an image whose
            sidecar cannot be read or parsed is left out and listed in ``unreadable`` with the reason) or ``"none"``
            (empty captions, only when asked for). ``None`` (the default) means ``"captioner"`` when ``captioner``
            is given and is an error otherwise.
        captioner: with ``captions="captioner"``, an object whose ``caption(images, seed=...) -> list[str]`` returns
            finished captions (e.g. ``faithdiff_pipeline.captioning.load_captioner(...)``).
        captioner_name: the captioner's model id, recorded in ``dataset.json``.
        caption_batch_size: images whose crops are captioned together.
        workers: processes that crop and degrade (0: in this process).
        progress: show a progress bar.
        faces: folders of aligned square face images (FFHQ-like), prepared with the release's face branch and mixed
            into the set; their names must differ from those of ``inputs``.

    Raises:
        ValueError: bad settings, missing input folders or folders without images, an output folder that is a
            file, holds files of another kind or was prepared with other settings; raised before anything is
            written, naming the user's paths.
    """
    from .data import MANIFEST_NAME, find_images

    if captions is None:
        captions = "captioner" if captioner is not None else _missing_caption_source()

    degradation = degradation if degradation is not None else DegradationConfig()
    settings = _check_settings(
        hq_size, crops_per_image, degradation, seed, captions, captioner, captioner_name, caption_batch_size, workers
    )
    output = Path(output)
    if not inputs and not faces:
        raise ValueError("`inputs` and `faces` are both empty; give at least one folder of HQ images.")
    images = _check_inputs_and_output(inputs, faces, output)
    face_keys = {image.key for image in find_images(faces, exclude=[output])}
    settings = dataclasses.replace(settings, face_folders=tuple(sorted({k.split("/")[0] for k in face_keys})))
    _claim_output(output, settings)
    manifest = output / MANIFEST_NAME
    done = _completed_records(manifest, output)
    # Start from a clean manifest: an interrupted run may have left a half-written last line.
    _write_manifest(manifest, list(done.values()))
    summary = PreparationSummary(images=len(images), faces=len(face_keys))
    tasks = []
    sidecar_captions: dict[str, str] = {}
    for source in images:
        pending = tuple(k for k in range(crops_per_image) if crop_paths(source, k)[0] not in done)
        summary.crops_already_done += crops_per_image - len(pending)
        if pending and settings.captions == "sidecar":
            try:
                sidecar_captions[source.key] = _sidecar_caption(source.path)
            except ValueError as error:  # that image alone fails, before any of its crops is made
                summary.unreadable.append((str(source.path), str(error).splitlines()[0]))
                continue
        if pending:
            tasks.append(_ImageTask(source, pending, output, settings, face=source.key in face_keys))

    bar = tqdm(total=len(images), initial=len(images) - len(tasks), unit="image", desc=PROG, disable=not progress)
    with open(manifest, "a", encoding="utf-8") as log:
        for chunk in _chunks(_run_tasks(tasks, workers), caption_batch_size):
            for record in _captioned(chunk, settings, captioner, summary, sidecar_captions):
                log.write(record.to_json() + "\n")
                log.flush()
                done[record.hq] = record
                summary.crops_written += 1
            bar.update(len(chunk))
    bar.close()
    wanted = [crop_paths(source, k)[0] for source in images for k in range(crops_per_image)]
    _write_manifest(manifest, [done[hq] for hq in wanted if hq in done])
    return summary


def _check_settings(
    hq_size: int,
    crops_per_image: int,
    degradation: DegradationConfig,
    seed: int,
    captions: str,
    captioner: Any,
    captioner_name: str | None,
    caption_batch_size: int,
    workers: int,
) -> PreparationSettings:
    for name, value, minimum in (
        ("hq_size", hq_size, 8),
        ("crops_per_image", crops_per_image, 1),
        ("caption_batch_size", caption_batch_size, 1),
        ("workers", workers, 0),
    ):
        check_integer(value, name, minimum)
    if hq_size % 8 or hq_size % degradation.scale:
        raise ValueError(
            f"`hq_size` must be a multiple of 8 (the VAE's factor) and of the degradation scale ({degradation.scale}), "
            f"got {hq_size}."
        )
    check_choice(captions, "captions", CAPTION_SOURCES)
    if (captions == "captioner") != (captioner is not None):
        raise ValueError("`captioner` must be given exactly when `captions='captioner'`.")
    label = f"captioner:{captioner_name or type(captioner).__name__}" if captioner is not None else captions
    return PreparationSettings(hq_size, crops_per_image, seed, label, degradation.to_dict())


def _missing_caption_source() -> str:
    raise ValueError(
        "`captions` is not set and no `captioner` is given: pass captioner=... (e.g. faithdiff_pipeline.captioning."
        "load_captioner(...)), captions='sidecar' for the photos' caption sidecars, or captions='none' for empty "
        "captions."
    )


def _check_inputs_and_output(
    inputs: Sequence[str | os.PathLike], faces: Sequence[str | os.PathLike], output: Path
) -> list[SourceImage]:
    """The images to prepare, after refusing an output folder that is not ours and inputs without images."""
    from .data import find_images

    _check_output_folder(output)
    # The output folder may lie inside an input folder: its crops are not photos.
    images = find_images([*inputs, *faces], exclude=[output])
    if not images:
        folders = ", ".join(repr(os.fspath(folder)) for folder in [*inputs, *faces])
        raise ValueError(
            f"no images in {folders} (searched recursively for {', '.join(READABLE_SUFFIXES)}; the output folder is "
            "not an input); nothing to prepare."
        )
    return images


def _check_output_folder(output: Path) -> None:
    """Refuses an output folder that is a file or cannot be created, or that holds files but no ``dataset.json``
    (a folder of the user's: nothing in it is ever written over), or whose ``dataset.json`` is not ours."""
    from ..application.planning import check_output_dir

    check_output_dir(str(output), "output")
    path = output / SETTINGS_NAME
    if not path.exists():
        if output.is_dir() and any(output.iterdir()):
            raise ValueError(
                f"`output` {str(output)!r} holds files but no {SETTINGS_NAME}, so it is no training set of ours; "
                "choose a new or empty folder (files we did not make are never written over)."
            )
        return
    _read_settings(path)


def _read_settings(path: Path) -> dict[str, Any]:
    """The settings in a ``dataset.json`` of ours; a file that is not one is refused."""
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        settings = str(error).splitlines()[0]
    if not isinstance(settings, dict) or not {"hq_size", "seed", "degradation"} <= settings.keys():
        raise ValueError(
            f"{str(path)!r} is not the {SETTINGS_NAME} of a training set made by {PROG}; choose another `output` "
            "(files we did not make are never written over)."
        )
    return settings


def _sidecar_caption(path: Path) -> str:
    """The caption in an image's sidecar, "" without one; a sidecar that cannot be read raises ``ValueError``."""
    from ..captioning import read_caption

    return read_caption(path) or ""


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Errors of writing ``path`` (written under a temporary name first) as a ``ValueError`` that names ``path``."""
    try:
        yield
    except OSError as error:
        raise ValueError(f"{str(path)!r} cannot be written: {error.strerror or error}") from error


def _claim_output(output: Path, settings: PreparationSettings) -> None:
    """Writes ``dataset.json``, or checks that an existing one matches: resuming with other settings would mix
    two different sets in one manifest."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / SETTINGS_NAME
    current = json.loads(json.dumps(dataclasses.asdict(settings)))
    if path.is_file():
        previous = _read_settings(path)
        previous.setdefault("face_folders", [])  # sets made before the face branch have none
        differing = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if differing:
            raise ValueError(
                f"Output folder {str(output)!r} was prepared with other settings ({', '.join(differing)} differ); "
                "resume with the same settings or choose a new output folder."
            )
        return
    with _writing(path):
        write_text_atomic(path, json.dumps(current, indent=2) + "\n")


def _completed_records(manifest: Path, output: Path) -> dict[str, ManifestRecord]:
    """Records of earlier runs whose two images still exist, by HQ path. Anything else is redone."""
    from .data import read_manifest

    if not manifest.is_file():
        return {}
    records = read_manifest(manifest, strict=False)
    return {r.hq: r for r in records if (output / r.hq).is_file() and (output / r.lq).is_file()}


def _run_tasks(tasks: list[_ImageTask], workers: int) -> Iterator[_ImageResult]:
    import torch

    if workers == 0 or len(tasks) < 2:
        yield from map(_make_crops, tasks)
        return
    # Spawned workers: forking a process whose torch thread pools are already running can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        yield from pool.map(_make_crops, tasks, chunksize=4)


def _make_crops(task: _ImageTask) -> _ImageResult:
    """Crops and degrades one image and writes its pairs (captions come later, in the main process)."""
    import torch

    from .data import ManifestRecord, load_rgb

    settings = task.settings
    try:
        width, height = image_size(task.source.path)  # upright, from the header, as load_rgb reads it
        if min(width, height) < settings.hq_size:
            return _ImageResult(task, small=True)
        image = load_rgb(task.source.path)
    except (OSError, ValueError) as error:
        return _ImageResult(task, error=str(error.__cause__ or error))
    degradation = DegradationConfig.from_dict(settings.degradation)
    make_crop = _face_cropper(image, task, degradation) if task.face else _photo_cropper(image, degradation)
    records = []
    for crop in task.crops:
        seed = hashed_seed(settings.seed, task.source.key, crop)
        hq, lq, source_size, box = make_crop(settings.hq_size, torch.Generator().manual_seed(seed))
        hq_path, lq_path = crop_paths(task.source, crop)
        for crop_image, path in ((hq, task.output / hq_path), (lq, task.output / lq_path)):
            with _writing(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                save_image(crop_image, path)
        records.append(
            ManifestRecord(hq_path, lq_path, "", str(task.source.path), source_size, box, seed, degradation.scale)
        )
    return _ImageResult(task, tuple(records))


def _photo_cropper(image: Any, degradation: DegradationConfig) -> Any:
    """``(size, generator) -> (hq, lq, source size, box)`` for a photo: a window of it, degraded."""
    from .data import degraded_crop

    def make_crop(size: int, generator: Any) -> tuple:
        hq, lq, box = degraded_crop(image, size, degradation, generator)
        return hq, lq, image.size, box

    return make_crop


def _face_cropper(image: Any, task: _ImageTask, degradation: DegradationConfig) -> Any:
    """The same for a face, by the release's face branch. Its LQ versions are made once per image, each seeded by
    the image and its number alone, so that every crop (and a resumed run) draws from the same two."""
    import torch

    from .data import face_crop, face_variant_lq

    seeds = [hashed_seed(task.settings.seed, task.source.key, "face-lq", v) for v in range(FACE_LQ_VARIANTS)]
    variants = [face_variant_lq(image, degradation, torch.Generator().manual_seed(seed)) for seed in seeds]
    return lambda size, generator: face_crop(image, variants, size, degradation.scale, generator)


def _captioned(
    results: list[_ImageResult],
    settings: PreparationSettings,
    captioner: Any,
    summary: PreparationSummary,
    sidecar_captions: dict[str, str],
) -> list[ManifestRecord]:
    """The records of a chunk of images, with their captions (``sidecar_captions`` by image key, read before any
    crop was made); small and unreadable images go to the summary."""
    from .data import load_rgb

    records = []
    for result in results:
        if result.small:
            summary.skipped_small.append(str(result.task.source.path))
        elif result.error is not None:
            summary.unreadable.append((str(result.task.source.path), result.error))
        elif settings.captions == "sidecar":
            caption = sidecar_captions[result.task.source.key]
            records += [_with_caption(r, caption) for r in result.records]
        else:
            records += result.records
    if captioner is not None and records:
        output = results[0].task.output
        crops = [load_rgb(output / r.hq) for r in records]
        # Seeded by the chunk's first crop, so that re-running a set samples the same captions.
        captions = captioner.caption(crops, seed=hashed_seed(settings.seed, "caption", records[0].hq))
        if len(captions) != len(records):
            raise RuntimeError(f"The captioner returned {len(captions)} captions for {len(records)} images.")
        records = [_with_caption(r, c) for r, c in zip(records, captions)]
    # Counted after captioning, whatever the source: an uncaptioned image trains on the empty prompt only.
    summary.missing_captions += len({r.source for r in records if not r.caption.strip()})
    return records


def _with_caption(record: ManifestRecord, caption: str) -> ManifestRecord:
    return dataclasses.replace(record, caption=caption)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_manifest(path: Path, records: list[ManifestRecord]) -> None:
    """Rewrites the manifest in the order of the inputs, without the duplicates and partial lines that appending
    during interrupted runs may have left."""
    with _writing(path):
        write_text_atomic(path, "".join(record.to_json() + "\n" for record in records))


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line of ``faithdiff-prepare-data``, named ``prog`` in its usage and messages."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Make a FaithDiff training set: random aligned HQ/LQ crops of HQ photos, degraded with the "
        "Real-ESRGAN-style model, with captions and a manifest. Re-running completes an interrupted run.",
    )
    parser.add_argument("inputs", nargs="*", metavar="FOLDER", help="folders of HQ photos (searched recursively)")
    parser.add_argument(
        "--faces",
        nargs="+",
        default=[],
        metavar="FOLDER",
        help="folders of aligned square face images (FFHQ-like), prepared with the release's face branch: two LQ "
        "versions per face, resized with the face to a random size (128-192 px LQ for 512 px crops) before cropping",
    )
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder of the training set")
    parser.add_argument("--hq-size", type=int, default=512, help="HQ crop size in pixels (default: 512)")
    parser.add_argument("--crops-per-image", type=int, default=1, help="random crops per image (default: 1)")
    parser.add_argument(
        "--degradation",
        metavar="PRESET_OR_YAML",
        help=f"degradation preset ({', '.join(sorted(PRESETS))}) or YAML settings file (default: FaithDiff's settings)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the set (default: 0)")
    captions = parser.add_mutually_exclusive_group()
    captions.add_argument(
        "--captioner",
        metavar="MODEL_ID",
        default="auto",
        help="caption each HQ crop: auto (default) is the release's llava-hf/llava-1.5-13b-hf on a CUDA GPU, in the "
        "precision its free memory holds, as faithdiff-upscale chooses it; a model id or folder; or 'none' for empty "
        "captions. Without a GPU, pass a model, --sidecar-captions or --captioner none",
    )
    captions.add_argument(
        "--sidecar-captions", action="store_true", help="use each photo's caption sidecar (photo.json)"
    )
    parser.add_argument(
        "--captioner-quantization",
        choices=("auto", "half", "8bit", "4bit"),
        default="auto",
        help="captioner precision: auto (by free GPU memory), half, 8bit or 4bit (bitsandbytes)",
    )
    parser.add_argument("--captioner-device", default="auto", help="device of the captioner (default: cuda, mps, cpu)")
    parser.add_argument("--caption-batch-size", type=int, default=8, help="images captioned together (default: 8)")
    parser.add_argument(
        "--workers", type=int, default=0, help="processes that crop and degrade (default: 0, this one)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Runs ``faithdiff-prepare-data`` with the arguments ``argv`` (default: the command line's), its usage and
    messages headed ``prog``. Returns 0 when done (unreadable images are reported, not fatal), 2 on a usage error."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not args.inputs and not args.faces:
        parser.error("give at least one FOLDER of HQ photos or --faces FOLDER")
    # Only now: parsing alone (`--help`, a usage error) must not wait for torch.
    from .data import MANIFEST_NAME, load_degradation

    try:
        degradation = load_degradation(args.degradation)
        captions, captioner, captioner_name = _caption_source(args)
        summary = prepare_training_set(
            args.inputs,
            args.output,
            hq_size=args.hq_size,
            crops_per_image=args.crops_per_image,
            degradation=degradation,
            seed=args.seed,
            captions=captions,
            captioner=captioner,
            captioner_name=captioner_name,
            caption_batch_size=args.caption_batch_size,
            workers=args.workers,
            progress=not args.no_progress,
            faces=args.faces,
        )
    except (ValueError, OSError) as error:
        return parser_error_line(error, prog, parser)
    print(summary.describe(args.hq_size))
    print(f"Manifest: {Path(args.output) / MANIFEST_NAME}")
    return 0


def _caption_source(args: argparse.Namespace) -> tuple[str, Any, str | None]:
    """The caption source, chosen by the loading module as every front-end chooses it. The release captions every
    crop; a set without captions is only made when asked for by name."""
    if args.sidecar_captions:
        return "sidecar", None, None
    if args.captioner.strip().lower() == "none":
        return "none", None, None
    from .. import loading

    # Refused before the captioner loads, as prepare_training_set would refuse them after.
    _check_inputs_and_output(args.inputs, args.faces, Path(args.output))

    device = loading.resolve_device(args.captioner_device)
    loading.check_options(captioner_precision=args.captioner_quantization)
    plan = loading.plan_captioner(args.captioner, device, args.captioner_quantization)
    if plan.model is None:
        raise ValueError(
            "no caption source: the default captioner (the release's LLaVA-1.5-13B) needs a CUDA GPU that holds it, "
            f"and {device} does not; pass --captioner MODEL_ID (e.g. llava-hf/llava-1.5-7b-hf), --sidecar-captions, "
            "or --captioner none for empty captions."
        )
    captioner = loading.load_planned_captioner(plan, device, loading.resolve_dtype("auto", device))
    return "captioner", captioner, plan.model


if __name__ == "__main__":
    sys.exit(main())
