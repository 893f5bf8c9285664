"""Training checkpoints: accelerate's state (to resume) and a FaithDiff pipeline folder (to use), side by side.

``OUTPUT/checkpoint-N/`` holds accelerate's files (trained weights, optimiser, LR schedule, data sampler, random
states, EMA), ``training_state.json`` (step, stage and which weights the pipeline holds) and ``pipeline/``, a folder
that ``FaithDiffSDXLPipeline.from_pretrained`` loads, with ``pipeline/training.json`` saying whether it holds the
trained weights (the default, as the release exported) or their EMA. A checkpoint is written under
``.checkpoint-N.partial`` and renamed when complete. ``training_state.json`` is written last and lists every file
of the checkpoint with its size: a folder whose files do not match it (cut off by a crash before the disk was
flushed, or by an interrupted copy), or whose ``training_state.json`` is missing or cut off, is not a complete
checkpoint, and resuming says which file is wrong instead of failing inside the loaders.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.training_utils import EMAModel

from ..atomic_files import write_text_atomic
from ..checks import is_integer
from ..pipeline_faithdiff_sdxl import FaithDiffSDXLPipeline
from .config import TrainingSetupError
from .stages import FaithDiffTrainingModule

CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "training_state.json"
PIPELINE_DIR = "pipeline"
# Beside the pipeline's model_index.json; from_pretrained loads only the components model_index.json lists.
PIPELINE_METADATA = "training.json"


def update_ema(ema: EMAModel, parameters, step: int, counting: str = "diffusers") -> None:
    """One EMA update after optimiser step ``step``.

    ``counting="diffusers"`` leaves EMAModel's own counter (its number of updates) to set the warm-up decay.
    ``"global_step"`` makes it the optimiser step, as the release does: EMAModel adds one to its counter before
    computing the decay, so the counter is set to ``step - 1`` first. The counter is part of the EMA's state, so a
    resumed run continues either way.
    """
    if counting == "global_step":
        ema.optimization_step = step - 1
    elif counting != "diffusers":
        raise ValueError(f"`counting` must be 'diffusers' or 'global_step', got {counting!r}.")
    ema.step(parameters)


def checkpoint_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``checkpoint-N`` folder in ``output_dir``, complete or not, as ``(step, folder)``, oldest first."""
    found = []
    for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and path.is_dir():
            found.append((int(suffix), path))
    return sorted(found)


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, in a few words; None when it is one (its files are those that
    its ``training_state.json`` lists, with their sizes; a checkpoint of an earlier version lists none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it does not exist"
    state_path = folder / STATE_NAME
    if not state_path.is_file():
        return f"it has no {STATE_NAME} (it was never finished)"
    state = _parse_state(state_path)
    if state is None:
        return f"its {STATE_NAME} is cut off or damaged (not the JSON of a step and stage)"
    for name, size in state.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is cut off or damaged ({path.stat().st_size} bytes, {size} written)"
    return None


def _parse_state(path: Path) -> dict | None:
    """The content of a ``training_state.json``, or None where it is not the JSON a checkpoint writes."""
    text = path.read_bytes()
    try:
        state = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        # A file cut off while it was written: the caller reports it (and may fall back to an older checkpoint).
        return None
    if not isinstance(state, dict) or not is_integer(state.get("step")) or not isinstance(state.get("files", {}), dict):
        return None
    return state


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in ``output_dir`` as ``(step, folder)``, oldest first."""
    return [(step, path) for step, path in checkpoint_folders(output_dir) if checkpoint_problem(path) is None]


def resolve_resume(spec: str | None, output_dir: str | Path) -> tuple[Path | None, str | None]:
    """The checkpoint to resume from, and a one-line note on the damaged checkpoints passed over to find it.

    ``spec`` names a checkpoint folder, which must be complete; ``"latest"`` is the newest complete checkpoint in
    ``output_dir``, passing over damaged newer ones (the note names them), or None if there is none yet, so that a
    job can always pass ``latest``; None gives None.

    Raises:
        TrainingSetupError: the checkpoint named is not complete (naming what is wrong, and the newest complete one
            beside it), or ``output_dir`` holds checkpoints but none complete.
    """
    if spec is None:
        return None, None
    if spec == "latest":
        damaged = []
        for _, path in reversed(checkpoint_folders(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                note = None
                if damaged:
                    note = f"Resuming from {path.name}, the newest complete checkpoint: skipped {'; '.join(damaged)}."
                return path, note
            damaged.append(f"{path} ({problem})")
        if damaged:
            raise TrainingSetupError(
                f"`resume_from_checkpoint` 'latest' finds no complete checkpoint in {str(output_dir)!r}: "
                f"{'; '.join(damaged)}; move the damaged folders away to start afresh."
            )
        return None, None
    path = Path(spec)
    problem = checkpoint_problem(path)
    if problem is not None:
        complete = list_checkpoints(path.parent)
        if complete:
            instead = f"resume from {str(complete[-1][1])!r}, the newest complete checkpoint beside it, or 'latest'"
        else:
            instead = f"expected a complete OUTPUT/{CHECKPOINT_PREFIX}N, or 'latest'"
        raise TrainingSetupError(
            f"`resume_from_checkpoint` {spec!r} is not a complete checkpoint: {problem}; {instead}."
        )
    return path, None


def read_training_state(checkpoint: Path, stage: int) -> int:
    """The step a checkpoint was saved at, after checking it belongs to ``stage`` (the checkpoint is complete:
    see :func:`checkpoint_problem`)."""
    state = _parse_state(checkpoint / STATE_NAME)
    if state is None:
        raise TrainingSetupError(f"`resume_from_checkpoint` {str(checkpoint)!r} has a damaged {STATE_NAME}.")
    if state.get("stage") != stage:
        raise TrainingSetupError(
            f"`resume_from_checkpoint` {str(checkpoint)!r} is a stage-{state.get('stage')} checkpoint, but this is "
            f"stage {stage}; to start stage 2 from stage 1, set `stage1_checkpoint: {checkpoint / PIPELINE_DIR}`."
        )
    return int(state["step"])


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the trained weights are split across processes (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


@contextmanager
def ema_weights(model: FaithDiffTrainingModule, ema: EMAModel | None) -> Iterator[None]:
    """Within this context the trained parameters hold their moving average (no-op without EMA)."""
    if ema is None:
        yield
        return
    parameters = list(model.parameters())
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def save_checkpoint(
    accelerator: Accelerator,
    pipe: FaithDiffSDXLPipeline,
    model: FaithDiffTrainingModule,
    ema: EMAModel | None,
    output_dir: str | Path,
    step: int,
    stage: int,
    export_ema: bool = False,
) -> Path:
    """Saves accelerate's state and the pipeline as ``output_dir/checkpoint-step``; the pipeline holds the trained
    weights, or their EMA with ``export_ema``.

    Every process must call it. Resuming needs the checkpoint folder on a file system that all processes see.
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    partial = Path(output_dir) / f".{final.name}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    exported = export_pipeline(accelerator, pipe, model, ema if export_ema else None, partial / PIPELINE_DIR)
    # Every process writes its own random states into the folder: all must be done before it is renamed.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # On disk before they are listed, so that a crash cannot leave a listed file short; written last, the list
        # makes the folder a complete checkpoint.
        files = _flush_files(partial)
        state = {"step": step, "stage": stage, "pipeline_weights": exported, "files": files}
        write_text_atomic(partial / STATE_NAME, json.dumps(state) + "\n")
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    accelerator.wait_for_everyone()
    return final


def _flush_files(folder: Path) -> dict[str, int]:
    """Flushes every file under ``folder`` to disk; returns their sizes by path relative to ``folder``."""
    sizes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            sizes[path.relative_to(folder).as_posix()] = path.stat().st_size
    return sizes


def export_pipeline(
    accelerator: Accelerator,
    pipe: FaithDiffSDXLPipeline,
    model: FaithDiffTrainingModule,
    ema: EMAModel | None,
    path: Path,
) -> str:
    """Writes the pipeline with the trained weights - or their moving average when ``ema`` is given - to ``path``
    with ``save_pretrained``, and ``path/training.json`` saying which. Returns ``"trained"`` or ``"ema"``.

    With DDP or DeepSpeed ZeRO-1/2 every process holds the whole weights, which the pipeline already references.
    Sharded weights (FSDP, ZeRO-3) are gathered first; every process must call this.
    """
    unwrapped = accelerator.unwrap_model(model)
    weights = "ema" if ema is not None else "trained"
    if is_sharded(accelerator):
        # The configuration check refuses an EMA with sharded weights, so these are the trained ones.
        state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            _pipeline_with_state(pipe, unwrapped, state).save_pretrained(path)
            _write_metadata(path, weights)
        return weights
    if accelerator.is_main_process:
        with ema_weights(unwrapped, ema) if ema is not None else nullcontext():
            pipe.save_pretrained(path)
        _write_metadata(path, weights)
    return weights


def _write_metadata(path: Path, weights: str) -> None:
    (Path(path) / PIPELINE_METADATA).write_text(json.dumps({"weights": weights}) + "\n", encoding="utf-8")


def _pipeline_with_state(
    pipe: FaithDiffSDXLPipeline, model: FaithDiffTrainingModule, state: dict
) -> FaithDiffSDXLPipeline:
    """A CPU copy of the trained components loaded from a gathered state dict, in a pipeline beside the frozen ones."""
    copies = {}
    for name in model.trained:
        module = getattr(pipe, name)
        copy = type(module).from_config(module.config)
        copy.load_state_dict({k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")})
        copies[name] = copy
    return FaithDiffSDXLPipeline(**{**pipe.components, **copies})


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Deletes all but the newest ``keep`` checkpoints (none when ``keep`` is None); returns what it deleted."""
    if keep is None:
        return []
    removed = [path for _, path in list_checkpoints(output_dir)[:-keep]]
    for path in removed:
        shutil.rmtree(path)
    return removed
