"""Training data: aligned HQ/LQ crops, their manifest, and the two datasets the training loop reads.

A training example is an HQ crop (512 px by default), its degraded LQ crop (HQ / scale), a caption, and SDXL's
micro-conditioning. Every random choice (crop position, degradation, flip, LQ upscaling filter, caption dropout) comes
from a generator seeded by :func:`~faithdiff_pipeline.seeds.hashed_seed` with the run's seed and the example's
identity, never from a global random state, so a set is reproducible and a resumed run sees exactly the data an
uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from ..checks import check_choice
from ..degradations import DegradationConfig, degrade, to_pil
# Here for the commands that import it from this module.
from ..degradations.config import load_degradation  # noqa: F401
from ..image_io import READABLE_SUFFIXES, image_size, read_image
from ..seeds import hashed_generator, hashed_seed

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
# How a prepared set with several crops per image is read: one of each image's crops per epoch, a different one in
# consecutive epochs (as the release cuts a new window every epoch), or every crop as its own example, every epoch.
PREPARED_CROPS = ("one_per_epoch", "all")
# The release upscales each LQ crop to the HQ size with one of these PIL filters, drawn uniformly.
UPSCALE_FILTERS = (PIL.Image.NEAREST, PIL.Image.BILINEAR, PIL.Image.BICUBIC)


def _uniform_int(generator: torch.Generator, high: int) -> int:
    """An integer in [0, high)."""
    return int(torch.randint(0, high, (1,), generator=generator).item())


def _bernoulli(generator: torch.Generator, probability: float) -> bool:
    return bool(torch.rand((), generator=generator).item() < probability)


# ------------------------------------------------------------------------------------------ source images
@dataclass(frozen=True)
class SourceImage:
    """An HQ photo: its path and a key unique within a run (``<folder name>/<path inside the folder>``)."""

    path: Path
    key: str


def find_images(
    folders: Sequence[str | os.PathLike], exclude: Sequence[str | os.PathLike] = ()
) -> list[SourceImage]:
    """The images under ``folders`` (recursively, hidden files excluded), sorted by key. Files under the folders of
    ``exclude`` (a command's output folder, which may lie inside an input folder) are not inputs, so that a rerun
    never takes its own outputs for new photos; nor are the crops of a training set prepared here (a folder with
    faithdiff-prepare-data's ``dataset.json``) that lies among the photos.

    Raises:
        ValueError: a folder does not exist, or two folders have the same name (their keys would collide).
    """
    excluded = [Path(folder).resolve() for folder in exclude]
    roots: dict[str, Path] = {}
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"Input folder {os.fspath(folder)!r} is not a folder; expected a folder of HQ images.")
        name = root.resolve().name
        if name in roots and roots[name] != root.resolve():
            raise ValueError(
                f"Input folders {str(roots[name])!r} and {str(root)!r} have the same name {name!r}; outputs are named "
                "after the folder, so give each input folder a distinct name."
            )
        roots[name] = root.resolve()
    images = []
    prepared: dict[Path, bool] = {}
    for name, root in roots.items():
        for path in root.rglob("*"):
            relative = path.relative_to(root)
            if (
                path.is_file()
                and path.suffix.lower() in READABLE_SUFFIXES
                and not any(p.startswith(".") for p in relative.parts)
                and not any(path.is_relative_to(folder) for folder in excluded)
                and not _in_prepared_set(path, root, prepared)
            ):
                images.append(SourceImage(path, f"{name}/{relative.as_posix()}"))
    return sorted(images, key=lambda image: image.key)


# What marks a training set prepared by faithdiff-prepare-data: its settings, beside its manifest.
PREPARED_SET_SETTINGS = "dataset.json"


def is_prepared_set(folder: Path) -> bool:
    """Whether ``folder`` holds a training set made by faithdiff-prepare-data (its ``dataset.json`` and manifest)."""
    settings = folder / PREPARED_SET_SETTINGS
    if not settings.is_file() or not (folder / MANIFEST_NAME).is_file():
        return False
    try:
        data = json.loads(settings.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and {"hq_size", "seed", "degradation"} <= data.keys()


def _in_prepared_set(path: Path, root: Path, known: dict[Path, bool]) -> bool:
    """Whether a folder from ``path``'s up to ``root`` is a prepared training set (answers cached in ``known``)."""
    for folder in path.parents:
        if folder not in known:
            known[folder] = is_prepared_set(folder)
        if known[folder]:
            return True
        if folder == root:
            return False
    return False


def load_rgb(path: str | os.PathLike) -> PIL.Image.Image:
    """The image at ``path`` as 8-bit RGB, read by :func:`faithdiff_pipeline.image_io.read_image`: upright (EXIF
    orientation applied), in sRGB, 16-bit samples rounded to 8 bits, greyscale replicated.

    Raises:
        ValueError: the file is not a readable image (the message says why).
    """
    return read_image(path).to_pil()


# -------------------------------------------------------------------------------------------------- crops
def random_crop_box(
    width: int, height: int, size: int, scale: int, generator: torch.Generator
) -> tuple[int, int, int, int]:
    """A random ``size`` x ``size`` box ``(left, top, right, bottom)`` inside a ``width`` x ``height`` image, its
    corners on multiples of ``scale`` so that the LQ crop is exactly the HQ box divided by ``scale``."""
    if width < size or height < size:
        raise ValueError(f"The image ({width}x{height}) is smaller than the crop size {size}.")
    left = _uniform_int(generator, (width - size) // scale + 1) * scale
    top = _uniform_int(generator, (height - size) // scale + 1) * scale
    return left, top, left + size, top + size


def degraded_crop(
    image: PIL.Image.Image, size: int, degradation: DegradationConfig, generator: torch.Generator
) -> tuple[PIL.Image.Image, PIL.Image.Image, tuple[int, int, int, int]]:
    """A random aligned HQ crop of ``image`` and its LQ version made with ``degrade`` (``size / scale`` px).

    ``generator`` draws the box first, then every choice of the degradation, so one seed gives one pair.
    Returns the HQ crop, the LQ crop (8-bit, exactly as ``degrade`` made it) and the box in the source.
    """
    if size % degradation.scale:
        raise ValueError(f"The HQ crop size {size} must be divisible by the degradation scale {degradation.scale}.")
    box = random_crop_box(image.width, image.height, size, degradation.scale, generator)
    hq = image.crop(box)
    hq_tensor = torch.from_numpy(np.array(hq)).permute(2, 0, 1)[None].float() / 255.0
    lq = degrade(hq_tensor, degradation, generator)
    return hq, to_pil(lq), box


def face_variant_lq(
    face: PIL.Image.Image, degradation: DegradationConfig, generator: torch.Generator
) -> PIL.Image.Image:
    """One of the release's offline LQ versions of a whole face image: the face (cut down to a multiple of the
    scale) degraded as a photo crop is. The release keeps two such versions per face and picks one per example."""
    width, height = (side // degradation.scale * degradation.scale for side in face.size)
    hq = face.crop((0, 0, width, height))
    hq_tensor = torch.from_numpy(np.array(hq)).permute(2, 0, 1)[None].float() / 255.0
    return to_pil(degrade(hq_tensor, degradation, generator))


def face_crop(
    face: PIL.Image.Image, variants: Sequence[PIL.Image.Image], size: int, scale: int, generator: torch.Generator
) -> tuple[PIL.Image.Image, PIL.Image.Image, tuple[int, int], tuple[int, int, int, int]]:
    """An aligned HQ/LQ crop of a face by the release's face scheme: one of the face's LQ ``variants`` drawn
    uniformly; a side ``s`` drawn uniformly from ``[size / scale, 1.5 * size / scale]`` (128-192 px for 512 px crops
    at x4); the LQ variant resized to ``s`` x ``s`` and the face to ``scale * s`` square, both bicubic as the
    release does (a face is square and aligned, as in FFHQ); then a random window of the two.

    Returns the HQ crop, the LQ crop, the resized face's size (the source size of the micro-conditioning) and the
    window in it.
    """
    if size % scale:
        raise ValueError(f"The HQ crop size {size} must be divisible by the degradation scale {scale}.")
    lq_variant = variants[_uniform_int(generator, len(variants))]
    lq_size = size // scale
    side = lq_size + _uniform_int(generator, lq_size // 2 + 1)
    hq = face.resize((side * scale, side * scale), PIL.Image.BICUBIC)
    lq = lq_variant.resize((side, side), PIL.Image.BICUBIC)
    box = random_crop_box(hq.width, hq.height, size, scale, generator)
    return hq.crop(box), lq.crop(tuple(v // scale for v in box)), hq.size, box


def micro_conditioning(source_size: Sequence[int], crop_box: Sequence[int], scale: int) -> list[float]:
    """SDXL's ``time_ids`` as the release sets them in training: original size = ``scale`` x the LQ size of the
    whole source (its size rounded down to a multiple of ``scale``), crop = the crop's (top, left) in that image,
    target = the HQ crop size. ``source_size`` is ``(width, height)``, ``crop_box`` ``(left, top, right, bottom)``."""
    width, height = source_size
    left, top, right, bottom = crop_box
    return [float(v) for v in (height // scale * scale, width // scale * scale, top, left, bottom - top, right - left)]


# ------------------------------------------------------------------------------------------------ manifest
@dataclass(frozen=True)
class ManifestRecord:
    """One line of ``manifest.jsonl``. ``hq`` and ``lq`` are relative to the manifest's folder; ``source_size`` is
    ``(width, height)`` and ``crop_box`` ``(left, top, right, bottom)`` in the source; ``seed`` made the crop and
    the degradation."""

    hq: str
    lq: str
    caption: str
    source: str
    source_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    seed: int
    scale: int

    def to_json(self) -> str:
        values = asdict(self)
        values["source_size"], values["crop_box"] = list(self.source_size), list(self.crop_box)
        return json.dumps(values, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> ManifestRecord:
        values = json.loads(line)
        return cls(
            hq=values["hq"],
            lq=values["lq"],
            caption=values["caption"],
            source=values["source"],
            source_size=tuple(values["source_size"]),
            crop_box=tuple(values["crop_box"]),
            seed=int(values["seed"]),
            scale=int(values["scale"]),
        )


def read_manifest(path: str | os.PathLike, strict: bool = True) -> list[ManifestRecord]:
    """The records of a manifest. With ``strict=False`` unreadable lines (e.g. the last line of an interrupted run)
    are dropped instead of raising.

    Raises:
        ValueError: the manifest is missing, or (``strict``) a line is not a record; the message names the line.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Manifest {str(path)!r} does not exist; run faithdiff-prepare-data to make one.")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(ManifestRecord.from_json(line))
        except (ValueError, KeyError, TypeError) as error:
            if strict:
                raise ValueError(f"Manifest {str(path)!r} line {number} is not a record: {error!r}.") from error
    return records


# ------------------------------------------------------------------------------------------------ examples
def to_model_range(image: PIL.Image.Image) -> torch.Tensor:
    """An RGB image as a ``[3, H, W]`` float32 tensor in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def training_example(
    hq: PIL.Image.Image,
    lq: PIL.Image.Image,
    caption: str,
    time_ids: Sequence[float],
    generator: torch.Generator,
    caption_dropout: float,
    random_flip: bool,
) -> dict[str, Any]:
    """The model inputs of one pair, as the release makes them: both crops flipped together (if ``random_flip``),
    the LQ crop upscaled to the HQ size with a random filter (nearest, bilinear or bicubic), both in [-1, 1], and
    the caption replaced by ``""`` with probability ``caption_dropout``. ``time_ids`` are those of the unflipped
    crop; for a flipped pair the crop's left edge is measured in the flipped image, as in the release, which flips
    the image before cropping.

    Returns ``{"hq", "lq"}`` ``[3, S, S]`` tensors, ``"caption"`` and ``"time_ids"`` (``[6]``).
    """
    # Always draw all three so that the random stream does not depend on the settings.
    flip = _bernoulli(generator, 0.5)
    upscale_filter = UPSCALE_FILTERS[_uniform_int(generator, len(UPSCALE_FILTERS))]
    drop_caption = _bernoulli(generator, caption_dropout)
    time_ids = [float(v) for v in time_ids]
    if random_flip and flip:
        hq, lq = hq.transpose(PIL.Image.FLIP_LEFT_RIGHT), lq.transpose(PIL.Image.FLIP_LEFT_RIGHT)
        # (original height, original width, top, left, height, width): the flipped crop's left edge is the
        # distance from the original's right edge to the unflipped crop's right edge.
        original_width, left, width = time_ids[1], time_ids[3], time_ids[5]
        time_ids[3] = original_width - (left + width)
    lq = lq.resize(hq.size, upscale_filter)
    return {
        "hq": to_model_range(hq),
        "lq": to_model_range(lq),
        "caption": "" if drop_caption else caption,
        "time_ids": torch.tensor(time_ids, dtype=torch.float32),
    }


class _AugmentedPairs(Dataset):
    """Shared by both datasets: the per-example generator, seeded by (seed, epoch, index), so that workers,
    processes and resumed runs all draw the same augmentations. Call :meth:`set_epoch` before each epoch."""

    def __init__(self, seed: int, caption_dropout: float, random_flip: bool) -> None:
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.random_flip = random_flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, index: int, purpose: str = "example") -> torch.Generator:
        return hashed_generator(self.seed, purpose, self.epoch, index)


class PreparedPairsDataset(_AugmentedPairs):
    """The pairs of a set prepared by ``faithdiff-prepare-data`` (its ``manifest.jsonl``).

    Args:
        manifest: path of ``manifest.jsonl``.
        seed: seeds the flips, LQ upscaling filters, caption dropout and the order of each image's crops.
        caption_dropout: probability of an empty caption.
        random_flip: flip pairs horizontally with probability 1/2.
        crops: ``"one_per_epoch"`` (the default): one example per source image, whose crop changes from epoch to
            epoch, cycling through the image's crops in an order of its own (prepare with ``--crops-per-image N``
            for N windows); the release instead cuts a new window every epoch. ``"all"``: every crop is an example
            in every epoch (with one crop per image, each image always shows the same window).
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        seed: int = 0,
        caption_dropout: float = 0.2,
        random_flip: bool = True,
        crops: str = "one_per_epoch",
    ) -> None:
        super().__init__(seed, caption_dropout, random_flip)
        check_choice(crops, "crops", PREPARED_CROPS)
        self.root = Path(manifest).parent
        self.records = read_manifest(manifest)
        self.crops = crops
        if not self.records:
            raise ValueError(f"Manifest {os.fspath(manifest)!r} holds no pairs.")
        # Indices of each source image's crops, images in manifest order.
        by_source: dict[str, list[int]] = {}
        for position, record in enumerate(self.records):
            by_source.setdefault(record.source, []).append(position)
        self.images = list(by_source.values())
        sizes = {(r.crop_box[2] - r.crop_box[0], r.crop_box[3] - r.crop_box[1]) for r in self.records}
        scales = {r.scale for r in self.records}
        if len(sizes) != 1 or len(scales) != 1:
            raise ValueError(
                f"Manifest {os.fspath(manifest)!r} mixes crop sizes {sorted(sizes)} or scales {sorted(scales)}; a "
                "training batch needs one size: prepare each size into its own folder."
            )
        self.hq_size = sizes.pop()[0]
        self.scale = scales.pop()

    def __len__(self) -> int:
        return len(self.images) if self.crops == "one_per_epoch" else len(self.records)

    def record_index(self, index: int) -> int:
        """The manifest record that example ``index`` reads in the current epoch."""
        if self.crops == "all":
            return index
        crops = self.images[index]
        # A fixed per-image offset plus the epoch: consecutive epochs show different crops of an image, and the
        # images do not all start from their first crop.
        offset = hashed_seed(self.seed, "window", self.records[crops[0]].source) % len(crops)
        return crops[(offset + self.epoch) % len(crops)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[self.record_index(index)]
        hq, lq = load_rgb(self.root / record.hq), load_rgb(self.root / record.lq)
        if hq.size != (self.hq_size, self.hq_size) or lq.size != (self.hq_size // self.scale,) * 2:
            raise ValueError(
                f"{record.hq!r} / {record.lq!r} are {hq.size} / {lq.size}, expected {self.hq_size} px and "
                f"{self.hq_size // self.scale} px as the manifest says; prepare the set again."
            )
        time_ids = micro_conditioning(record.source_size, record.crop_box, record.scale)
        return training_example(
            hq, lq, record.caption, time_ids, self._generator(index), self.caption_dropout, self.random_flip
        )

    def validation_pair(self, index: int) -> tuple[PIL.Image.Image, str]:
        """The LQ crop and caption of example ``index`` (fixed: its first crop, no augmentation)."""
        index %= len(self)
        record = self.records[self.images[index][0] if self.crops == "one_per_epoch" else index]
        return load_rgb(self.root / record.lq), record.caption


class DegradingDataset(_AugmentedPairs):
    """HQ photos cropped and degraded in the data loader: no LQ files are written, and every epoch sees new crops
    and degradations. Images smaller than the crop, or whose header cannot be read, are left out (counted in
    ``skipped_small`` and ``unreadable``); an image that fails to decode later is replaced by the next one, with a
    warning.

    Args:
        folders: folders of HQ photos (searched recursively).
        hq_size: the HQ crop size; the LQ crop is ``hq_size / degradation.scale``.
        degradation: the degradation model (default: FaithDiff's settings).
        seed: seeds the crops, degradations and augmentations (with the epoch and the index).
        caption_dropout, random_flip: as for :class:`PreparedPairsDataset`.
        captions: ``"none"`` (empty captions) or ``"sidecar"`` (``photo.json`` beside ``photo.jpg``, through
            ``faithdiff_pipeline.captioning.read_caption``), read once here: a sidecar that cannot be read or parsed
            raises ``ValueError`` naming it, before any training.
        exclude: folders under ``folders`` that hold no inputs (the training's output folder).
    """

    def __init__(
        self,
        folders: Sequence[str | os.PathLike],
        hq_size: int = 512,
        degradation: DegradationConfig | None = None,
        seed: int = 0,
        caption_dropout: float = 0.2,
        random_flip: bool = True,
        captions: str = "none",
        exclude: Sequence[str | os.PathLike] = (),
    ) -> None:
        super().__init__(seed, caption_dropout, random_flip)
        self.degradation = degradation if degradation is not None else DegradationConfig()
        if hq_size % self.degradation.scale:
            raise ValueError(
                f"`hq_size` {hq_size} must be divisible by the degradation scale {self.degradation.scale}."
            )
        check_choice(captions, "captions", ("none", "sidecar"))
        self.hq_size = hq_size
        self.scale = self.degradation.scale
        self.captions = captions
        self.sources, self.skipped_small, self.unreadable = self._usable_sources(find_images(folders, exclude))
        if not self.sources:
            raise ValueError(
                f"No usable image in {[os.fspath(f) for f in folders]}: {len(self.skipped_small)} smaller than "
                f"{hq_size} px, {len(self.unreadable)} unreadable."
            )
        self._captions = self._read_captions() if captions == "sidecar" else {}

    def _usable_sources(self, images: list[SourceImage]) -> tuple[list[SourceImage], list[Path], list[Path]]:
        usable, small, unreadable = [], [], []
        for image in images:
            try:
                width, height = image_size(image.path)  # upright, as load_rgb reads it
            except (OSError, ValueError):
                unreadable.append(image.path)
                continue
            if min(width, height) >= self.hq_size:
                usable.append(image)
            else:
                small.append(image.path)
        return usable, small, unreadable

    def __len__(self) -> int:
        return len(self.sources)

    def _read_captions(self) -> dict[Path, str]:
        from ..captioning import read_caption

        return {source.path: read_caption(source.path) or "" for source in self.sources}

    def _caption(self, path: Path) -> str:
        return self._captions.get(path, "")

    def _pair(
        self, index: int, generator: torch.Generator
    ) -> tuple[PIL.Image.Image, PIL.Image.Image, list[float], str]:
        for attempt in range(len(self.sources)):
            source = self.sources[(index + attempt) % len(self.sources)]
            try:
                image = load_rgb(source.path)
            except ValueError as error:
                logger.warning("Skipping an unreadable training image: %s", error)
                continue
            hq, lq, box = degraded_crop(image, self.hq_size, self.degradation, generator)
            return hq, lq, micro_conditioning(image.size, box, self.scale), self._caption(source.path)
        raise ValueError("None of the training images could be decoded.")

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = self._generator(index)
        hq, lq, time_ids, caption = self._pair(index, generator)
        return training_example(hq, lq, caption, time_ids, generator, self.caption_dropout, self.random_flip)

    def validation_pair(self, index: int) -> tuple[PIL.Image.Image, str]:
        """A fixed LQ crop of source ``index`` (its own seed, independent of the epoch) and its caption."""
        _, lq, _, caption = self._pair(index % len(self.sources), hashed_generator(self.seed, "validation", index))
        return lq, caption
