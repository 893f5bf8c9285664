"""The job planner: which inputs a job has and which files each gives, with the guards every command that writes keeps.

1. Nothing is written over, replaced or deleted that we did not make: a file in an output's place that is not one of
   ours, or an input in an output's place, is refused before any work; ``overwrite`` only redoes our own outputs.
2. Our own outputs are never taken for inputs: the files of ours in a folder or a glob pattern's matches are left
   out of the input scan, so an output folder equal to an input folder is safe to rerun, and one command's results
   beside the photos are not photos to another (a file named on its own is taken as given).
3. Inputs that give nothing to do are refused.
Every refusal is a ``ValueError`` naming the setting (`` `inputs` ``, `` `output_dir` ``), raised before any model
loads. Locations are local paths or URIs (:mod:`.locations`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..image_io import READABLE_SUFFIXES, SIXTEEN_BIT_INSTALL, needs_sixteen_bit_extra
from . import locations

# How many names a refusal lists before it says how many more there are.
_NAMES_SHOWN = 5


@dataclass(frozen=True)
class Job:
    """One input and the files it gives (locations); the first output is the result whose presence, with the others',
    marks the job as done."""

    source: str
    outputs: tuple[str, ...]

    @property
    def name(self) -> str:
        return locations.name_of(self.source)

    @property
    def result(self) -> str:
        return self.outputs[0]


@dataclass(frozen=True)
class Plan:
    """The jobs of a run: those to do, and those skipped because all their outputs are ours already."""

    todo: list[Job]
    skipped: list[Job]


def listing(items: Sequence[str]) -> str:
    """Names for a one-line message: the first few, then how many more."""
    shown = "; ".join(items[:_NAMES_SHOWN])
    return shown + (f"; and {len(items) - _NAMES_SHOWN} more" if len(items) > _NAMES_SHOWN else "")


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in READABLE_SUFFIXES and not name.startswith(".")


def _images_of(pattern: str) -> list[str]:
    """The image locations one input names: a file, a folder's images (sorted) or a local glob pattern. A local path
    that exists is taken literally, even with ``*?[`` in its name."""
    suffixes = ", ".join(READABLE_SUFFIXES)
    if not locations.is_uri(pattern) and not os.path.exists(pattern) and any(c in pattern for c in "*?["):
        matches = sorted(p for p in glob.glob(pattern) if is_image_name(Path(p).name) and os.path.isfile(p))
        if not matches:
            raise ValueError(f"no images match {pattern!r}.")
        return matches
    try:
        if locations.is_folder(pattern):
            return [locations.join(pattern, name) for name in locations.files_in(pattern) if is_image_name(name)]
        exists = locations.is_file(pattern)
    except (ValueError, OSError) as error:
        raise ValueError(f"input {pattern!r} cannot be read: {str(error).splitlines()[0]}") from error
    if not exists:
        raise ValueError(f"input {pattern!r} does not exist.")
    if not is_image_name(locations.name_of(pattern)):
        raise ValueError(f"input {pattern!r} is not a supported image ({suffixes}).")
    return [pattern]


def collect_inputs(patterns: Sequence[str | os.PathLike]) -> list[str]:
    """The image locations of files, folders (their images, not their subfolders) and glob patterns, each once, in
    order; local paths made absolute. Our own results are left out of folders and patterns, so that a rerun never
    takes a job's outputs for inputs. Raises ``ValueError`` when an input is missing, not an image, gives no
    images, or is a 16-bit colour image without the extra that reads it at full depth."""
    if isinstance(patterns, (str, os.PathLike)) or not patterns:
        raise ValueError(f"`inputs` must be a non-empty list of files, folders or patterns, got {patterns!r}.")
    found: list[str] = []
    for pattern in map(locations.as_location, patterns):
        images = _images_of(pattern)
        if len(images) != 1 or images[0] != pattern:
            images = [image for image in images if not locations.is_our_result(image)]
        if not images:
            where = "folder" if locations.is_folder(pattern) else "pattern"
            raise ValueError(
                f"{where} {pattern!r} holds no images to restore ({', '.join(READABLE_SUFFIXES)}; our own results are "
                "not inputs)."
            )
        found += images
    sources = list(dict.fromkeys(locations.absolute(image) for image in found))
    _check_sixteen_bit(sources)
    return sources


def _check_sixteen_bit(sources: Sequence[str]) -> None:
    """Refuses 16-bit colour inputs when the extra that reads them at full depth is missing."""
    missing = [s for s in sources if not locations.is_uri(s) and needs_sixteen_bit_extra(s)]
    if missing:
        raise ValueError(f"16-bit colour images need imagecodecs and tifffile ({SIXTEEN_BIT_INSTALL}): "
                         f"{listing(missing)}.")


def check_output_dir(output_dir: str, name: str = "output_dir") -> None:
    """A local output folder that is a file, or cannot be created, is refused (the message names the setting
    ``name``); it is created only once work starts, so that a job that fails before leaves nothing behind."""
    if locations.is_uri(output_dir):
        return
    folder = Path(output_dir)
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"`{name}` {output_dir!r} is a file.")
        return
    parent = folder.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"`{name}` {output_dir!r} cannot be created: {str(parent)!r} is a file.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"`{name}` {output_dir!r} cannot be created: no permission to write in {str(parent)!r}.")


def plan_jobs(
    sources: Sequence[str],
    output_dir: str | os.PathLike,
    output_names: Callable[[str], Sequence[str]],
    overwrite: bool = False,
) -> Plan:
    """The jobs of ``sources``, their outputs in ``output_dir`` named by ``output_names(stem)`` (the result first).

    Refuses, before any work: outputs that would share a name, outputs that would replace an input, and files in an
    output's place that are not ours. A job whose outputs all exist (ours) is skipped unless ``overwrite``.
    """
    check_output_dir(locations.as_location(output_dir))
    output = locations.absolute(locations.as_location(output_dir))
    jobs = [
        Job(source, tuple(locations.join(output, name) for name in output_names(locations.stem_of(source))))
        for source in sources
    ]
    writers: dict[str, list[str]] = {}
    for job in jobs:
        for target in job.outputs:
            writers.setdefault(target, []).append(job.source)
    clashes = [f"{' and '.join(s)} would both be written as {locations.name_of(t)}" for t, s in writers.items() if len(s) > 1]
    if clashes:
        raise ValueError(f"results would clash: {listing(clashes)}; rename the inputs or split the job.")
    replaced = [target for target in writers if target in set(sources)]
    if replaced:
        raise ValueError(
            f"results would replace input files: {listing(replaced)}; choose another `output_dir` (inputs are never "
            "overwritten, `overwrite` or not)."
        )
    try:
        existing = {target for target in writers if locations.is_file(target)}
        foreign = [target for target in existing if not locations.is_our_result(target)]
    except (ValueError, OSError) as error:
        raise ValueError(f"`output_dir` {output!r} cannot be read: {str(error).splitlines()[0]}") from error
    if foreign:
        raise ValueError(
            f"files that are not faithdiff results are in the way: {listing(sorted(foreign))}; move them or choose "
            "another `output_dir` (files we did not make are never replaced)."
        )
    done = [job for job in jobs if not overwrite and all(target in existing for target in job.outputs)]
    return Plan([job for job in jobs if job not in done], done)
