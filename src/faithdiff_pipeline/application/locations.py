"""Locations: where a job's files are, a local path or a URI (``s3://bucket/prefix``, ``gs://``, ``file://``, ``memory://``
and the other filesystems of pyarrow and fsspec, which Ray Data reads too).

A location is a plain string, so that a job plans and checks its files the same way wherever they are; only a URI
needs pyarrow (the ``[ray]`` extra), imported when one is met.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import suppress
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ..atomic_files import temporary_name
from ..image_io import result_text

if TYPE_CHECKING:
    import pyarrow.fs

# argparse's `type=Path`, and Path() in general, fold the double slash of a URI: `s3://b/out` becomes `s3:/b/out`.
_FOLDED_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):/(?!/)(?P<rest>.*)$")


def is_uri(location: str) -> bool:
    return "://" in location


def as_location(where: str | os.PathLike) -> str:
    """``where`` as a location string: a local path as given, or a URI (restored from the folded form a ``Path`` of
    it has)."""
    text = os.fspath(where)
    folded = _FOLDED_URI.match(text) if isinstance(where, Path) else None
    if folded is None:
        return text
    scheme, rest = folded["scheme"], folded["rest"]
    return f"{scheme}:///{rest}" if scheme == "file" else f"{scheme}://{rest}"


def absolute(location: str) -> str:
    """A local path made absolute (other processes, Ray's workers among them, do not share this working directory);
    a URI as it is."""
    return location if is_uri(location) else str(Path(location).resolve())


@lru_cache(maxsize=256)
def folder_filesystem(folder: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem of a folder URI and the folder's path on it: pyarrow's own filesystems first, else fsspec's
    (the same two that Ray's file reading uses). Cached per folder: an object store's client is costly to set up."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(folder)
    except (ValueError, pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError) as pyarrow_error:
        try:
            import fsspec.core
        except ImportError:
            raise ValueError(f"{folder!r} is not a URI that pyarrow can open ({pyarrow_error})") from pyarrow_error
        try:
            filesystem, path = fsspec.core.url_to_fs(folder)
        except (ValueError, ImportError) as error:
            raise ValueError(f"{folder!r} is not a URI that pyarrow or fsspec can open ({error})") from error
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem)), path


def locate(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem of a file or folder URI and its path on it."""
    folder, _, name = uri.rstrip("/").rpartition("/")
    if folder.endswith((":/", "://")):  # a file at the root: `memory://x.png`, `file:///x.png`
        return folder_filesystem(uri)
    filesystem, path = folder_filesystem(folder)
    return filesystem, f"{path.rstrip('/')}/{name}"


def name_of(location: str) -> str:
    """The file name of a location."""
    return location.rstrip("/").rpartition("/")[2] if is_uri(location) else Path(location).name


def stem_of(location: str) -> str:
    return PurePosixPath(name_of(location)).stem


def join(folder: str, name: str) -> str:
    """The location of ``name`` in ``folder``."""
    return f"{folder.rstrip('/')}/{name}" if is_uri(folder) else str(Path(folder) / name)


def beside(location: str, name: str) -> str:
    """The location of ``name`` in the folder of ``location``."""
    if not is_uri(location):
        return str(Path(location).with_name(name))
    return f"{location.rstrip('/').rpartition('/')[0]}/{name}"


def is_file(location: str) -> bool:
    if not is_uri(location):
        return os.path.isfile(location)
    import pyarrow.fs

    filesystem, path = locate(location)
    return filesystem.get_file_info(path).type == pyarrow.fs.FileType.File


def is_folder(location: str) -> bool:
    if not is_uri(location):
        return os.path.isdir(location)
    import pyarrow.fs

    filesystem, path = locate(location)
    return filesystem.get_file_info(path).type == pyarrow.fs.FileType.Directory


def files_in(folder: str) -> list[str]:
    """The names of the files (not folders) directly in ``folder``, sorted."""
    if not is_uri(folder):
        return sorted(entry.name for entry in os.scandir(folder) if entry.is_file())
    import pyarrow.fs

    filesystem, path = locate(folder)
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(path))
    return sorted(info.base_name for info in found if info.type == pyarrow.fs.FileType.File)


def is_our_result(location: str) -> bool:
    """Whether ``location`` holds a file that we wrote (our metadata, as :func:`~faithdiff_pipeline.image_io.result_text`
    tells them)."""
    if not is_file(location):
        return False
    if not is_uri(location):
        return result_text(location) is not None
    filesystem, path = locate(location)
    with filesystem.open_input_file(path) as stream:
        return result_text(stream) is not None  # PIL reads file objects as well as paths


def download(uri: str, target: Path) -> Path:
    """Copies the file at ``uri`` to the local ``target``."""
    filesystem, path = locate(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    with filesystem.open_input_stream(path) as stream, target.open("wb") as copy:
        shutil.copyfileobj(stream, copy)
    return target


def publish(local: Path, uri: str) -> None:
    """Copies a finished file to ``uri`` through a hidden temporary name beside it, then moves it into place, so that
    the name only ever holds a whole file."""
    filesystem, path = locate(uri)
    temporary = str(temporary_name(Path(path)))
    try:
        with local.open("rb") as source, filesystem.open_output_stream(temporary) as stream:
            shutil.copyfileobj(source, stream)
        filesystem.move(temporary, path)
    except BaseException:
        with suppress(OSError):
            filesystem.delete_file(temporary)
        raise


def make_folder(location: str) -> None:
    """Creates a folder (and its parents) where one is needed."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        return
    filesystem, path = folder_filesystem(location.rstrip("/"))
    # An object store needs no folders (and may refuse to make one): a folder that is needed and missing fails
    # each image's copy with the reason.
    with suppress(OSError):
        filesystem.create_dir(path, recursive=True)
