"""The local engine: a job run in this process (or, under ``accelerate launch``, this process's share of it).

Every check and the plan come first, then the captions (the captioner leaves the device before the pipeline loads),
then the pipeline and the restorations. Nothing is printed: notes go to ``notify``, and the result is a
:class:`~faithdiff_pipeline.application.restoring.Summary`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..atomic_files import remove_leftovers
from . import captions, planning
from .photos import DecodedPhotos
from .restoring import JobFailed, JobOutputs, Summary, load_restoration_pipeline, restore_jobs
from .settings import RestorationSettings

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LocalJob:
    """A checked, planned job of the local engine, before any model loads."""

    settings: RestorationSettings
    output_dir: str
    plan: planning.Plan
    outputs: JobOutputs


def plan_local_job(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    settings: RestorationSettings,
    outputs: JobOutputs,
    overwrite: bool = False,
) -> LocalJob:
    """Checks and plans a job; every mistake raises ``ValueError`` naming the setting, before any model loads."""
    sources = planning.collect_inputs(inputs)
    plan = planning.plan_jobs(sources, output_dir, outputs.names, overwrite)
    return LocalJob(settings, os.fspath(output_dir), plan, outputs)


def process_share(jobs: list[planning.Job], device: str) -> tuple[list[planning.Job], torch.device | None]:
    """Under ``accelerate launch`` (or torchrun) with several processes, this process's share of the work and its
    device, split by accelerate itself."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return jobs, None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    with state.split_between_processes(jobs) as share:
        return list(share), state.device


def plan_captions(settings: RestorationSettings, device: torch.device, notify: Callable[[str], None]) -> Any:
    """The captioner plan for ``device``; its note (no GPU, too little memory) goes to ``notify``."""
    from .. import loading

    plan = loading.plan_captioner(settings.captioner, device, settings.captioner_quantization)
    if plan.note and settings.wants_captions:
        notify(plan.note)
    return plan


def run_local_job(job: LocalJob, notify: Callable[[str], None], progress: bool = True) -> Summary:
    """Runs a planned job: captions, then restorations. Raises ``ValueError`` for a device this machine lacks and
    :class:`JobFailed` when the pipeline cannot load; an image that fails is listed in the summary."""
    from .. import loading

    settings = job.settings
    share, process_device = process_share(job.plan.todo, settings.device)
    device = process_device or loading.resolve_device(settings.device)
    summary = Summary(skipped=[skipped.name for skipped in job.plan.skipped])
    prompts = captions.read_prompts([item.source for item in share], settings)
    photos = DecodedPhotos()
    if prompts.needed:
        captions.caption_images(prompts, settings, device, plan_captions(settings, device, notify), photos, notify)
    summary.failed += prompts.failed
    todo = []
    for item in share:
        if item.source not in prompts.known:
            continue
        try:
            job.outputs.check(item, prompts.known[item.source])
        except ValueError as error:
            summary.failed.append((item.name, str(error)))
            continue
        todo.append(item)
    if not todo:
        return summary
    pipe = load_restoration_pipeline(settings, device)
    pipe.set_progress_bar_config(leave=False, desc="steps")
    # Before the output folder exists: outputs that cannot work with this model (a layer it lacks) leave nothing.
    call_options = job.outputs.attach(pipe)
    try:
        os.makedirs(job.output_dir, exist_ok=True)
    except OSError as error:
        raise JobFailed(f"output folder {job.output_dir!r} cannot be created: {error.strerror or error}") from error
    remove_leftovers(job.output_dir)
    worked = restore_jobs(todo, settings, pipe, prompts.known, job.outputs, photos, progress, call_options)
    summary.done, summary.failed, summary.seconds = worked.done, summary.failed + worked.failed, worked.seconds
    summary.fidelity = worked.fidelity
    return summary


def write_captions(
    inputs: Sequence[str | os.PathLike], settings: RestorationSettings, notify: Callable[[str], None]
) -> Summary:
    """Writes the caption sidecar of every image that has none, and restores nothing. Raises ``ValueError`` when
    there is no captioner to write them (settings that ask for none, or a machine that cannot run one)."""
    from .. import loading

    if not settings.wants_captions:
        raise ValueError("`captions_only` needs a captioner and `caption` 'auto', without `prompt`.")
    sources = planning.collect_inputs(inputs)
    share, process_device = process_share([planning.Job(s, (s,)) for s in sources], settings.device)
    device = process_device or loading.resolve_device(settings.device)
    plan = loading.plan_captioner(settings.captioner, device, settings.captioner_quantization)
    if plan.model is None:
        from ..captioning import RELEASE_CAPTIONER

        raise ValueError(
            f"`captions_only` has no captioner on {device}: name one with `captioner` (e.g. {RELEASE_CAPTIONER}, slow "
            "without a CUDA GPU), or run this on a CUDA machine."
        )
    start = time.perf_counter()
    prompts = captions.read_prompts([item.source for item in share], settings)
    needed = list(prompts.needed)
    summary = Summary(skipped=[item.name for item in share if item.source in prompts.known])
    captions.caption_images(prompts, settings, device, plan, DecodedPhotos(budget=0), notify)
    failed = {name for name, _ in prompts.failed}
    summary.failed = prompts.failed
    summary.done = [planning.Job(s, (s,)).name for s in needed if planning.Job(s, (s,)).name not in failed]
    summary.seconds = time.perf_counter() - start
    return summary
