"""``faithdiff-upscale --engine ray``: the same job as the local engine, run by a pool of Ray Data workers on one
machine or a cluster, with inputs and outputs in local folders or object storage (``s3://bucket/prefix``, ``gs://``,
``file://`` and the other filesystems of pyarrow and fsspec that Ray reads).

The driver checks and plans the job exactly as the local engine does (for local paths with the local engine's own
functions), then runs at most two stages, each a Ray Data ``map_batches`` over an actor pool: captions first, where
images need them (a batch per worker, through :func:`faithdiff_pipeline.cli.caption_first`), then restoration (one
image per task, through :func:`faithdiff_pipeline.cli.run`), each worker loading the pipeline once through
:mod:`faithdiff_pipeline.loading`. Results get the local engine's names, seeds, metadata and atomic writes.

A worker process that dies is restarted and the images it had not finished are retried; a result that a dead worker
had already written counts as done, not twice, and an image that kills its worker on every try is listed as failed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from . import cli
from .atomic_files import remove_leftovers, temporary_name
from .image_io import READABLE_SUFFIXES, result_text
from .loading import installed
from .restoration_settings import RestorationSettings

if TYPE_CHECKING:
    import numpy as np
    import pyarrow.fs

RAY_INSTALL = "pip install 'faithdiff-pipeline[ray]'"
# Test hook: see `_crash_once`.
CRASH_ONCE_ENV = "FAITHDIFF_RAY_TEST_CRASH_ONCE"
# Tries of one image (of one caption batch) whose worker dies: enough for a crash or a lost node, few enough that an
# image that kills its worker every time (an out-of-memory kill) is soon listed as failed instead of holding up the job.
MAX_TRIES = 3
_RAY_OPTIONS = {"ray_address": "--ray-address", "workers": "--workers", "gpus_per_worker": "--gpus-per-worker"}
# argparse's `type=Path` folds the double slash of a URI: `s3://bucket/out` arrives as `s3:/bucket/out`.
_FOLDED_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):/(?!/)(?P<rest>.*)$")


class JobFailed(RuntimeError):
    """The Ray job as a whole could not run (no cluster at the address, an error inside Ray)."""


@dataclass
class RaySummary(cli.Summary):
    """The local engine's summary, with the throughput of the pool and the deaths of worker processes it survived."""

    worker_deaths: int = 0

    def report(self) -> str:
        first, *failures = super().report().split("\n")
        if self.done and self.seconds > 0:
            first += f", {len(self.done) / self.seconds:.2f} images per second"
        if self.worker_deaths:
            first += (
                f"\n  {self.worker_deaths} worker process death(s): each worker was restarted and the work it had "
                "not finished was retried"
            )
        return "\n".join([first, *failures])


@dataclass(frozen=True)
class _Pool:
    """The actor pool of a stage: its workers and the GPUs each reserves."""

    workers: int
    gpus_per_worker: float


# ------------------------------------------------------------------------------------------------------ front-ends


def check_engine_options(args: argparse.Namespace) -> None:
    """Refuses the Ray options without ``--engine ray``, so that they are never silently ignored."""
    given = [flag for name, flag in _RAY_OPTIONS.items() if getattr(args, name, None) is not None]
    if getattr(args, "engine", "local") != "ray" and given:
        verb = "needs" if len(given) == 1 else "need"
        raise cli.UsageError(f"{', '.join(given)} {verb} --engine ray (the engine is {args.engine})")


def restore(args: argparse.Namespace, prog: str = cli.PROG) -> int:
    """``faithdiff-upscale --engine ray``: runs the job, prints the summary and returns the exit status; messages are
    headed ``prog``. Mistakes raise :class:`~faithdiff_pipeline.cli.UsageError`, before any model loads."""
    try:
        summary = run_job(args, prog)
    except JobFailed as error:
        return cli.error_line(str(error), prog)
    print(summary.report())
    return 1 if summary.failed else 0


def upscale_on_ray(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    ray_address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    **options: Any,
) -> RaySummary:
    """Restores ``inputs`` into ``output_dir`` on Ray: ``faithdiff-upscale INPUT... -o OUTPUT --engine ray`` as a
    function. Joins the cluster at ``ray_address`` (or the one ``ray.init()`` finds or starts) unless Ray is already
    initialised in this process.

    Args:
        inputs: Image files, folders and glob patterns, local or URIs (a URI names a file or a folder).
        output_dir: Where results go: a local folder or a URI.
        ray_address: The cluster to join, e.g. ``ray://head:10001``.
        workers: Workers, each loading the pipeline once (default 1).
        gpus_per_worker: GPUs reserved per worker; fractions share one (default: 1 where the cluster has GPUs).
        options: The command's other options by their long names with ``_`` for ``-``: ``steps=20``,
            ``prompt="..."``, ``model="path/or/hub-id"``, ``overwrite=True``, ...

    Returns:
        What was done, skipped (already restored) and failed, with the reasons.

    Raises:
        ValueError: a mistake in the options or inputs (before any model loads).
        JobFailed: the cluster could not be reached or the Ray job broke down.
    """
    if isinstance(inputs, (str, os.PathLike)) or not inputs:
        raise ValueError(f"`inputs` must be a non-empty sequence of files, folders or patterns, got {inputs!r}.")
    args = cli.build_parser().parse_args([*map(os.fspath, inputs), "--engine", "ray"])
    args.output_dir = os.fspath(output_dir)
    args.ray_address, args.workers, args.gpus_per_worker = ray_address, workers, gpus_per_worker
    for name, value in options.items():
        if name in ("inputs", "output_dir", "engine") or not hasattr(args, name):
            raise ValueError(f"`{name}` is not an option of faithdiff-upscale's Ray engine, got {name}={value!r}.")
        setattr(args, name, value)
    return run_job(args)


def run_job(args: argparse.Namespace, prog: str = cli.PROG) -> RaySummary:
    """Checks, plans and runs a parsed ``faithdiff-upscale --engine ray`` command; its notes on stderr are headed
    ``prog``."""
    if not installed("ray"):
        raise cli.UsageError(f"--engine ray needs Ray Data, which is not installed: {RAY_INSTALL}")
    args = argparse.Namespace(**vars(args))
    output = _output_location(args.output_dir)
    if not _is_uri(output):
        args.output_dir = Path(output)
    settings = _check_arguments(args, output)
    if not _is_uri(output):
        # Workers do not share the driver's working directory.
        output = str(Path(output).resolve())
    records, skipped = _plan(args, settings.output.suffix, output)
    summary = RaySummary(skipped=skipped)
    if not records:
        return summary
    import ray

    started = _connect(args.ray_address)
    try:
        pool = _Pool(args.workers or 1, _gpus_per_worker(args.gpus_per_worker))
        _check_device(settings.device, pool.gpus_per_worker)
        # A worker without GPUs of its own may still see the machine's: `auto` must not take them.
        if settings.device == "auto" and pool.gpus_per_worker == 0:
            settings = replace(settings, device="cpu")
        attempts = ray.remote(num_cpus=0)(_Attempts).remote()
        records = _caption_stage(records, settings, pool, attempts, summary, prog)
        _restore_stage(records, settings, pool, output, args.overwrite, attempts, summary)
        summary.worker_deaths = ray.get(attempts.deaths.remote())
        ray.kill(attempts)
    finally:
        if started:
            ray.shutdown()
    return summary


# --------------------------------------------------------------------------------------------------------- checks


def _check_arguments(args: argparse.Namespace, output: str) -> RestorationSettings:
    """The local engine's checks, and those of the Ray options; the restoration settings."""
    checked = argparse.Namespace(**vars(args))
    # An object store needs no local folder: the local check of the output folder is the one that does not apply.
    checked.output_dir = Path(tempfile.gettempdir()) if _is_uri(output) else Path(output)
    settings = cli.parse_settings(checked)
    if args.captions_only:
        raise cli.UsageError("--captions-only runs on the local engine; drop --engine ray")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise cli.UsageError("--engine ray starts its own workers; run it without accelerate launch or torchrun")
    if args.workers is not None and args.workers < 1:
        raise cli.UsageError(f"--workers must be at least 1, got {args.workers}")
    gpus = args.gpus_per_worker
    if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
        raise cli.UsageError(f"--gpus-per-worker must be a finite number >= 0, got {gpus}")
    if re.fullmatch(r"cuda:\d+", args.device):
        # Ray gives each worker its own GPUs, which the worker sees as cuda:0, cuda:1, ...
        raise cli.UsageError(f"--device {args.device} names one GPU; with --engine ray use --device cuda or auto")
    return settings


def _check_device(device: str, gpus: float) -> None:
    """A GPU device without GPUs reserved for it would share GPUs behind Ray's back; GPUs reserved for the CPU would
    sit idle."""
    if device == "cuda" and gpus == 0:
        raise cli.UsageError("--device cuda with --engine ray needs --gpus-per-worker above 0")
    if device in ("cpu", "mps") and gpus > 0:
        raise cli.UsageError(f"--gpus-per-worker {gpus:g} reserves GPUs that --device {device} leaves idle")


# ----------------------------------------------------------------------------------------------------- locations


def _is_uri(location: str) -> bool:
    return "://" in location


def _output_location(output_dir: str | os.PathLike) -> str:
    """The output folder as given: a local path, or a URI (restored from the folded form argparse gives)."""
    text = os.fspath(output_dir)
    folded = _FOLDED_URI.match(text) if isinstance(output_dir, Path) else None
    if folded is None:
        return text
    scheme, rest = folded["scheme"], folded["rest"]
    return f"{scheme}:///{rest}" if scheme == "file" else f"{scheme}://{rest}"


@lru_cache(maxsize=256)
def _folder_filesystem(folder: str) -> tuple[pyarrow.fs.FileSystem, str]:
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


def _locate(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    folder, _, name = uri.rstrip("/").rpartition("/")
    if folder.endswith((":/", "://")):  # a file at the root: `memory://x.png`, `file:///x.png`
        return _folder_filesystem(uri)
    filesystem, path = _folder_filesystem(folder)
    return filesystem, f"{path.rstrip('/')}/{name}"


def _name(location: str) -> str:
    return location.rstrip("/").rpartition("/")[2] if _is_uri(location) else Path(location).name


def _beside(location: str, name: str) -> str:
    """The location of ``name`` in the folder of ``location``."""
    if not _is_uri(location):
        return str(Path(location).with_name(name))
    return f"{location.rstrip('/').rpartition('/')[0]}/{name}"


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if _is_uri(folder) else str(Path(folder) / name)


def _sidecar(location: str) -> str:
    """The caption sidecar's location: ``photo.jpg`` -> ``photo.json`` (as :func:`captioning.sidecar_path`)."""
    return _beside(location, f"{PurePosixPath(_name(location)).stem}.json")


def _is_file(location: str) -> bool:
    if not _is_uri(location):
        return os.path.isfile(location)
    import pyarrow.fs

    filesystem, path = _locate(location)
    return filesystem.get_file_info(path).type == pyarrow.fs.FileType.File


def _is_our_result(location: str) -> bool:
    """Whether ``location`` holds one of our results (our metadata), as the local engine tells them."""
    if not _is_file(location):
        return False
    if not _is_uri(location):
        return result_text(location) is not None
    filesystem, path = _locate(location)
    with filesystem.open_input_file(path) as stream:
        return result_text(stream) is not None  # PIL reads file objects as well as paths


def _download(uri: str, target: Path) -> Path:
    filesystem, path = _locate(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    with filesystem.open_input_stream(path) as stream, target.open("wb") as copy:
        shutil.copyfileobj(stream, copy)
    return target


def _publish(local: Path, uri: str) -> None:
    """Copies a finished file to ``uri`` through a hidden temporary name beside it, then moves it into place, so that
    the name only ever holds a whole file."""
    filesystem, path = _locate(uri)
    temporary = str(temporary_name(Path(path)))
    try:
        with local.open("rb") as source, filesystem.open_output_stream(temporary) as stream:
            shutil.copyfileobj(source, stream)
        filesystem.move(temporary, path)
    except BaseException:
        with suppress(OSError):
            filesystem.delete_file(temporary)
        raise


def _make_folder(location: str) -> None:
    if not _is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        return
    filesystem, path = _folder_filesystem(location.rstrip("/"))
    # An object store needs no folders (and may refuse to make one): a folder that is needed and missing fails
    # each image's copy with the reason.
    with suppress(OSError):
        filesystem.create_dir(path, recursive=True)


# -------------------------------------------------------------------------------------------------------- planning


def _plan(args: argparse.Namespace, suffix: str, output: str) -> tuple[list[dict], list[str]]:
    """``(records to do, names skipped)``: one record per image, in input order, with the local engine's result
    names (ending in ``suffix``). Clashes, results that would replace inputs and foreign files in a result's place
    are refused first."""
    sources = list(dict.fromkeys(location for pattern in args.inputs for location in _collect(pattern)))
    local = [Path(source) for source in sources if not _is_uri(source)]
    cli._check_sixteen_bit(local)
    if not _is_uri(output):
        remove_leftovers(output)
    if _is_uri(output) or len(local) < len(sources):
        return _plan_anywhere(sources, args, suffix, output)
    todo, skipped = cli.sort_jobs(cli.plan_jobs(local, Path(output), suffix, args.compare), args.overwrite)
    records = [
        _record(index, str(job.source), str(job.result), str(job.compare or "")) for index, job in enumerate(todo)
    ]
    return records, [job.source.name for job in skipped]


def _record(index: int, source: str, result: str, compare: str) -> dict:
    # Plain strings and "" for "none": Ray Data stores records as Arrow columns, which want one type per column.
    return {
        "index": index,
        "name": _name(source),
        "source": source,
        "result": result,
        "compare": compare,
        "caption": "",
    }


def _collect(pattern: str) -> list[str]:
    if not _is_uri(pattern):
        return [str(path) for path in cli.collect_inputs([pattern])]
    import pyarrow.fs

    try:
        filesystem, path = _locate(pattern)
        info = filesystem.get_file_info(path)
        is_folder = info.type == pyarrow.fs.FileType.Directory
        found = filesystem.get_file_info(pyarrow.fs.FileSelector(path)) if is_folder else []
    except (ValueError, OSError) as error:
        raise cli.UsageError(f"input {pattern!r} cannot be read: {str(error).splitlines()[0]}") from error
    if is_folder:
        names = sorted(f.base_name for f in found if f.type == pyarrow.fs.FileType.File and _is_image(f.base_name))
        if not names:
            raise cli.UsageError(f"folder {pattern!r} holds no images ({', '.join(READABLE_SUFFIXES)})")
        return [_join(pattern, name) for name in names]
    if info.type != pyarrow.fs.FileType.File:
        raise cli.UsageError(f"input {pattern!r} does not exist")
    if not _is_image(_name(pattern)):
        raise cli.UsageError(f"input {pattern!r} is not a supported image ({', '.join(READABLE_SUFFIXES)})")
    return [pattern]


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in READABLE_SUFFIXES and not name.startswith(".")


def _plan_anywhere(
    sources: list[str], args: argparse.Namespace, suffix: str, output: str
) -> tuple[list[dict], list[str]]:
    """:func:`cli.plan_jobs` and :func:`cli.sort_jobs` for jobs that read or write URIs, with the same refusals."""
    records = []
    for index, source in enumerate(sources):
        stem = PurePosixPath(_name(source)).stem
        compare = _join(output, f"{stem}_compare.png") if args.compare else ""
        records.append(_record(index, source, _join(output, f"{stem}{suffix}"), compare))
    writers: dict[str, list[str]] = {}
    for record in records:
        for target in filter(None, (record["result"], record["compare"])):
            writers.setdefault(target, []).append(record["source"])
    clashes = [f"{' and '.join(s)} would both be written as {_name(t)}" for t, s in writers.items() if len(s) > 1]
    if clashes:
        raise cli.UsageError(f"results would clash: {cli._names(clashes)}; rename the inputs or split the job")
    replaced = [target for target in writers if target in set(sources)]
    if replaced:
        raise cli.UsageError(
            f"results would replace input files: {cli._names(replaced)}; choose another --output-dir (inputs are "
            "never overwritten, --overwrite or not)"
        )
    try:
        foreign = [t for t in writers if _is_file(t) and not _is_our_result(t)]
        done = {r["index"] for r in records if not args.overwrite and _is_file(r["result"])}
    except (ValueError, OSError) as error:
        raise cli.UsageError(f"--output-dir {output!r} cannot be read: {str(error).splitlines()[0]}") from error
    if foreign:
        raise cli.UsageError(
            f"files that are not faithdiff results are in the way: {cli._names(foreign)}; move them or choose "
            "another --output-dir"
        )
    return [r for r in records if r["index"] not in done], [r["name"] for r in records if r["index"] in done]


# ----------------------------------------------------------------------------------------------------- the cluster


def _connect(address: str | None) -> bool:
    """Joins the cluster (``address``, else the one ``ray.init`` finds or starts); whether this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f" at {address!r}" if address else ""
        raise JobFailed(f"could not join the Ray cluster{where}: {str(error).splitlines()[0]}") from error
    return True


def _gpus_per_worker(requested: float | None) -> float:
    import ray

    if requested is not None:
        return requested
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _run_stage(records: list[dict], worker: type, worker_options: dict, pool: _Pool, batch: int) -> list[dict]:
    """``worker``, made with ``worker_options``, over ``records`` on ``pool``, ``batch`` records per task; the rows they
    return. Ray Data restarts a worker that dies and retries its task (its default for actor pools); a task that
    fails for good drops its block, not the job: its records return no row."""
    import ray.data

    context = ray.data.DataContext.get_current()
    previous = context.max_errored_blocks
    context.max_errored_blocks = -1
    try:
        dataset = ray.data.from_items(records, override_num_blocks=math.ceil(len(records) / batch))
        mapped = dataset.map_batches(
            worker,
            batch_size=batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(pool.workers, math.ceil(len(records) / batch))),
            num_gpus=pool.gpus_per_worker or None,
            fn_constructor_kwargs=worker_options,
        )
        return mapped.take_all()
    except ray.exceptions.RayError as error:
        raise JobFailed(f"the Ray job failed: {str(error).strip().splitlines()[0]}") from error
    finally:
        context.max_errored_blocks = previous


def _rows_by_index(rows: list[dict]) -> dict[int, dict]:
    # One row per image counts, should Ray ever hand back the rows of a retried task twice.
    by_index: dict[int, dict] = {}
    for row in rows:
        by_index.setdefault(int(row["index"]), row)
    return by_index


def _reason(row: dict | None, prefix: str = "") -> str:
    """Why an image failed: its row's reason, or, for an image whose task Ray gave up on, that."""
    return str(row["reason"]) if row is not None else f"{prefix}its task failed inside Ray (see the Ray logs)"


def _lost(stage: str) -> str:
    return f"its worker process died {MAX_TRIES} times while {stage} it"


class _Attempts:
    """Counts the tries of each unit of work (an image, a caption batch) across worker restarts, which a dead
    worker's own memory cannot; every try after the first follows the death of the worker of the one before."""

    def __init__(self) -> None:
        self.tries: dict[str, int] = {}

    def begin(self, key: str) -> int:
        self.tries[key] = self.tries.get(key, 0) + 1
        return self.tries[key]

    def deaths(self) -> int:
        return sum(count - 1 for count in self.tries.values())


def _give_up(attempts: Any, key: str) -> bool:
    """Starts a try of ``key``; whether it already had its :data:`MAX_TRIES`."""
    import ray

    return ray.get(attempts.begin.remote(key)) > MAX_TRIES


# ------------------------------------------------------------------------------------------------------- captions


def _caption_stage(
    records: list[dict],
    settings: RestorationSettings,
    pool: _Pool,
    attempts: Any,
    summary: RaySummary,
    prog: str,
) -> list[dict]:
    """The local engine's captions-first step on the pool: the images without a sidecar are captioned, their sidecars
    written, and the captioner leaves the workers before restoration starts. Returns the records left to restore;
    the captioner's notes go to stderr, headed ``prog``."""
    if settings.prompt is not None or settings.caption != "auto" or settings.captioner == "none":
        return records
    needing = [record for record in records if not _is_file(_sidecar(record["source"]))]
    note = _driver_side_note(settings, pool)
    if not needing or note is not None:
        if needing and note:
            print(f"{prog}: {note}", file=sys.stderr)
        return records
    batch = math.ceil(len(needing) / pool.workers)
    options = {"settings": settings, "attempts": attempts}
    rows = _rows_by_index(_run_stage(needing, _CaptionWorker, options, pool, batch))
    for note in dict.fromkeys(str(row["note"]) for row in rows.values() if row["note"]):
        print(f"{prog}: {note}", file=sys.stderr)
    failed = set()
    for record in needing:
        row = rows.get(record["index"])
        if row is None or row["status"] == "failed":
            summary.failed.append((record["name"], _reason(row, "captioning failed: ")))
            failed.add(record["index"])
        else:
            record["caption"] = str(row["caption"])
    return [record for record in records if record["index"] not in failed]


def _driver_side_note(settings: RestorationSettings, pool: _Pool) -> str | None:
    """The captioner plan's note when the workers will have no CUDA GPU and so no captioner: known here, without
    starting a stage. ``None`` when the workers may caption (CUDA plans depend on each worker's free memory)."""
    import torch

    from . import loading

    if pool.gpus_per_worker > 0:
        return None
    device = torch.device(settings.device)
    plan = loading.plan_captioner(settings.captioner, device, settings.captioner_quantization)
    return None if plan.model is not None else (plan.note or "")


class _CaptionWorker:
    """Stage one: captions a batch of images with :func:`cli.caption_first` (the captioner is loaded once per batch,
    and a worker gets about one batch), writing their sidecars beside the inputs."""

    def __init__(self, settings: RestorationSettings, attempts: Any) -> None:
        from . import loading

        self.settings, self.attempts = settings, attempts
        self.device = loading.resolve_device(settings.device)
        self.plan = loading.plan_captioner(settings.captioner, self.device, settings.captioner_quantization)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records = _records(batch)
        if _give_up(self.attempts, "caption:" + ",".join(str(record["index"]) for record in records)):
            reason = f"captioning failed: {_lost('captioning')}"
            return _columns([{**_caption_row(record), "status": "failed", "reason": reason} for record in records])
        with tempfile.TemporaryDirectory() as folder:
            staged, failed = {}, {}
            for record in records:
                try:
                    staged[record["index"]] = _stage_source(record["source"], Path(folder, str(record["index"])))
                except OSError as error:
                    failed[record["name"]] = f"captioning failed: could not copy: {str(error).splitlines()[0]}"
            summary = cli.Summary()
            kept = cli.caption_first(list(staged.values()), self.settings, self.device, self.plan, summary)
            failed.update(summary.failed)
            rows = [self._row(record, staged.get(record["index"]), kept, failed) for record in records]
        return _columns(rows)

    def _row(self, record: dict, path: Path | None, kept: dict, failed: dict) -> dict:
        from .captioning import read_caption, sidecar_path

        row = {**_caption_row(record), "caption": kept.get(path, "")}
        if path is None or path.name in failed:
            return {**row, "status": "failed", "reason": failed[record["name"]]}
        if self.plan.model is None:
            return {**row, "note": self.plan.note or ""}
        if _is_uri(record["source"]) and path not in kept:
            try:
                _publish(sidecar_path(path), _sidecar(record["source"]))
            except OSError:
                row["caption"] = read_caption(path) or ""
        return row


def _caption_row(record: dict) -> dict:
    return {"index": record["index"], "status": "done", "reason": "", "caption": "", "note": ""}


# ---------------------------------------------------------------------------------------------------- restoration


def _restore_stage(
    records: list[dict],
    settings: RestorationSettings,
    pool: _Pool,
    output: str,
    overwrite: bool,
    attempts: Any,
    summary: RaySummary,
) -> None:
    """Stage two on the pool: restores ``records`` into ``output`` and lists each in ``summary``."""
    if not records:
        return
    options = {
        "settings": settings,
        "output": output,
        "overwrite": overwrite,
        "attempts": attempts,
        "crash_marker": os.environ.get(CRASH_ONCE_ENV),
    }
    start = time.perf_counter()
    rows = _run_stage(records, _RestoreWorker, options, pool, batch=1)
    summary.seconds = time.perf_counter() - start
    by_index = _rows_by_index(rows)
    for record in records:
        row = by_index.get(record["index"])
        if row is not None and row["status"] == "done":
            summary.done.append(record["name"])
        else:
            summary.failed.append((record["name"], _reason(row)))


class _RestoreWorker:
    """Stage two: loads the pipeline once, then restores one image per call with :func:`cli.run`, the local
    engine's loop, and returns its status row."""

    def __init__(
        self,
        settings: RestorationSettings,
        output: str,
        overwrite: bool,
        attempts: Any,
        crash_marker: str | None = None,
    ) -> None:
        from . import loading

        self.settings, self.overwrite, self.attempts, self.crash_marker = settings, overwrite, attempts, crash_marker
        self.load_error = ""
        try:
            self.pipe = cli.load_restoration_pipeline(settings, loading.resolve_device(settings.device))
        except (ValueError, OSError) as error:
            # Reported per image, as the local engine reports it, instead of failing the pool's start over and over.
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.load_error = f"could not load the pipeline: {reason}"
            return
        self.pipe.set_progress_bar_config(disable=True)
        _make_folder(output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        return _columns([self._restore(record) for record in _records(batch)])

    def _restore(self, record: dict) -> dict:
        row = {"index": record["index"], "status": "done", "reason": ""}
        if self.load_error:
            return {**row, "status": "failed", "reason": self.load_error}
        if _give_up(self.attempts, f"restore:{record['index']}"):
            return {**row, "status": "failed", "reason": _lost("restoring")}
        _crash_once(self.crash_marker)
        try:
            if not self.overwrite and _is_our_result(record["result"]):
                return row  # written by a worker that died before it could report it
            with tempfile.TemporaryDirectory() as folder, _local_job(record, Path(folder)) as (job, publish):
                captions = {job.source: record["caption"]} if record["caption"] else {}
                outcome = cli.run([job], self.settings, self.pipe, captions, progress=False)
                if outcome.failed:
                    return {**row, "status": "failed", "reason": outcome.failed[0][1]}
                publish()
        except OSError as error:
            return {**row, "status": "failed", "reason": f"could not copy: {str(error).splitlines()[0]}"}
        return row


def _crash_once(marker: str | None) -> None:
    """Test hook, set by ``FAITHDIFF_RAY_TEST_CRASH_ONCE=PATH`` in the driver's environment: the first worker to
    start an image while ``PATH`` does not exist creates it and kills its own process, as a crash or an
    out-of-memory kill would, so that tests can watch Ray restart the worker and retry its image."""
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


def _stage_source(location: str, folder: Path) -> Path:
    """A local path of an input: itself, or a copy in ``folder`` of a remote one with its caption sidecar."""
    from .captioning import sidecar_path

    if not _is_uri(location):
        return Path(location)
    staged = _download(location, folder / _name(location))
    if _is_file(_sidecar(location)):
        _download(_sidecar(location), sidecar_path(staged))
    return staged


@contextmanager
def _local_job(record: dict, folder: Path) -> Iterator[tuple[cli.Job, Callable[[], None]]]:
    """The record as a local :class:`cli.Job`, remote files staged in ``folder``, and the function that publishes
    its remote results (the comparison first, the result last: a result's presence means the image is done)."""
    remote: dict[Path, str] = {}

    def local(location: str) -> Path | None:
        if not location or not _is_uri(location):
            return Path(location) if location else None
        staged = folder / "results" / _name(location)
        staged.parent.mkdir(exist_ok=True)
        remote[staged] = location
        return staged

    compare = local(record["compare"])
    job = cli.Job(_stage_source(record["source"], folder / "input"), local(record["result"]), compare)
    yield job, lambda: [_publish(staged, uri) for staged, uri in remote.items()]


def _records(batch: dict[str, np.ndarray]) -> list[dict]:
    """A numpy batch of Ray Data as records of plain Python values."""
    count = len(next(iter(batch.values())))
    return [
        {key: values[i].item() if hasattr(values[i], "item") else values[i] for key, values in batch.items()}
        for i in range(count)
    ]


def _columns(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]}
