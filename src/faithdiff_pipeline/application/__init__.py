"""The application layer under every command, the Ray engine, the web demo and Python users: settings checked once,
locations, the job planner with its output guards, captions, and the local and Ray engines. It parses no command
line and prints nothing; the commands map its ``ValueError``s to their flags (see :mod:`.options`).

:func:`restore_files` is the Python face of ``faithdiff-upscale``, with the same guarantees: it never writes over an
input or a file it did not make, creates the output folder, resumes, and refuses every mistake before any model
loads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from .options import OPTIONS, RAY_OPTIONS
from .restoring import JobFailed, ResultFiles, Summary
from .settings import RestorationSettings

__all__ = [
    "JobFailed",
    "RestorationSettings",
    "ResultFiles",
    "Summary",
    "check_engine_options",
    "check_fidelity_options",
    "restore_files",
]

# The options of a job rather than of each image's restoration.
JOB_OPTIONS = ("overwrite", "compare", "engine", *RAY_OPTIONS)


def check_engine_options(engine: str, ray_options_given: Sequence[str]) -> None:
    """Refuses an unknown engine, and the Ray engine's options without it, so that they are never silently
    ignored."""
    if engine not in OPTIONS["engine"].choices:
        raise ValueError(f"`engine` must be one of {', '.join(OPTIONS['engine'].choices)}, got {engine!r}.")
    if engine != "ray" and ray_options_given:
        verb = "needs" if len(ray_options_given) == 1 else "need"
        names = ", ".join(f"`{name}`" for name in ray_options_given)
        raise ValueError(f"{names} {verb} `engine` ray (the engine is {engine}).")


def check_fidelity_options(settings: RestorationSettings, threshold: float | None, fail: bool = False) -> None:
    """Refuses a fidelity threshold without fidelity measured, and failing on it without a threshold."""
    if threshold is not None and not settings.fidelity:
        raise ValueError("`fidelity_threshold` judges the fidelity numbers: add `fidelity`.")
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"`fidelity_threshold` must be a finite number of dB, got {threshold!r}.")
    if fail and threshold is None:
        raise ValueError("`fail_below_threshold` needs `fidelity_threshold` DB.")


def restore_files(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike = OPTIONS["output_dir"].default,
    *,
    overwrite: bool = False,
    compare: bool = False,
    engine: str = "local",
    notify: Callable[[str], None] | None = None,
    progress: bool = True,
    **options: Any,
) -> Summary:
    """Restores image files, folders of images and glob patterns into ``output_dir``, as ``faithdiff-upscale`` does.

    Args:
        inputs: Image files, folders (their images) and glob patterns; with ``engine="ray"``, URIs too.
        output_dir: Where results go; created when work starts. A URI with ``engine="ray"``.
        overwrite: Restore again where a result of ours exists (never an input, never a file we did not make).
        compare: Also write ``NAME_compare.png``, the LANCZOS upscale beside the result.
        engine: ``"local"`` (this process) or ``"ray"`` (a pool of Ray Data workers, the ``[ray]`` extra; takes
            ``ray_address``, ``workers`` and ``gpus_per_worker`` among ``options``).
        notify: Receives notes for the user (no captioner on this machine, say); default: ignored.
        progress: Show progress bars.
        options: The restoration settings by their names in :data:`~faithdiff_pipeline.application.options.OPTIONS`
            (``upscale=4``, ``steps=30``, ``prompt="..."``, ``model="folder or Hub id"``, ``format="tiff"``,
            ``fidelity=True``, ``seeds=3``, ...). The summary's ``fidelity`` holds each result's fidelity numbers and
            ``below(threshold)`` the results under a threshold.

    Returns:
        The names of the images done, skipped (already restored) and failed, with the reasons.

    Raises:
        ValueError: a mistake in the settings, inputs or output folder, before any model loads.
        TypeError: an unknown setting.
        JobFailed: the pipeline could not load, or the Ray job could not run.
    """
    check_engine_options(engine, [name for name in RAY_OPTIONS if name in options])
    notify = notify or (lambda note: None)
    ray_options = {name: options.pop(name) for name in RAY_OPTIONS if name in options}
    settings = RestorationSettings.from_options(**options)
    outputs = ResultFiles(settings.output.suffix, compare, settings.fidelity, settings.seeds > 1)
    if engine == "ray":
        from .ray_engine import run_ray_job

        return run_ray_job(inputs, output_dir, settings, outputs, overwrite=overwrite, notify=notify, **ray_options)
    from .local_engine import plan_local_job, run_local_job

    return run_local_job(plan_local_job(inputs, output_dir, settings, outputs, overwrite), notify, progress)
