"""Evaluation sets: HQ/LQ folders paired by file stem, and synthetic sets made from HQ images with a degradation preset."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image

from ..atomic_files import write_text_atomic
from ..image_io import READABLE_SUFFIXES, image_size, read_image, save_image

if TYPE_CHECKING:
    import torch

MANIFEST_NAME = "manifest.json"
# How an HQ image is cut to a multiple of the scale; recorded in the manifest.
CROP_RULE = (
    "top-left: the bottom rows and right columns beyond a multiple of the scale are dropped (BasicSR's mod_crop)"
)
_NAMES_SHOWN = 10


@dataclass(frozen=True)
class ImagePair:
    """One HQ image and its LQ version; sizes are ``(width, height)``."""

    name: str
    hq: Path
    lq: Path
    hq_size: tuple[int, int]
    lq_size: tuple[int, int]


@dataclass(frozen=True)
class PairedSet:
    """HQ/LQ pairs, sorted by name, all with the same integer ``scale`` (HQ size = scale x LQ size)."""

    pairs: list[ImagePair]
    scale: int
    hq_dir: Path
    lq_dir: Path


def read_tensor(path: str | os.PathLike) -> torch.Tensor:
    """An image file, read by :func:`faithdiff_pipeline.image_io.read_image` (upright, in sRGB, 16-bit samples
    kept), as the RGB ``[1, 3, H, W]`` float32 tensor in [0, 1] that the metrics and the degradations take.

    Raises:
        ValueError: the file is not a readable image (the message says why).
    """
    # torch is imported where tensors are made, so that the harness's command line and folder checks do not load it.
    import torch

    return torch.from_numpy(read_image(path).as_float()).permute(2, 0, 1)[None]


def list_images(folder: str | os.PathLike, role: str) -> dict[str, Path]:
    """The images of ``folder`` by file stem. ``role`` names the folder in errors (e.g. ``"HQ folder"``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{role} {str(folder)!r} is not a folder.")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in READABLE_SUFFIXES and not path.name.startswith("."):
            found.setdefault(path.stem, []).append(path)
    if not found:
        raise ValueError(
            f"{role} {str(folder)!r} holds no images; expected files ending in {', '.join(READABLE_SUFFIXES)}."
        )
    clashes = [f"{', '.join(p.name for p in paths)}" for paths in found.values() if len(paths) > 1]
    if clashes:
        raise ValueError(
            f"{role} {str(folder)!r} has several images with the same name: {format_names(clashes)}; keep one of each."
        )
    return {stem: paths[0] for stem, paths in found.items()}


def format_names(names: Iterable[str]) -> str:
    """Names for an error message: the first ten, then how many more."""
    names = list(names)
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown if len(names) <= _NAMES_SHOWN else f"{shown} and {len(names) - _NAMES_SHOWN} more"


def missing_names(wanted: Iterable[str], present: Iterable[str]) -> list[str]:
    """The names of ``wanted`` that are not in ``present``, sorted."""
    present = set(present)
    return sorted(name for name in wanted if name not in present)


def pair_folders(hq_dir: str | os.PathLike, lq_dir: str | os.PathLike) -> PairedSet:
    """Pairs the images of ``hq_dir`` and ``lq_dir`` by file stem and checks that every HQ image is the same integer
    multiple (the scale) of its LQ image in both dimensions.

    Raises:
        ValueError: a folder is missing or empty, an image has no partner (all are named), or the sizes disagree.
    """
    hq = list_images(hq_dir, "HQ folder")
    lq = list_images(lq_dir, "LQ folder")
    problems = []
    if without_lq := missing_names(hq, lq):
        problems.append(
            f"LQ folder {str(lq_dir)!r} lacks {len(without_lq)} image(s) of the HQ folder: {format_names(without_lq)}"
        )
    if without_hq := missing_names(lq, hq):
        problems.append(
            f"HQ folder {str(hq_dir)!r} lacks {len(without_hq)} image(s) of the LQ folder: {format_names(without_hq)}"
        )
    if problems:
        raise ValueError("; ".join(problems) + " (images are paired by file name without extension).")
    pairs = [ImagePair(name, hq[name], lq[name], image_size(hq[name]), image_size(lq[name])) for name in sorted(hq)]
    scale = _scale_of(pairs[0])
    for pair in pairs:
        expected = (pair.lq_size[0] * scale, pair.lq_size[1] * scale)
        if pair.hq_size != expected:
            raise ValueError(
                f"HQ image {pair.name!r} is {_wxh(pair.hq_size)} but its LQ image is {_wxh(pair.lq_size)}: "
                f"HQ must be {scale} x LQ = {_wxh(expected)} (the scale of {pairs[0].name!r})."
            )
    return PairedSet(pairs=pairs, scale=scale, hq_dir=Path(hq_dir), lq_dir=Path(lq_dir))


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _scale_of(pair: ImagePair) -> int:
    (hq_w, hq_h), (lq_w, lq_h) = pair.hq_size, pair.lq_size
    if hq_w % lq_w or hq_h % lq_h or hq_w // lq_w != hq_h // lq_h:
        raise ValueError(
            f"HQ image {pair.name!r} is {_wxh(pair.hq_size)} but its LQ image is {_wxh(pair.lq_size)}: "
            "HQ must be the same integer multiple (the scale) of LQ in width and height."
        )
    return hq_w // lq_w


def image_seed(seed: int, name: str) -> int:
    """The seed of one image of a synthetic set: a hash of the set's ``seed`` and the image's name, so an image gets
    the same degradation whatever the other images of the folder and their order."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def crop_to_multiple(image: torch.Tensor, scale: int) -> torch.Tensor:
    """``image`` (``[..., H, W]``) cut to a multiple of ``scale`` by dropping its last rows and columns."""
    height, width = image.shape[-2:]
    if height < scale or width < scale:
        raise ValueError(f"An HQ image of {width}x{height} pixels is smaller than the scale {scale}.")
    return image[..., : height - height % scale, : width - width % scale]


def _jsonable(value: Any) -> Any:
    """Config values that JSON has no type for (tuples become lists by themselves) are written as text."""
    import torch

    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    return str(value)


def _versions() -> dict[str, str]:
    import torch

    from .. import __version__

    return {
        "faithdiff_pipeline": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "Pillow": PIL.__version__,
    }


def _set_description(preset: str, config: Any, seed: int, source: Path) -> dict[str, Any]:
    return {
        "preset": preset,
        "config": json.loads(json.dumps(config.to_dict(), default=_jsonable)),
        "seed": seed,
        "scale": int(config.scale),
        "crop": CROP_RULE,
        "image_seed": "first 8 bytes (little-endian, 63 bits) of sha256('<seed>/<image name>')",
        "source": str(source.resolve()),
    }


def _resolve_preset(preset: str) -> Any:
    from .. import degradations

    if preset not in degradations.PRESETS:
        raise ValueError(f"`preset` {preset!r} is unknown; expected one of {', '.join(degradations.PRESETS)}.")
    return degradations.get_preset(preset)


def make_synthetic_set(
    hq_dir: str | os.PathLike,
    set_dir: str | os.PathLike,
    preset: str,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> PairedSet:
    """Builds LQ/HQ pairs from the images of ``hq_dir`` with a degradation preset of
    :mod:`faithdiff_pipeline.degradations`.

    Each HQ image is cut to a multiple of the preset's scale (top-left kept, see ``CROP_RULE``) and written to
    ``set_dir/hq/<name>.png``; its degraded version goes to ``set_dir/lq/<name>.png``, made with a generator seeded
    by :func:`image_seed`, so a set is the same, byte for byte, whenever it is rebuilt. ``set_dir/manifest.json``
    records the preset, its full config, the seed, the rules above and the package versions.

    An existing set made with the same preset, config, seed and source images is completed (images already written
    are kept), for instance after an interruption; one made otherwise is only replaced with ``overwrite``, which
    removes only the images its manifest lists. Nothing is ever written over, or deleted from, ``hq_dir``: a set
    folder whose ``hq/`` or ``lq/`` would be, contain or lie inside ``hq_dir`` is refused, and so is a folder that
    holds files but no manifest of ours, ``overwrite`` or not.

    Returns:
        The set as a :class:`PairedSet`.

    Raises:
        ValueError: an unknown preset, no images in ``hq_dir``, or a ``set_dir`` refused as above (before any image
            is written); the message names the user's folders.
    """
    import torch

    from ..degradations import degrade, to_pil

    config = _resolve_preset(preset)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an integer, got {seed!r}.")
    sources = list_images(hq_dir, "HQ folder")
    set_dir = Path(set_dir)
    check_set_dir(set_dir, [Path(hq_dir)])
    names = sorted(sources)
    description = _set_description(preset, config, seed, Path(hq_dir))
    description["images"] = [
        {"name": name, "source": sources[name].name, "seed": image_seed(seed, name)} for name in names
    ]
    previous, reuse = _check_existing_set(set_dir, description, overwrite)
    if not reuse:
        _remove_set_images(set_dir, previous)
        # Written first, so that an interrupted build is recognised and completed by the next one.
        _write_json({**description, "versions": _versions()}, set_dir / MANIFEST_NAME)
    scale = description["scale"]
    for folder in (set_dir / "hq", set_dir / "lq"):
        folder.mkdir(parents=True, exist_ok=True)
    for name in _progress(names, progress, f"making {preset} set"):
        hq_path, lq_path = set_dir / "hq" / f"{name}.png", set_dir / "lq" / f"{name}.png"
        if reuse and hq_path.is_file() and lq_path.is_file():
            continue
        hq = crop_to_multiple(read_tensor(sources[name]), scale)
        generator = torch.Generator("cpu").manual_seed(image_seed(seed, name))
        lq = degrade(hq, config, generator)
        for image, path in ((hq, hq_path), (lq, lq_path)):
            try:
                save_image(to_pil(image), path)
            except OSError as error:  # named by the user's path, not by the temporary one written first
                raise ValueError(f"{str(path)!r} cannot be written: {error.strerror or error}") from error
    return pair_folders(set_dir / "hq", set_dir / "lq")


# The folders and files a set writes in its folder.
SET_FOLDERS = ("hq", "lq")


def overlaps(one: Path, other: Path) -> bool:
    """Whether two paths are the same, or one lies inside the other."""
    one, other = one.resolve(), other.resolve()
    return one == other or one.is_relative_to(other) or other.is_relative_to(one)


def check_set_dir(set_dir: Path, inputs: Sequence[Path], outputs: Sequence[str] = SET_FOLDERS) -> None:
    """Refuses a set folder that is a file or cannot be created, or whose ``outputs`` (its ``hq/`` and ``lq/``
    folders) would be, contain or lie inside one of ``inputs`` (the source images, their ground truth): building
    the set would write over them, and replacing it would delete them."""
    from ..application.planning import check_output_dir

    check_output_dir(str(set_dir), "set_dir")
    for source in inputs:
        clashes = [name for name in outputs if overlaps(set_dir / name, source)]
        if clashes:
            where = " and ".join(f"{set_dir / name}" for name in clashes)
            raise ValueError(
                f"`set_dir` {str(set_dir)!r} would write the set's {where} over {str(source)!r}, an input of the set; "
                "choose a set folder apart from the inputs (inputs are never written over or deleted)."
            )


def read_set_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a set made here; a file that is not one (not JSON, or without a set's entries) is refused."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = str(error).splitlines()[0]
        raise ValueError(f"{str(path)!r} is not the manifest of a set made by faithdiff-eval ({reason}).") from error
    entries = ("preset", "seed", "scale", "images")
    if not isinstance(manifest, dict) or any(key not in manifest for key in entries):
        raise ValueError(
            f"{str(path)!r} is not the manifest of a set made by faithdiff-eval (it lacks {', '.join(entries)}); "
            "choose another `set_dir` (files we did not make are never replaced)."
        )
    return manifest


def _listed_names(manifest: dict[str, Any] | None) -> list[str]:
    if manifest is None:
        return []
    names = [entry.get("name") for entry in manifest["images"] if isinstance(entry, dict)]
    # A name is a file stem: anything else (a path) names no file of the set.
    return [name for name in names if isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name]


def _check_existing_set(
    set_dir: Path, description: dict[str, Any], overwrite: bool
) -> tuple[dict[str, Any] | None, bool]:
    """The manifest of the set already in ``set_dir`` (``None`` if there is none), and whether its images may be kept.
    Raises if they belong to another set (without ``overwrite``), if the folder holds files but no set of ours, or
    if a file that the old set did not write is in the place of one of the new set's images."""
    manifest_path = set_dir / MANIFEST_NAME
    if not manifest_path.exists():
        if set_dir.is_dir() and any(set_dir.iterdir()):
            raise ValueError(
                f"`set_dir` {str(set_dir)!r} is not empty and holds no {MANIFEST_NAME}, so it is no set of ours; "
                "choose an empty or new folder (files we did not make are never replaced, `overwrite` or not)."
            )
        return None, False
    existing = read_set_manifest(manifest_path)
    differing = [
        key for key in ("preset", "config", "seed", "scale", "crop", "images") if existing.get(key) != description[key]
    ]
    if differing and not overwrite:
        raise ValueError(
            f"`set_dir` {str(set_dir)!r} holds a set made otherwise (its {', '.join(differing)} differ: preset "
            f"{existing.get('preset')!r}, seed {existing.get('seed')!r}, {len(existing.get('images', []))} images; this "
            f"run asks for {description['preset']!r}, seed {description['seed']}, {len(description['images'])} images); "
            "choose another folder or pass overwrite=True (--overwrite)."
        )
    listed = set(_listed_names(existing))
    in_the_way = [
        str(set_dir / folder / f"{entry['name']}.png")
        for entry in description["images"]
        if entry["name"] not in listed
        for folder in SET_FOLDERS
        if (set_dir / folder / f"{entry['name']}.png").exists()
    ]
    if in_the_way:
        raise ValueError(
            f"files that the set in `set_dir` {str(set_dir)!r} did not write are in the way: "
            f"{format_names(in_the_way)}; move them or choose another folder (files we did not make are never replaced)."
        )
    return existing, not differing and not overwrite


def _remove_set_images(set_dir: Path, manifest: dict[str, Any] | None) -> None:
    """Removes the images that the set described by ``manifest`` wrote, and nothing else."""
    for name in _listed_names(manifest):
        for folder in SET_FOLDERS:
            (set_dir / folder / f"{name}.png").unlink(missing_ok=True)


def _write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _progress(items: list, enabled: bool, description: str) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="image", disable=not enabled)
