"""``faithdiff-train``: FaithDiff's two training stages on accelerate (one GPU, several, or several machines).

Each optimiser step: the HQ crops go through the frozen VAE encoder, the captions through SDXL's frozen text encoders
(the pipeline's own ``encode_prompt``), noise with a small offset is added at a uniform timestep, and the UNet -
with the alignment module fusing the LQ encoder's features after ``conv_in`` - predicts it under an L1 loss.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .config import TrainingConfig, TrainingSetupError, settings_parser

# torch, accelerate, diffusers and the modules of this package that need them are imported by the functions that
# use them: the command line is parsed, and `--help` or a usage error answered, without loading them.
if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from accelerate.logging import MultiProcessAdapter
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from torch.utils.data import DataLoader, Dataset
    from transformers import HfArgumentParser

    from .validation import ValidationExample

PROG = "faithdiff-train"


@cache
def _logger() -> MultiProcessAdapter:
    """accelerate's logger, which logs on the main process only."""
    from accelerate.logging import get_logger

    return get_logger(__name__)


@dataclass(frozen=True)
class TrainingResult:
    """``step``: the optimiser step reached; ``steps_run``: those run by this call (fewer after resuming);
    ``checkpoint``: the last checkpoint folder (its ``pipeline`` subfolder is the trained pipeline)."""

    step: int
    steps_run: int
    checkpoint: Path
    last_loss: float | None


def train(config: TrainingConfig) -> TrainingResult:
    """Runs (or resumes) one training stage as ``config`` describes. Every process of an ``accelerate launch`` calls
    it.

    Raises:
        TrainingSetupError: a mistake in the settings, the data or the starting model, found before training.
    """
    import torch
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler

    from .stages import load_starting_pipeline, starting_point, training_module

    config = config.resolve()
    starting_point(config)
    _check_tracker(config.report_to)
    accelerator = _make_accelerator(config)
    config = config.with_processes(accelerator.num_processes)
    accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
    _check_distributed_setup(accelerator, config)
    step, checkpoint = _resume_point(config)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(config.seed)

    dataset = training_dataset(config)
    _check_dataset_size(dataset, config, accelerator.num_processes)
    # Read before any model loads: an unreadable validation image or caption sidecar is a setup mistake.
    examples = _validation_set(accelerator, config, dataset)
    pipe = load_starting_pipeline(config)
    model = training_module(pipe, config.stage, config.gradient_checkpointing, config.freeze)
    pipe.to(accelerator.device)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer, lr_scheduler = _optimization(model, config, accelerator.num_processes)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, _data_loader(dataset, config), lr_scheduler
    )
    ema = _make_ema(accelerator, model, config)
    _resume(accelerator, checkpoint, step)
    if config.report_to != "none":
        accelerator.init_trackers(config.tracker_project_name, config=_tracker_config(config))
    _log_setup(accelerator, config, dataset, step)

    loop = _TrainingLoop(
        accelerator, config, pipe, model, optimizer, lr_scheduler, noise_scheduler, ema, examples, dataset.scale
    )
    result = loop.run(dataset, dataloader, step, checkpoint)
    accelerator.end_training()
    return result


# ------------------------------------------------------------------------------------------------- set-up
def training_dataset(config: TrainingConfig) -> Dataset:
    """The prepared set of ``train_manifest``, or the on-the-fly set of ``train_folders`` (without what lies in
    ``output_dir``, whose validation images are no training photos)."""
    from .data import DegradingDataset, PreparedPairsDataset, load_degradation

    try:
        if config.train_manifest:
            return PreparedPairsDataset(
                config.train_manifest, config.seed, config.caption_dropout, config.random_flip, config.prepared_crops
            )
        return DegradingDataset(
            config.train_folders,
            config.hq_size,
            load_degradation(config.degradation),
            config.seed,
            config.caption_dropout,
            config.random_flip,
            config.captions,
            exclude=[config.output_dir],
        )
    except ValueError as error:
        raise TrainingSetupError(str(error)) from error


def _data_loader(dataset: Dataset, config: TrainingConfig) -> DataLoader:
    import torch
    from torch.utils.data import DataLoader

    # Workers are not persistent: each epoch's iterator copies the dataset with its current epoch (see set_epoch).
    return DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        shuffle=True,
        drop_last=config.drop_last,
        num_workers=config.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def _optimization(model: Any, config: TrainingConfig, num_processes: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the stage's parameter groups, and the LR schedule."""
    import torch
    from diffusers.optimization import get_scheduler

    from .stages import parameter_groups

    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.stage, config),
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    # accelerate steps a prepared scheduler once per process at every optimiser step, hence the factor.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=config.max_train_steps * num_processes,
    )
    return optimizer, lr_scheduler


def _resume_point(config: TrainingConfig) -> tuple[int, Path | None]:
    """The step and folder of the checkpoint to resume from (0 and None for a fresh start), checked complete before
    any model loads; a damaged newer checkpoint that ``latest`` passes over is named in a one-line warning."""
    from .checkpoints import read_training_state, resolve_resume

    checkpoint, note = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    if note is not None:
        _logger().warning(note)
    if checkpoint is None:
        return 0, None
    return read_training_state(checkpoint, config.stage), checkpoint


def _resume(accelerator: Accelerator, checkpoint: Path | None, step: int) -> None:
    """Loads the checkpoint to resume from, if any (after ``prepare``)."""
    if checkpoint is None:
        return
    accelerator.load_state(str(checkpoint))
    _logger().info(f"Resumed from {checkpoint} at step {step}.")


def _check_dataset_size(dataset: Dataset, config: TrainingConfig, num_processes: int) -> None:
    needed = config.train_batch_size * num_processes
    if len(dataset) < needed:
        raise TrainingSetupError(
            f"The training set has {len(dataset)} pair(s) per epoch, fewer than one batch (`train_batch_size` "
            f"{config.train_batch_size} x {num_processes} process(es) = {needed})."
        )


def _check_tracker(report_to: str) -> None:
    if report_to in ("none", "all"):
        return
    from accelerate.tracking import LoggerType, get_available_trackers

    if report_to not in LoggerType.list():
        raise TrainingSetupError(
            f"`report_to` must be 'none', 'all' or one of {LoggerType.list()}, got {report_to!r}."
        )
    if LoggerType(report_to) not in get_available_trackers():
        raise TrainingSetupError(
            f"`report_to` {report_to!r} needs its package installed (for TensorBoard: pip install tensorboard, or the "
            "[train] extra); or pass --report-to none."
        )


def _make_accelerator(config: TrainingConfig) -> Accelerator:
    """The accelerator; its accumulation steps are set once the number of processes is known."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    return Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
        # Seeds the shuffling with (seed + epoch), the same on every process, so that a resumed run can skip the
        # batches it has seen.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )


def _check_distributed_setup(accelerator: Accelerator, config: TrainingConfig) -> None:
    from .checkpoints import is_sharded

    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        configured = plugin.deepspeed_config.get("gradient_accumulation_steps", "auto")
        if configured not in ("auto", config.gradient_accumulation_steps):
            raise TrainingSetupError(
                f"The DeepSpeed configuration sets gradient_accumulation_steps {configured}, but this run needs "
                f"{config.gradient_accumulation_steps} (`effective_batch_size` {config.effective_batch_size} / "
                f"`train_batch_size` {config.train_batch_size} / {accelerator.num_processes} process(es)); set it to "
                "'auto' in the accelerate config."
            )
    if is_sharded(accelerator) and (config.use_ema or config.validation_steps):
        raise TrainingSetupError(
            "FSDP and DeepSpeed ZeRO-3 shard the weights, which validation and the EMA need whole: set "
            "`validation_steps: 0` and `use_ema: false`, or use DDP or DeepSpeed ZeRO-2 (as the release does)."
        )


def _make_ema(accelerator: Accelerator, model: Any, config: TrainingConfig) -> EMAModel | None:
    if not config.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=config.ema_decay)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    return ema


def _validation_set(accelerator: Accelerator, config: TrainingConfig, dataset: Any) -> list[ValidationExample]:
    if not config.validation_steps or not accelerator.is_main_process:
        return []
    from .validation import validation_examples

    try:
        return validation_examples(config.validation_images, dataset, config.num_validation_images)
    except ValueError as error:
        raise TrainingSetupError(str(error).splitlines()[0]) from error


def _tracker_config(config: TrainingConfig) -> dict[str, Any]:
    # TensorBoard's hyper-parameter table takes only scalars and strings.
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


def _log_setup(accelerator: Accelerator, config: TrainingConfig, dataset: Any, step: int) -> None:
    effective = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    _logger().info(
        f"Stage {config.stage}: {len(dataset)} pairs per epoch of {dataset.hq_size} px, "
        f"batch {config.train_batch_size} x accumulation {config.gradient_accumulation_steps} x "
        f"{accelerator.num_processes} process(es) = {effective}, "
        f"steps {step} -> {config.max_train_steps}, mixed precision {accelerator.mixed_precision}."
    )


# ---------------------------------------------------------------------------------------------- the loop
class _TrainingLoop:
    """The optimisation loop and what it does every N steps (checkpoints, validation, logging)."""

    def __init__(
        self,
        accelerator: Accelerator,
        config: TrainingConfig,
        pipe: Any,
        model: Any,
        optimizer: Any,
        lr_scheduler: Any,
        noise_scheduler: DDPMScheduler,
        ema: EMAModel | None,
        examples: list[ValidationExample],
        scale: int,
    ) -> None:
        self.accelerator = accelerator
        self.config = config
        self.pipe = pipe
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.noise_scheduler = noise_scheduler
        self.ema = ema
        self.examples = examples
        self.scale = scale
        self.group_names = [group.get("name", str(i)) for i, group in enumerate(optimizer.param_groups)]

    def run(self, dataset: Any, dataloader: Any, step: int, resumed: Path | None) -> TrainingResult:
        """Trains from optimiser step ``step`` (that of the ``resumed`` checkpoint, if any) to ``max_train_steps``,
        continuing the data order of an uninterrupted run: epoch ``step // steps_per_epoch``, after the batches that
        run consumed in it."""
        from accelerate import skip_first_batches

        config, accelerator = self.config, self.accelerator
        accumulation = config.gradient_accumulation_steps
        steps_per_epoch = math.ceil(len(dataloader) / accumulation)
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        start, last_loss, checkpoint = step, None, resumed
        bar = tqdm(
            total=config.max_train_steps, initial=step, desc=PROG, disable=not accelerator.is_local_main_process
        )
        while step < config.max_train_steps:
            dataset.set_epoch(epoch)
            dataloader.set_epoch(epoch)
            batches = skip_first_batches(dataloader, done_in_epoch * accumulation) if done_in_epoch else dataloader
            done_in_epoch, micro_losses = 0, []
            for batch in batches:
                with accelerator.accumulate(self.model):
                    loss = self.loss(batch, step, len(micro_losses))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                micro_losses.append(accelerator.reduce(loss.detach(), "mean").item())
                if not accelerator.sync_gradients:
                    continue
                step += 1
                last_loss = sum(micro_losses) / len(micro_losses)
                micro_losses = []
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}")
                checkpoint = self.after_step(step, last_loss) or checkpoint
                if step >= config.max_train_steps:
                    break
            epoch += 1
        bar.close()
        if checkpoint is None:
            checkpoint = self.save(step)
        return TrainingResult(step, step - start, checkpoint, last_loss)

    def loss(self, batch: dict[str, Any], step: int, micro_step: int) -> torch.Tensor:
        """The L1 epsilon loss of one batch. The noise comes from a generator seeded by (seed, process, step,
        micro-step): a resumed run draws what an uninterrupted one would, and processes draw different noise."""
        import torch

        from ..seeds import hashed_generator
        from .losses import epsilon_loss, noise_latents

        accelerator, config = self.accelerator, self.config
        generator = hashed_generator(
            config.seed, "noise", accelerator.process_index, step, micro_step, device=accelerator.device
        )
        with torch.no_grad():
            prompt_embeds, _, pooled_prompt_embeds, _ = self._encode_prompts(batch["caption"])
            latents = self._encode_hq(batch["hq"], generator)
        noised = noise_latents(self.noise_scheduler, latents, config.noise_offset, generator)
        noise_pred = self.model(
            noised.noisy,
            noised.timesteps,
            batch["lq"],
            prompt_embeds,
            pooled_prompt_embeds,
            batch["time_ids"],
        )
        return epsilon_loss(noise_pred, noised.noise)

    def _encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        with self.accelerator.autocast():
            return self.pipe.encode_prompt(
                prompt=list(captions),
                device=self.accelerator.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )

    def _encode_hq(self, hq: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """VAE latents of the HQ crops (a sample of the posterior, times ``scaling_factor``), in float32."""
        vae = self.pipe.vae
        # The vanilla SDXL VAE overflows in float16; it says so with `force_upcast`.
        full_precision = self.accelerator.mixed_precision == "fp16" and vae.config.force_upcast
        with nullcontext() if full_precision else self.accelerator.autocast():
            posterior = vae.encode(hq.to(vae.dtype)).latent_dist
            latents = posterior.sample(generator=generator)
        return latents.float() * vae.config.scaling_factor

    def after_step(self, step: int, loss: float) -> Path | None:
        """EMA update, logging, the periodic checkpoint and validation. Returns the checkpoint, if one was saved."""
        config = self.config
        if self.ema is not None and step % config.ema_update_interval == 0:
            from .checkpoints import update_ema

            update_ema(self.ema, self.accelerator.unwrap_model(self.model).parameters(), step, config.ema_counting)
        rates = {f"lr/{name}": rate for name, rate in zip(self.group_names, self.lr_scheduler.get_last_lr())}
        self.accelerator.log({"loss": loss, **rates}, step=step)
        checkpoint = None
        if step % config.checkpointing_steps == 0 or step == config.max_train_steps:
            checkpoint = self.save(step)
        final = step == config.max_train_steps
        if config.validation_steps and (step % config.validation_steps == 0 or final):
            self.validate(step)
        return checkpoint

    def save(self, step: int) -> Path:
        from .checkpoints import prune_checkpoints, save_checkpoint

        checkpoint = save_checkpoint(
            self.accelerator,
            self.pipe,
            self.model,
            self.ema,
            self.config.output_dir,
            step,
            self.config.stage,
            export_ema=self.config.export_ema_weights,
        )
        if self.accelerator.is_main_process:
            for removed in prune_checkpoints(self.config.output_dir, self.config.checkpoints_total_limit):
                _logger().info(f"Removed old checkpoint {removed}.")
        _logger().info(f"Saved {checkpoint}.")
        return checkpoint

    def validate(self, step: int) -> None:
        """Restores the validation images on the main process (the others wait at their next synchronisation), with
        the weights the checkpoints export (the EMA only with ``export_ema_weights``)."""
        from .checkpoints import ema_weights
        from .validation import log_validation, restore_examples

        if not self.accelerator.is_main_process or not self.examples:
            return
        upscale = self.config.validation_upscale or self.scale
        ema = self.ema if self.config.export_ema_weights else None
        with ema_weights(self.accelerator.unwrap_model(self.model), ema):
            images = restore_examples(
                self.pipe,
                self.examples,
                upscale,
                self.config.validation_inference_steps,
                self.config.validation_guidance_scale,
                self.config.seed,
            )
        folder = log_validation(self.accelerator, self.examples, images, self.config.output_dir, step)
        _logger().info(f"Validation images of step {step} in {folder}.")


# ----------------------------------------------------------------------------------------------------- CLI
def build_parser(prog: str = PROG) -> HfArgumentParser:
    """The command line of ``faithdiff-train``, named ``prog`` in its usage and messages: a flag per setting of
    :class:`TrainingConfig` (see :func:`settings_parser`) and ``--config``. Its namespace holds the flags given."""
    parser = settings_parser(
        prog=prog,
        usage="%(prog)s --stage {1,2} [--config YAML] [--setting VALUE ...]",
        description="Train FaithDiff (stage 1: the alignment module; stage 2: UNet, alignment module and LQ encoder). "
        "Settings come from --config and can be overridden one by one, e.g. --learning-rate 1e-5 --report-to none. "
        "Launch with `accelerate launch` for several GPUs or machines.",
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="YAML file of settings, with optional stage1:/stage2: sections (see docs/training.md); the other flags "
        "override it, its sections included.",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Runs ``faithdiff-train`` with the arguments ``argv`` (default: the command line's), its usage and messages
    headed ``prog``. Returns 0 when training finished, 2 on a mistake in the settings or data."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        args = vars(build_parser(prog).parse_args(argv))
        stage, config_path = args.pop("stage"), args.pop("config")
        if config_path is not None:
            config = TrainingConfig.from_yaml(config_path, stage=stage, overrides=args)
        else:
            config = TrainingConfig.from_dict(args, stage=stage)
        result = train(config)
    except (argparse.ArgumentError, TrainingSetupError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(
            f"Stage {config.stage} finished at step {result.step}; trained pipeline: {result.checkpoint / 'pipeline'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
