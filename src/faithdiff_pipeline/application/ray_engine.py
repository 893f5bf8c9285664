"""The Ray engine: the same job as the local engine, run by a pool of Ray Data workers on one machine or a cluster,
with inputs and outputs in local folders or object storage (``s3://bucket/prefix``, ``gs://``, ``file://`` and the
other filesystems of pyarrow and fsspec that Ray reads).

The driver checks and plans the job with the local engine's planner and reads every prompt once, then runs at most
two stages, each a Ray Data ``map_batches`` over an actor pool: captions first, where images need them (a batch per
worker, through :func:`.captions.caption_images`), then restoration (one image per task, through
:func:`.restoring.restore_jobs`), each worker loading the pipeline once. Results get the local engine's names, seeds,
metadata and atomic writes. Joining a cluster is bounded in time, and a pool the cluster cannot hold is refused
before any work.

A worker process that dies is restarted and the images it had not finished are retried; a result that a dead worker
had already written counts as done, not twice, and an image that kills its worker on every try is listed as failed.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..loading import installed
from . import captions, locations, planning
from .photos import DecodedPhotos
from .restoring import JobFailed, JobOutputs, Summary, load_restoration_pipeline, restore_jobs
from .settings import RestorationSettings

if TYPE_CHECKING:
    import numpy as np

RAY_INSTALL = "pip install 'faithdiff-pipeline[ray]'"
# Test hook: see `_crash_once`.
CRASH_ONCE_ENV = "FAITHDIFF_RAY_TEST_CRASH_ONCE"
# Tries of one image (of one caption batch) whose worker dies: enough for a crash or a lost node, few enough that an
# image that kills its worker every time (an out-of-memory kill) is soon listed as failed instead of holding up the job.
MAX_TRIES = 3
# How long joining a cluster may take before the job gives up: a cluster that answers at all answers in seconds.
CONNECT_SECONDS = 10.0


@dataclass(frozen=True)
class _Pool:
    """The actor pool of a stage: its workers and the GPUs each reserves."""

    workers: int
    gpus_per_worker: float


def check_ray_options(
    settings: RestorationSettings, workers: int | None, gpus_per_worker: float | None
) -> None:
    """The Ray engine's own refusals, before any cluster is joined."""
    if not installed("ray"):
        raise ValueError(f"`engine` ray needs Ray Data, which is not installed: {RAY_INSTALL}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("`engine` ray starts its own workers; run it without accelerate launch or torchrun.")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"`workers` must be at least 1, got {workers!r}.")
    gpus = gpus_per_worker
    if gpus is not None and not (isinstance(gpus, (int, float)) and math.isfinite(gpus) and gpus >= 0):
        raise ValueError(f"`gpus_per_worker` must be a finite number >= 0, got {gpus!r}.")
    if re.fullmatch(r"cuda:\d+", settings.device):
        # Ray gives each worker its own GPUs, which the worker sees as cuda:0, cuda:1, ...
        raise ValueError(f"`device` {settings.device} names one GPU; with `engine` ray use `device` cuda or auto.")


def run_ray_job(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    settings: RestorationSettings,
    outputs: JobOutputs,
    *,
    overwrite: bool = False,
    notify: Callable[[str], None] = lambda note: None,
    ray_address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
) -> Summary:
    """Checks, plans and runs a job on Ray: ``faithdiff-upscale INPUT... -o OUTPUT --engine ray``. Joins the cluster at
    ``ray_address`` (or the one ``ray.init()`` finds or starts) unless Ray is already initialised in this process.

    Raises ``ValueError`` for a mistake (before any model loads, and before the cluster is asked for more than it
    has), :class:`JobFailed` when the cluster cannot be reached in time or the Ray job breaks down."""
    check_ray_options(settings, workers, gpus_per_worker)
    output = locations.absolute(locations.as_location(output_dir))
    sources = planning.collect_inputs(inputs)
    plan = planning.plan_jobs(sources, output, outputs.names, overwrite)
    summary = Summary(skipped=[job.name for job in plan.skipped], pooled=True)
    prompts = captions.read_prompts([job.source for job in plan.todo], settings)
    summary.failed += prompts.failed
    records = [_record(index, job, prompts.known.get(job.source)) for index, job in enumerate(plan.todo)]
    records = [record for record in records if record["source"] in prompts.known or record["source"] in prompts.needed]
    if not records:
        return summary
    if not locations.is_uri(output):
        from ..atomic_files import remove_leftovers

        remove_leftovers(output)
    import ray

    started = _connect(ray_address or os.environ.get("RAY_ADDRESS"))
    try:
        pool = _Pool(workers or 1, _gpus_per_worker(gpus_per_worker))
        _check_resources(pool)
        _check_device(settings.device, pool.gpus_per_worker)
        # A worker without GPUs of its own may still see the machine's: `auto` must not take them.
        if settings.device == "auto" and pool.gpus_per_worker == 0:
            settings = replace(settings, device="cpu")
        attempts = ray.remote(num_cpus=0)(_Attempts).remote()
        records = _caption_stage(records, settings, pool, attempts, summary, notify)
        _restore_stage(records, settings, outputs, pool, output, overwrite, attempts, summary)
        summary.worker_deaths = ray.get(attempts.deaths.remote())
        ray.kill(attempts)
    finally:
        if started:
            ray.shutdown()
    return summary


def _check_device(device: str, gpus: float) -> None:
    """A GPU device without GPUs reserved for it would share GPUs behind Ray's back; GPUs reserved for the CPU would
    sit idle."""
    if device == "cuda" and gpus == 0:
        raise ValueError("`device` cuda with `engine` ray needs `gpus_per_worker` above 0.")
    if device in ("cpu", "mps") and gpus > 0:
        raise ValueError(f"`gpus_per_worker` {gpus:g} reserves GPUs that `device` {device} leaves idle.")


def _check_resources(pool: _Pool) -> None:
    """Refuses a pool the cluster cannot hold, which Ray Data would wait for without end."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if pool.gpus_per_worker > 0 and pool.gpus_per_worker * pool.workers > gpus:
        raise ValueError(
            f"`gpus_per_worker` {pool.gpus_per_worker:g} x `workers` {pool.workers} asks for more GPUs than the Ray "
            f"cluster has ({gpus:g}); use fewer workers, a fraction of a GPU each, or `gpus_per_worker` 0 on CPUs."
        )
    # Each worker of an actor pool holds one CPU of the cluster.
    if pool.workers > cpus:
        raise ValueError(f"`workers` {pool.workers} is more than the Ray cluster's {cpus:g} CPUs; use at most that.")


# ----------------------------------------------------------------------------------------------------- planning


def _record(index: int, job: planning.Job, prompt: str | None) -> dict:
    # Plain strings and "" for "none": Ray Data stores records as Arrow columns, which want one type per column.
    return {
        "index": index,
        "name": job.name,
        "source": job.source,
        "result": job.result,
        "compare": job.outputs[1] if len(job.outputs) > 1 else "",
        "caption": prompt or "",
        "needs_caption": prompt is None,
    }


# ----------------------------------------------------------------------------------------------------- the cluster


def _probe(address: str) -> None:
    """Refuses, within seconds, an address where nothing answers, which Ray itself would wait on for many minutes."""
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise JobFailed(
            f"could not join the Ray cluster at {address!r}: nothing answers there ({error.strerror or error}); "
            "check the address (and RAY_ADDRESS), or leave it out to start a cluster on this machine"
        ) from error


def _connect(address: str | None) -> bool:
    """Joins the cluster (``address``, else the one ``ray.init`` finds or starts); whether this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    if address and address != "auto" and address != "local":
        _probe(address)
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
    summary: Summary,
    notify: Callable[[str], None],
) -> list[dict]:
    """The local engine's captions-first step on the pool: the images that need a caption are captioned, their
    sidecars written, and the captioner leaves the workers before restoration starts. Returns the records left to
    restore, each with its prompt."""
    needing = [record for record in records if record["needs_caption"]]
    if not needing:
        return records
    note = _driver_side_note(settings, pool)
    if note is not None:
        if note:
            notify(note)
        return records
    batch = math.ceil(len(needing) / pool.workers)
    options = {"settings": settings, "attempts": attempts}
    rows = _rows_by_index(_run_stage(needing, _CaptionWorker, options, pool, batch))
    for row_note in dict.fromkeys(str(row["note"]) for row in rows.values() if row["note"]):
        notify(row_note)
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

    from .. import loading

    if pool.gpus_per_worker > 0:
        return None
    plan = loading.plan_captioner(settings.captioner, torch.device(settings.device), settings.captioner_quantization)
    return None if plan.model is not None else (plan.note or "")


class _CaptionWorker:
    """Stage one: captions a batch of images with the local engine's caption step (the captioner is loaded once per
    batch, and a worker gets about one batch), writing their sidecars beside the inputs."""

    def __init__(self, settings: RestorationSettings, attempts: Any) -> None:
        from .. import loading

        self.settings, self.attempts = settings, attempts
        self.device = loading.resolve_device(settings.device)
        self.plan = loading.plan_captioner(settings.captioner, self.device, settings.captioner_quantization)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records = _records(batch)
        if _give_up(self.attempts, "caption:" + ",".join(str(record["index"]) for record in records)):
            reason = f"captioning failed: {_lost('captioning')}"
            return _columns([{**_caption_row(record), "status": "failed", "reason": reason} for record in records])
        if self.plan.model is None:
            return _columns([{**_caption_row(record), "note": self.plan.note or ""} for record in records])
        with tempfile.TemporaryDirectory() as folder:
            staged, failed = {}, {}
            for record in records:
                try:
                    staged[record["index"]] = str(_stage_source(record["source"], Path(folder, str(record["index"]))))
                except OSError as error:
                    failed[record["name"]] = f"captioning failed: could not copy: {str(error).splitlines()[0]}"
            prompts = captions.Prompts(needed=list(staged.values()))
            captions.caption_images(prompts, self.settings, self.device, self.plan, DecodedPhotos(0), lambda n: None)
            failed.update(prompts.failed)
            rows = [self._row(record, staged.get(record["index"]), prompts.known, failed) for record in records]
        return _columns(rows)

    def _row(self, record: dict, path: str | None, known: dict[str, str], failed: dict) -> dict:
        from ..captioning import sidecar_path

        if path is None or record["name"] in failed:
            return {**_caption_row(record), "status": "failed", "reason": failed[record["name"]]}
        row = {**_caption_row(record), "caption": known.get(path, "")}
        if locations.is_uri(record["source"]) and sidecar_path(path).is_file():
            try:
                locations.publish(sidecar_path(path), captions.sidecar_of(record["source"]))
            except OSError:
                pass  # the caption is used all the same, as the local engine uses one it could not write
        return row


def _caption_row(record: dict) -> dict:
    return {"index": record["index"], "status": "done", "reason": "", "caption": "", "note": ""}


# ---------------------------------------------------------------------------------------------------- restoration


def _restore_stage(
    records: list[dict],
    settings: RestorationSettings,
    outputs: JobOutputs,
    pool: _Pool,
    output: str,
    overwrite: bool,
    attempts: Any,
    summary: Summary,
) -> None:
    """Stage two on the pool: restores ``records`` into ``output`` and lists each in ``summary``."""
    if not records:
        return
    options = {
        "settings": settings,
        "outputs": outputs,
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
            numbers = json.loads(str(row["fidelity"]))
            if numbers:
                summary.fidelity[record["name"]] = numbers
        else:
            summary.failed.append((record["name"], _reason(row)))


class _RestoreWorker:
    """Stage two: loads the pipeline once, then restores one image per call with the local engine's restore loop,
    and returns its status row."""

    def __init__(
        self,
        settings: RestorationSettings,
        outputs: JobOutputs,
        output: str,
        overwrite: bool,
        attempts: Any,
        crash_marker: str | None = None,
    ) -> None:
        from .. import loading

        self.settings, self.outputs, self.overwrite = settings, outputs, overwrite
        self.attempts, self.crash_marker = attempts, crash_marker
        self.load_error = ""
        try:
            self.pipe = load_restoration_pipeline(settings, loading.resolve_device(settings.device))
        except JobFailed as error:
            # Reported per image, as the local engine reports it, instead of failing the pool's start over and over.
            self.load_error = str(error)
            return
        self.pipe.set_progress_bar_config(disable=True)
        locations.make_folder(output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        return _columns([self._restore(record) for record in _records(batch)])

    def _restore(self, record: dict) -> dict:
        row = {"index": record["index"], "status": "done", "reason": "", "fidelity": '""'}
        if self.load_error:
            return {**row, "status": "failed", "reason": self.load_error}
        if _give_up(self.attempts, f"restore:{record['index']}"):
            return {**row, "status": "failed", "reason": _lost("restoring")}
        _crash_once(self.crash_marker)
        try:
            if not self.overwrite and locations.is_our_result(record["result"]):
                return row  # written by a worker that died before it could report it
            with tempfile.TemporaryDirectory() as folder, _local_job(record, Path(folder)) as (job, publish):
                prompts = {job.source: record["caption"]}
                outcome = restore_jobs([job], self.settings, self.pipe, prompts, self.outputs, progress=False)
                if outcome.failed:
                    return {**row, "status": "failed", "reason": outcome.failed[0][1]}
                publish()
                row["fidelity"] = json.dumps(outcome.fidelity.get(job.name, ""))
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
    """A local path of an input: itself, or a copy in ``folder`` of a remote one."""
    if not locations.is_uri(location):
        return Path(location)
    return locations.download(location, folder / locations.name_of(location))


@contextmanager
def _local_job(record: dict, folder: Path) -> Iterator[tuple[planning.Job, Callable[[], None]]]:
    """The record as a local :class:`~.planning.Job`, remote files staged in ``folder``, and the function that
    publishes its remote outputs (the comparison first, the result last: a result's presence means the image is
    done)."""
    remote: dict[Path, str] = {}

    def local(location: str) -> str:
        if not locations.is_uri(location):
            return location
        staged = folder / "results" / locations.name_of(location)
        staged.parent.mkdir(exist_ok=True)
        remote[staged] = location
        return str(staged)

    targets = [record["result"]] + ([record["compare"]] if record["compare"] else [])
    local_outputs = tuple(local(target) for target in targets)
    job = planning.Job(str(_stage_source(record["source"], folder / "input")), local_outputs)
    ordered = sorted(remote.items(), key=lambda item: item[1] == record["result"])
    yield job, lambda: [locations.publish(staged, uri) for staged, uri in ordered]


def _records(batch: dict[str, np.ndarray]) -> list[dict]:
    """A numpy batch of Ray Data as records of plain Python values."""
    count = len(next(iter(batch.values())))
    return [
        {key: values[i].item() if hasattr(values[i], "item") else values[i] for key, values in batch.items()}
        for i in range(count)
    ]


def _columns(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]}
