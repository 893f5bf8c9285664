"""The training configuration: one dataclass, read from YAML, overridden from the command line, checked up front.

transformers' ``HfArgumentParser`` makes the dataclass's fields ``faithdiff-train``'s flags (each field's ``help``
is what ``--help`` prints) and gives each the type that reads its value from text; YAML text values (``1e-5``,
``no``, ``null``) are read with the same types. What this module adds is the per-stage merge of a YAML file and the
checks of :meth:`TrainingConfig.resolve`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checks import check_bool, check_choice, check_integer, check_positive, check_probability, is_number

# transformers is imported where a parser is made: importing this module (the dataclass, the checks) stays light.
if TYPE_CHECKING:
    from transformers import HfArgumentParser

STAGES = (1, 2)
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
CAPTION_SOURCES = ("none", "sidecar")
PREPARED_CROPS = ("one_per_epoch", "all")  # as in .data, which this module does not import (it loads torch)
# How the EMA's warm-up decay counts: diffusers' EMAModel counts its own updates; the release fed it the global step.
EMA_COUNTING = ("diffusers", "global_step")
# The release's starting models (train_stage_1.sh): RealVisXL V4.0 as the SDXL base, and an fp16-safe SDXL VAE.
RELEASE_BASE_MODEL = "SG161222/RealVisXL_V4.0"
RELEASE_VAE = "madebyollin/sdxl-vae-fp16-fix"
# Steps of each stage in the release (train_stage_1.sh, train_stage_2.sh).
RELEASE_STEPS = {1: 6000, 2: 40000}
# YAML sections whose keys apply to one stage only.
STAGE_SECTIONS = {1: "stage1", 2: "stage2"}
# The paper's ablations, as in ..alignment and ..lq_features (which this module does not import: they load torch).
ALIGNMENT_TYPES = ("transformer", "conv_add")
LQ_FEATURE_SOURCES = ("mid_block", "last_layer")
# What stage 2 can keep frozen (the unified-optimisation ablations); the alignment module is trained in both stages.
FREEZABLE = ("unet", "lq_encoder")
# How a YAML text or a flag says None, for the settings that may be None.
NULL_WORDS = ("null", "none", "~", "")
# What HfArgumentParser's types read, for the message when a text is not one.
_EXPECTED = {"int": "an integer", "float": "a number", "string_to_bool": "true or false"}
# What argparse should take for a negative number given as a value: its own pattern misses `-1e-4` and `-inf` and
# reads them as unknown flags ("expected one argument"); no setting has a flag that looks like a number.
_NEGATIVE_NUMBER = re.compile(r"^-(\.?\d|inf|nan)", re.IGNORECASE)


class TrainingSetupError(ValueError):
    """A mistake in the configuration, the data or the starting model, found before training starts."""


@dataclass
class TrainingConfig:
    """Every setting of a FaithDiff training run, one field each, documented by its ``help`` (what
    ``faithdiff-train --help`` prints). Defaults are the release's recipe (``train_stage_1.sh`` and
    ``train_stage_2.sh``) unless a field says otherwise; ``None`` fields are filled in per stage by :meth:`resolve`.

    The fields come in groups: the model (``stage`` to ``stage1_checkpoint``), the paper's ablations (see
    docs/training.md), the data (exactly one of ``train_manifest`` and ``train_folders``), batch and optimisation,
    and checkpoints, validation and logging.
    """

    # The command line requires it, so that one YAML file can describe both stages.
    stage: int = field(
        default=1,
        metadata={
            "help": "1 trains the alignment module only; 2 trains the UNet, the alignment module and the LQ encoder.",
            "required": True,
            "choices": STAGES,
        },
    )
    pretrained_model: str | None = field(
        default=RELEASE_BASE_MODEL,
        metadata={
            "help": "The starting point, a folder or Hub id: an SDXL diffusers model (text encoders, tokenizers, "
            "scheduler, UNet, VAE) or a FaithDiff pipeline folder (e.g. the converted release, to fine-tune it). "
            "The default is the release's base.",
        },
    )
    vae: str | None = field(
        default=RELEASE_VAE,
        metadata={
            "help": "The VAE that replaces the starting model's (folder or Hub id, with or without a `vae` "
            "subfolder); it also seeds the LQ encoder when one is created. null keeps the starting model's own VAE; "
            "the default is the release's.",
        },
    )
    stage1_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Stage 2 only: the stage-1 pipeline folder to start from (.../checkpoint-6000/pipeline). "
            "Without it, `pretrained_model` must itself be a FaithDiff pipeline (or `pretrain_alignment` false).",
        },
    )

    alignment_type: str | None = field(
        default=None,
        metadata={
            "help": f"The alignment module of a new model, one of {ALIGNMENT_TYPES}: 'transformer' (the release) or "
            "'conv_add' (the paper's 'w/o align': one convolution on the noisy latent feature and one on the LQ "
            "features, added). null: the release's for a new model (stage 1 from SDXL, or stage 2 without stage 1), "
            "and a FaithDiff pipeline's own when one is continued; a value that contradicts the starting pipeline is "
            "an error.",
        },
    )
    lq_feature_source: str | None = field(
        default=None,
        metadata={
            "help": f"The LQ features of a new model, one of {LQ_FEATURE_SOURCES}: 'mid_block' (the release: the VAE "
            "encoder's penultimate, 512-channel features for SDXL) or 'last_layer' (the paper's 'w last layer': the "
            "encoder's final output, 8 channels for SDXL). null as for `alignment_type`.",
        },
    )
    pretrain_alignment: bool = field(
        default=True,
        metadata={
            "help": "false runs stage 2 straight from the SDXL `pretrained_model`, with a new (zero-initialised) "
            "alignment module and LQ encoder and no stage 1 (the paper's 'w/o pre-train align').",
        },
    )
    freeze: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"Stage 2 only: components kept frozen, any of {FREEZABLE} (the paper's unified-optimisation "
            "rows); they are left out of the optimiser and keep their weights. Stage 1 freezes both anyway.",
        },
    )

    train_manifest: str | None = field(
        default=None,
        metadata={"help": "The manifest.jsonl written by faithdiff-prepare-data (or give `train_folders`)."},
    )
    train_folders: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Folders of HQ photos, cropped and degraded on the fly in the data loader (or give "
            "`train_manifest`).",
        },
    )
    hq_size: int = field(
        default=512, metadata={"help": "HQ crop size of the on-the-fly mode (a prepared set has its own)."}
    )
    prepared_crops: str = field(
        default="one_per_epoch",
        metadata={
            "help": "How a prepared set is read: 'one_per_epoch' gives one example per source image per epoch, a "
            "different one of its prepared crops in consecutive epochs (close to the release's new window every "
            "epoch, with --crops-per-image N windows); 'all' makes every crop an example of every epoch (with one "
            "crop per image: a fixed crop). The on-the-fly mode cuts a new window every epoch.",
        },
    )
    degradation: str | None = field(
        default=None,
        metadata={"help": "On-the-fly degradation: a preset name or a YAML file (null: FaithDiff's settings)."},
    )
    captions: str = field(
        default="none",
        metadata={
            "help": f"On-the-fly captions, one of {CAPTION_SOURCES}: 'sidecar' reads photo.json beside photo.jpg."
        },
    )
    caption_dropout: float = field(
        default=0.2,
        metadata={"help": "Probability that a caption is replaced by ''; the LQ condition is never dropped."},
    )
    random_flip: bool = field(default=True, metadata={"help": "Flip HQ and LQ horizontally with probability 1/2."})
    drop_last: bool = field(
        default=False,
        metadata={
            "help": "Drop each epoch's last, incomplete batch. Off, as in the release, so that every pair is seen "
            "in every epoch (the last optimiser step of an epoch may then average fewer pairs).",
        },
    )
    dataloader_num_workers: int = field(default=4, metadata={"help": "Data-loader worker processes."})

    train_batch_size: int = field(default=16, metadata={"help": "Images per process per forward pass."})
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={"help": "Forward passes per optimiser step; null derives it from `effective_batch_size`."},
    )
    effective_batch_size: int | None = field(
        default=256,
        metadata={
            "help": "Images per optimiser step, over all processes and accumulation steps; null lets it follow from "
            "the other two.",
        },
    )
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Optimiser steps (null: the release's 6000 in stage 1, 40000 in stage 2)."}
    )
    learning_rate: float = field(
        default=5e-5,
        metadata={
            "help": "Of the alignment module (and, in stage 2, the UNet). The release uses 5e-5 in both stages; the "
            "paper reports 1e-5 for stage 2.",
        },
    )
    lq_encoder_learning_rate: float = field(default=5e-6, metadata={"help": "Of the LQ encoder in stage 2."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW's beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW's beta2."})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW's weight decay."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW's epsilon."})
    lr_scheduler: str = field(
        default="cosine",
        metadata={
            "help": f"A diffusers.optimization.get_scheduler schedule, one of {LR_SCHEDULERS}, in optimiser steps."
        },
    )
    lr_warmup_steps: int = field(default=300, metadata={"help": "Warm-up of the schedule, in optimiser steps."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping (null disables it)."})
    noise_offset: float = field(
        default=0.02, metadata={"help": "Scale of the per-channel offset added to the training noise."}
    )
    mixed_precision: str | None = field(
        default="fp16",
        metadata={"help": f"One of {MIXED_PRECISION} ('fp16' as the release); null takes accelerate's configuration."},
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute UNet and LQ-encoder activations in the backward pass."}
    )
    spatial_attention: bool = field(
        default=False,
        metadata={
            "help": "A new alignment module (stage 1 from SDXL) attends across each sample's pixels instead of the "
            "release's per-pixel attention; a research option.",
        },
    )
    allow_tf32: bool = field(default=True, metadata={"help": "TF32 matrix products on Ampere and later GPUs."})
    use_ema: bool = field(
        default=False,
        metadata={
            "help": "Keep an exponential moving average of the trained weights (the release updated one every 100 "
            "steps); it is saved in accelerate's state of each checkpoint.",
        },
    )
    ema_decay: float = field(default=0.9999, metadata={"help": "The EMA's decay."})
    ema_update_interval: int = field(default=100, metadata={"help": "An EMA update every N optimiser steps."})
    ema_counting: str = field(
        default="diffusers",
        metadata={
            "help": "The counter n of the EMA's warm-up decay min(ema_decay, n / (n + 9)): 'diffusers' counts EMA "
            "updates, as diffusers' EMAModel does; 'global_step' uses the optimiser step, as the release does, so "
            "that with an update every 100 steps the decay is already about 0.91 at the first update and the average "
            "stays close to the early weights.",
        },
    )
    export_ema_weights: bool = field(
        default=False,
        metadata={
            "help": "The checkpoints' pipeline folders (and validation) hold the EMA weights instead of the trained "
            "ones (the release exported the trained ones); needs `use_ema`. Which weights a pipeline holds is "
            "written in its training.json and in training_state.json.",
        },
    )
    seed: int = field(
        default=42,
        metadata={
            "help": "Seeds the data order, the crops and degradations, the augmentations and the diffusion noise."
        },
    )

    output_dir: str = field(
        default="faithdiff-training", metadata={"help": "Where checkpoints, validation images and logs go."}
    )
    checkpointing_steps: int = field(
        default=2000, metadata={"help": "A checkpoint every N optimiser steps (and at the end)."}
    )
    checkpoints_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the newest N checkpoints (null keeps all)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' (the newest in `output_dir`, if any)."}
    )
    validation_steps: int = field(
        default=500,
        metadata={"help": "Restore the validation images every N optimiser steps (0 disables validation)."},
    )
    validation_images: list[str] = field(
        default_factory=list,
        metadata={
            "help": "LQ images to restore (captions from their sidecars); by default the first "
            "`num_validation_images` LQ crops of the training set.",
        },
    )
    num_validation_images: int = field(
        default=4, metadata={"help": "Training-set crops restored when no images are given."}
    )
    validation_inference_steps: int = field(default=20, metadata={"help": "Sampling steps of validation."})
    validation_guidance_scale: float = field(
        default=5.0, metadata={"help": "Classifier-free guidance scale of validation."}
    )
    validation_upscale: float | None = field(
        default=None, metadata={"help": "Upscale factor of validation (null: the training set's scale)."}
    )
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "An accelerate tracker ('tensorboard', 'wandb', ...), 'all' or 'none'."},
    )
    tracker_project_name: str = field(default="faithdiff", metadata={"help": "The tracker's run name."})

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        """The settings' names, in their order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(
        cls, values: Mapping[str, Any], stage: int | None = None, overrides: Mapping[str, Any] | None = None
    ) -> TrainingConfig:
        """Settings from a mapping (missing keys keep their defaults).

        Args:
            values: settings by name. Keys under ``stage1:``/``stage2:`` apply to that stage only, so that one file
                can describe both stages. Text values are read as the command line reads them (``1e-5``, ``no``,
                ``null``, and a comma-separated list for the list settings); others are taken as they are.
            stage: the stage, which picks the section (e.g. from ``--stage``); None takes ``values["stage"]``, or 1.
            overrides: settings (e.g. from the command line) that win over ``values``, its stage sections included.

        Raises:
            TrainingSetupError: an unknown setting, a stage other than 1 and 2, or a text its setting cannot read.
        """
        if not isinstance(values, Mapping):
            raise TrainingSetupError(
                f"The training configuration must be a mapping of settings, got {type(values).__name__}."
            )
        chosen = _read_setting("stage", values.get("stage", 1) if stage is None else stage)
        check_integer(chosen, "stage", min(STAGES), max(STAGES), error=TrainingSetupError)
        section = values.get(STAGE_SECTIONS[chosen]) or {}
        if not isinstance(section, Mapping):
            raise TrainingSetupError(f"`{STAGE_SECTIONS[chosen]}` must be a mapping of settings, got {section!r}.")
        merged = {k: v for k, v in values.items() if k not in STAGE_SECTIONS.values()}
        merged.update(section)
        merged.update(overrides or {})
        merged["stage"] = chosen
        unknown = sorted(set(merged) - set(cls.field_names()))
        if unknown:
            raise TrainingSetupError(f"Unknown training settings {unknown}; valid settings are {cls.field_names()}.")
        (config,) = settings_parser().parse_dict({name: _read_setting(name, value) for name, value in merged.items()})
        return config

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike, stage: int | None = None, overrides: Mapping[str, Any] | None = None
    ) -> TrainingConfig:
        """Settings from a YAML file, read as :meth:`from_dict` reads a mapping.

        Args:
            path: the YAML file, a mapping of settings with optional ``stage1:``/``stage2:`` sections.
            stage: as for :meth:`from_dict`.
            overrides: as for :meth:`from_dict`.
        """
        from ..yaml_files import read_yaml

        if not os.path.isfile(path):
            raise TrainingSetupError(
                f"`--config` {os.fspath(path)!r} does not exist; expected a YAML file of training settings."
            )
        values = read_yaml(path, "`--config`", error=TrainingSetupError) or {}
        if not isinstance(values, Mapping):
            raise TrainingSetupError(
                f"`--config` {os.fspath(path)!r} must hold a YAML mapping, got {type(values).__name__}."
            )
        return cls.from_dict(values, stage=stage, overrides=overrides)

    def to_dict(self) -> dict[str, Any]:
        """The settings by name, as :meth:`from_dict` reads them back."""
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------------------------------------- checks
    def resolve(self) -> TrainingConfig:
        """Checks every setting and fills in the per-stage defaults (steps). Returns a copy; the accumulation steps,
        which depend on the number of processes, come from :meth:`with_processes`.

        Raises:
            TrainingSetupError: naming the setting, its value and what was expected.
        """
        config = dataclasses.replace(
            self,
            train_folders=list(self.train_folders),
            validation_images=list(self.validation_images),
            freeze=list(self.freeze),
        )
        config._check_model()
        config._check_ablations()
        config._check_data()
        config._check_optimisation()
        config._check_outputs()
        if config.max_train_steps is None:
            config.max_train_steps = RELEASE_STEPS[config.stage]
        # What no number of processes can fix fails here, before any model is loaded.
        config._accumulation(1 if config.gradient_accumulation_steps is None else None)
        return config

    def with_processes(self, num_processes: int) -> TrainingConfig:
        """A copy whose ``gradient_accumulation_steps`` makes batch x accumulation x ``num_processes`` equal the
        effective batch.

        Raises:
            TrainingSetupError: the batch sizes do not divide the effective batch, or contradict it.
        """
        return dataclasses.replace(self, gradient_accumulation_steps=self._accumulation(num_processes))

    def _check_model(self) -> None:
        check_integer(self.stage, "stage", min(STAGES), max(STAGES), error=TrainingSetupError)
        if not self.pretrained_model and not (self.stage == 2 and self.stage1_checkpoint):
            raise TrainingSetupError(
                "`pretrained_model` is required: an SDXL diffusers folder or Hub id, or a FaithDiff pipeline folder."
            )
        if self.stage1_checkpoint and self.stage != 2:
            raise TrainingSetupError(
                f"`stage1_checkpoint` is for stage 2 only, got {self.stage1_checkpoint!r} in stage {self.stage}; "
                "to continue a stage-1 run use `resume_from_checkpoint`."
            )
        for name in _SWITCHES:
            check_bool(getattr(self, name), name, error=TrainingSetupError)

    def _check_ablations(self) -> None:
        choices = {"alignment_type": ALIGNMENT_TYPES, "lq_feature_source": LQ_FEATURE_SOURCES}
        for name, allowed in choices.items():
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                raise TrainingSetupError(f"`{name}` must be one of {allowed} or null, got {getattr(self, name)!r}.")
        if self.spatial_attention and self.alignment_type == "conv_add":
            raise TrainingSetupError(
                "`spatial_attention: true` needs `alignment_type: transformer`; the 'conv_add' module has no "
                "attention."
            )
        unknown = [name for name in self.freeze if name not in FREEZABLE]
        if unknown:
            raise TrainingSetupError(f"`freeze` may name {FREEZABLE}, got {self.freeze!r}.")
        if not self.pretrain_alignment and self.stage != 2:
            raise TrainingSetupError(
                "`pretrain_alignment: false` is for stage 2 (it skips stage 1, the alignment pre-training), got it in "
                f"stage {self.stage}."
            )
        if not self.pretrain_alignment and self.stage1_checkpoint:
            raise TrainingSetupError(
                f"`pretrain_alignment: false` starts stage 2 without stage 1, but `stage1_checkpoint` is set to "
                f"{self.stage1_checkpoint!r}; give one of the two."
            )

    def _check_data(self) -> None:
        if bool(self.train_manifest) == bool(self.train_folders):
            raise TrainingSetupError(
                "Give exactly one of `train_manifest` (a set prepared by faithdiff-prepare-data) and `train_folders` "
                f"(HQ folders degraded on the fly), got train_manifest={self.train_manifest!r}, "
                f"train_folders={self.train_folders!r}."
            )
        if self.train_manifest and not os.path.isfile(self.train_manifest):
            raise TrainingSetupError(
                f"`train_manifest` {self.train_manifest!r} does not exist; run faithdiff-prepare-data first, or point "
                "it at the manifest.jsonl of a prepared set."
            )
        for folder in self.train_folders:
            if not os.path.isdir(folder):
                raise TrainingSetupError(
                    f"`train_folders` entry {folder!r} is not a folder; expected folders of HQ images."
                )
        if self.train_folders:
            _check_degradation(self.degradation)
        check_integer(self.hq_size, "hq_size", 8, error=TrainingSetupError)
        if self.hq_size % 8:
            raise TrainingSetupError(f"`hq_size` must be a multiple of 8 (the VAE's factor), got {self.hq_size}.")
        check_choice(self.prepared_crops, "prepared_crops", PREPARED_CROPS, error=TrainingSetupError)
        check_choice(self.captions, "captions", CAPTION_SOURCES, error=TrainingSetupError)
        check_probability(self.caption_dropout, "caption_dropout", error=TrainingSetupError)
        check_integer(self.dataloader_num_workers, "dataloader_num_workers", 0, error=TrainingSetupError)
        for path in self.validation_images:
            if not os.path.isfile(path):
                raise TrainingSetupError(
                    f"`validation_images` entry {path!r} does not exist; expected an LQ image file."
                )

    def _check_optimisation(self) -> None:
        check_integer(self.train_batch_size, "train_batch_size", 1, error=TrainingSetupError)
        for name in ("gradient_accumulation_steps", "effective_batch_size", "max_train_steps"):
            if getattr(self, name) is not None:
                check_integer(getattr(self, name), name, 1, error=TrainingSetupError)
        for name in ("learning_rate", "lq_encoder_learning_rate", "adam_epsilon"):
            check_positive(getattr(self, name), name, error=TrainingSetupError)
        for name in ("adam_beta1", "adam_beta2", "ema_decay"):
            value = getattr(self, name)
            if not is_number(value) or not 0.0 <= value < 1.0:
                raise TrainingSetupError(f"`{name}` must lie in [0, 1), got {value!r}.")
        _check_non_negative(self.adam_weight_decay, "adam_weight_decay")
        check_choice(self.lr_scheduler, "lr_scheduler", LR_SCHEDULERS, error=TrainingSetupError)
        check_integer(self.lr_warmup_steps, "lr_warmup_steps", 0, error=TrainingSetupError)
        if self.max_grad_norm is not None:
            check_positive(self.max_grad_norm, "max_grad_norm", error=TrainingSetupError)
        _check_non_negative(self.noise_offset, "noise_offset")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise TrainingSetupError(
                f"`mixed_precision` must be one of {MIXED_PRECISION} or null, got {self.mixed_precision!r}."
            )
        check_integer(self.ema_update_interval, "ema_update_interval", 1, error=TrainingSetupError)
        check_choice(self.ema_counting, "ema_counting", EMA_COUNTING, error=TrainingSetupError)
        if self.export_ema_weights and not self.use_ema:
            raise TrainingSetupError("`export_ema_weights: true` needs `use_ema: true` (there is no EMA to export).")
        check_integer(self.seed, "seed", 0, error=TrainingSetupError)

    def _check_outputs(self) -> None:
        check_integer(self.checkpointing_steps, "checkpointing_steps", 1, error=TrainingSetupError)
        if self.checkpoints_total_limit is not None:
            check_integer(self.checkpoints_total_limit, "checkpoints_total_limit", 1, error=TrainingSetupError)
        check_integer(self.validation_steps, "validation_steps", 0, error=TrainingSetupError)
        check_integer(self.num_validation_images, "num_validation_images", 1, error=TrainingSetupError)
        check_integer(self.validation_inference_steps, "validation_inference_steps", 1, error=TrainingSetupError)
        if self.validation_upscale is not None:
            check_positive(self.validation_upscale, "validation_upscale", error=TrainingSetupError)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise TrainingSetupError(f"`output_dir` must name a folder, got {self.output_dir!r}.")
        _check_output_folder(self.output_dir)

    def _accumulation(self, num_processes: int | None) -> int:
        """Gradient accumulation steps such that batch x accumulation x processes = the effective batch. With
        ``num_processes=None`` only what does not depend on it is checked."""
        if self.effective_batch_size is None:
            return self.gradient_accumulation_steps or 1
        if num_processes is None:
            per_step = self.train_batch_size * self.gradient_accumulation_steps
            if self.effective_batch_size % per_step:
                raise TrainingSetupError(
                    f"`effective_batch_size` {self.effective_batch_size} is not divisible by `train_batch_size` "
                    f"{self.train_batch_size} x `gradient_accumulation_steps` {self.gradient_accumulation_steps} = "
                    f"{per_step}; leave one of them unset (null) to derive it."
                )
            return self.gradient_accumulation_steps
        per_step = self.train_batch_size * num_processes
        if self.gradient_accumulation_steps is None:
            if self.effective_batch_size % per_step:
                raise TrainingSetupError(
                    f"`effective_batch_size` {self.effective_batch_size} is not divisible by `train_batch_size` "
                    f"{self.train_batch_size} x {num_processes} process(es) = {per_step}; choose a batch size that "
                    "divides it, or set `effective_batch_size: null`."
                )
            return self.effective_batch_size // per_step
        if per_step * self.gradient_accumulation_steps != self.effective_batch_size:
            raise TrainingSetupError(
                f"`train_batch_size` {self.train_batch_size} x `gradient_accumulation_steps` "
                f"{self.gradient_accumulation_steps} x {num_processes} process(es) = "
                f"{per_step * self.gradient_accumulation_steps}, but `effective_batch_size` is "
                f"{self.effective_batch_size}; leave one of them unset (null) to derive it."
            )
        return self.gradient_accumulation_steps


# The on/off settings, which resolve() checks are bools (YAML's `1` is not one).
_SWITCHES = tuple(name for name, hint in typing.get_type_hints(TrainingConfig).items() if hint is bool)


def settings_parser(**kwargs: Any) -> HfArgumentParser:
    """transformers' ``HfArgumentParser`` of :class:`TrainingConfig`: a flag per setting, ``--learning-rate`` (also
    ``--learning_rate``), with the setting's help and default; an on/off setting takes ``true``/``false`` or
    nothing (true), and one that is on by default also ``--no-random-flip``. The settings that may be None read
    ``null`` as None.

    Only the flags given reach the parsed namespace, so that they can be laid over a YAML file, its stage sections
    included (:meth:`TrainingConfig.from_dict` fills in the rest). A value its setting cannot read raises
    ``argparse.ArgumentError``, one line naming the setting, instead of exiting.

    Args:
        kwargs: passed on to ``argparse.ArgumentParser`` (``prog``, ``description``, ...).
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainingConfig, exit_on_error=False, **kwargs)
    # argparse offers no public way to say which texts are negative numbers; its parsers read this attribute.
    parser._negative_number_matcher = _NEGATIVE_NUMBER
    hints = typing.get_type_hints(TrainingConfig)
    # argparse lists a parser's arguments only in `_actions`; those of the settings have the setting as `dest`.
    for action in parser._actions:
        if action.dest not in hints:
            continue
        # The spelling with dashes first, as the help and messages show it.
        action.option_strings.sort(key=lambda flag: "_" in flag)
        if action.type is None:  # the `--no-...` flag of a setting on by default
            action.help = f"the same as {action.option_strings[0].replace('--no-', '--', 1)} false"
        else:
            nullable = type(None) in typing.get_args(hints[action.dest])
            action.type = _SettingReader(action.dest, action.type, nullable, action.nargs == "+")
            if action.choices is None:
                action.metavar = "BOOL" if action.type.parse.__name__ == "string_to_bool" else "VALUE"
            if not action.required:
                action.help = f"{action.help} (default: {_shown(action.default)})"
        action.default = argparse.SUPPRESS
    return parser


@dataclass(frozen=True)
class _SettingReader:
    """Reads one setting from text with the type HfArgumentParser gave its flag; where the setting may be None,
    a word of ``NULL_WORDS`` is None.

    Args:
        name: the setting.
        parse: HfArgumentParser's type: ``int``, ``float``, ``str`` or ``string_to_bool``.
        nullable: whether the setting may be None.
        many: whether the setting is a list (the flag takes several values; one YAML text is split at commas).
    """

    name: str
    parse: Callable[[str], Any]
    nullable: bool
    many: bool

    def __call__(self, text: str) -> Any:
        if self.nullable and text.strip().lower() in NULL_WORDS:
            return None
        try:
            return self.parse(text)
        except (ValueError, argparse.ArgumentTypeError):
            # argparse keeps the message of an ArgumentTypeError (of a ValueError only the type's name).
            expected = _EXPECTED.get(self.parse.__name__, "a value of its type")
            raise argparse.ArgumentTypeError(f"`{self.name}` must be {expected}, got {text!r}.") from None


@cache
def _setting_readers() -> dict[str, _SettingReader]:
    return {
        action.dest: action.type for action in settings_parser()._actions if isinstance(action.type, _SettingReader)
    }


def _read_setting(name: str, value: Any) -> Any:
    """``value`` of the setting ``name`` as the command line reads it when it is text (YAML 1.1 reads ``1e-5`` as
    text), a comma-separated list for a list setting; another value as it is, for ``resolve`` to check."""
    if not isinstance(value, str):
        return value
    reader = _setting_readers()[name]
    try:
        if reader.many:
            return [reader(part.strip()) for part in value.split(",") if part.strip()]
        return reader(value)
    except argparse.ArgumentTypeError as error:
        raise TrainingSetupError(str(error)) from None


def _shown(default: Any) -> str:
    """A default as YAML writes it."""
    if default is None:
        return "null"
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def _check_degradation(spec: str | None) -> None:
    """Reads the on-the-fly degradation model here, so that a mistake in its file stops the run before any model
    loads (the data set reads it again when it is built)."""
    from ..degradations.config import load_degradation

    try:
        load_degradation(spec)
    except ValueError as error:
        raise TrainingSetupError(str(error)) from error


# What training writes in `output_dir`, all folders: checkpoints (`checkpoint-N`), validation images and logs.
_OUTPUT_FOLDERS = re.compile(r"^(checkpoint-\d+|validation|logs)$")


def _check_output_folder(output_dir: str) -> None:
    """Refuses, before any model loads, an output folder that is a file or cannot be created, or that holds a file
    where training writes a folder (``checkpoint-N``, ``validation``, ``logs``), which it would fail on hours later."""
    from ..application.planning import check_output_dir

    try:
        check_output_dir(output_dir)
    except ValueError as error:
        raise TrainingSetupError(str(error)) from error
    folder = Path(output_dir)
    if not folder.is_dir():
        return
    in_the_way = sorted(p.name for p in folder.iterdir() if _OUTPUT_FOLDERS.match(p.name) and not p.is_dir())
    if in_the_way:
        raise TrainingSetupError(
            f"`output_dir` {output_dir!r} holds files where training writes folders: {', '.join(in_the_way)}; move "
            "them or choose another `output_dir` (files we did not make are never written over)."
        )


def _check_non_negative(value: Any, name: str) -> None:
    if not is_number(value) or not math.isfinite(value) or value < 0:
        raise TrainingSetupError(f"`{name}` must be a finite number >= 0, got {value!r}.")
