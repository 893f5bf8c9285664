"""The training configuration: one dataclass, read from YAML, overridden from the command line, checked up front."""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

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


class TrainingSetupError(ValueError):
    """A mistake in the configuration, the data or the starting model, found before training starts."""


@dataclass
class TrainingConfig:
    """Every setting of a FaithDiff training run. Defaults are the release's recipe (``train_stage_1.sh`` and
    ``train_stage_2.sh``) unless a field says otherwise; ``None`` fields are filled in per stage by :meth:`resolve`.

    Model:
        stage: 1 trains the alignment module only; 2 trains the UNet, the alignment module and the LQ encoder.
        pretrained_model: the starting point, a folder or Hub id: an SDXL diffusers model (text encoders, tokenizers,
            scheduler, UNet, VAE) or a FaithDiff pipeline folder (e.g. the converted release, to fine-tune it).
            Default: the release's base, ``SG161222/RealVisXL_V4.0``.
        vae: the VAE that replaces the starting model's (folder or Hub id, with or without a ``vae`` subfolder); it
            also seeds the LQ encoder when one is created. Default: the release's ``madebyollin/sdxl-vae-fp16-fix``;
            ``null`` keeps the starting model's own VAE.
        stage1_checkpoint: stage 2 only: the stage-1 pipeline folder to start from (``.../checkpoint-6000/pipeline``).
            Without it, ``pretrained_model`` must itself be a FaithDiff pipeline (or ``pretrain_alignment`` false).

    Ablations (the paper's; see docs/training.md):
        alignment_type: the alignment module of a new model: ``"transformer"`` (the release) or ``"conv_add"`` (the
            paper's "w/o align": one convolution on the noisy latent feature and one on the LQ features, added).
        lq_feature_source: the LQ features of a new model: ``"mid_block"`` (the release: the VAE encoder's
            penultimate, 512-channel features for SDXL) or ``"last_layer"`` (the paper's "w last layer": the
            encoder's final output, 8 channels for SDXL).
            Both ``null`` by default: a new model (stage 1 from SDXL, or stage 2 without stage 1) is the release's,
            and a FaithDiff pipeline is continued as it is; a value that contradicts the starting pipeline is an
            error.
        pretrain_alignment: ``false`` runs stage 2 straight from the SDXL ``pretrained_model``, with a new
            (zero-initialised) alignment module and LQ encoder and no stage 1 (the paper's "w/o pre-train align").
        freeze: stage 2 only: components kept frozen, any of ``unet`` and ``lq_encoder`` (the paper's
            unified-optimisation rows); they are left out of the optimiser and keep their weights. Stage 1 freezes
            both anyway.

    Data (exactly one of ``train_manifest`` and ``train_folders``):
        train_manifest: ``manifest.jsonl`` written by ``faithdiff-prepare-data``.
        train_folders: folders of HQ photos, cropped and degraded on the fly in the data loader.
        hq_size: HQ crop size of the on-the-fly mode (a prepared set has its own).
        prepared_crops: how a prepared set is read: ``"one_per_epoch"`` (default) gives one example per source image
            per epoch, a different one of its prepared crops in consecutive epochs (close to the release's new window
            every epoch, with ``--crops-per-image N`` windows); ``"all"`` makes every crop an example of every epoch
            (with one crop per image: a fixed crop). The on-the-fly mode cuts a new window every epoch.
        degradation: on-the-fly degradation: a preset name or a YAML file (default: FaithDiff's settings).
        captions: on-the-fly captions: ``"none"`` or ``"sidecar"`` (``photo.json`` beside ``photo.jpg``).
        caption_dropout: probability that a caption is replaced by ``""``; the LQ condition is never dropped.
        random_flip: flip HQ and LQ horizontally with probability 1/2.
        drop_last: drop each epoch's last, incomplete batch. Off by default, as in the release, so that every pair is
            seen in every epoch (the last optimiser step of an epoch may then average fewer pairs).
        dataloader_num_workers: data-loader worker processes.

    Batch and optimisation:
        train_batch_size: images per process per forward pass.
        gradient_accumulation_steps: derived from ``effective_batch_size`` when ``None``.
        effective_batch_size: images per optimiser step, over all processes and accumulation steps; ``None`` lets
            it follow from the other two.
        max_train_steps: optimiser steps (``None``: 6,000 in stage 1, 40,000 in stage 2).
        learning_rate: of the alignment module (and, in stage 2, the UNet). The release uses 5e-5 in both stages;
            the paper reports 1e-5 for stage 2.
        lq_encoder_learning_rate: of the LQ encoder in stage 2.
        adam_beta1, adam_beta2, adam_weight_decay, adam_epsilon: AdamW.
        lr_scheduler, lr_warmup_steps: a ``diffusers.optimization.get_scheduler`` schedule, counted in optimiser steps.
        max_grad_norm: gradient clipping (``None`` disables it).
        noise_offset: scale of the per-channel offset added to the training noise.
        mixed_precision: ``"no"``, ``"fp16"`` (the default, as the release) or ``"bf16"``; ``None`` takes accelerate's
            configuration.
        gradient_checkpointing: recompute UNet and LQ-encoder activations in the backward pass.
        spatial_attention: a new alignment module (stage 1 from SDXL) attends across each sample's pixels instead of
            the release's per-pixel attention; a research option, off by default.
        allow_tf32: TF32 matrix products on Ampere and later GPUs.
        use_ema, ema_decay, ema_update_interval: an exponential moving average of the trained weights (off by
            default; the release updated one every 100 steps). It is saved in accelerate's state of each checkpoint.
        ema_counting: the counter of the EMA's warm-up decay ``min(ema_decay, n / (n + 9))``: ``"diffusers"`` (the
            default) counts EMA updates, as diffusers' EMAModel does; ``"global_step"`` uses the optimiser step, as
            the release does, so that with an update every 100 steps the decay is already about 0.91 at the first
            update and the average stays close to the early weights.
        export_ema_weights: the checkpoints' pipeline folders (and validation) hold the EMA weights instead of the
            trained ones. Off by default: the release exported the trained (non-EMA) weights. Requires ``use_ema``.
            Which weights a pipeline holds is written in its ``training.json`` and in ``training_state.json``.
        seed: seeds the data order, the crops and degradations, the augmentations and the diffusion noise.

    Checkpoints, validation and logging:
        output_dir: where checkpoints, validation images and logs go.
        checkpointing_steps: a checkpoint every N steps (and at the end).
        checkpoints_total_limit: keep only the newest N checkpoints (``None`` keeps all).
        resume_from_checkpoint: a checkpoint folder, or ``"latest"`` (the newest in ``output_dir``, if any).
        validation_steps: restore the validation images every N steps (0 disables validation).
        validation_images: LQ images to restore (captions from their sidecars); by default the first
            ``num_validation_images`` LQ crops of the training set.
        num_validation_images, validation_inference_steps, validation_guidance_scale: validation sampling.
        validation_upscale: upscale factor of validation (``None``: the training set's scale).
        report_to: an accelerate tracker (``"tensorboard"``, ``"wandb"``, ...), ``"all"`` or ``"none"``.
        tracker_project_name: the tracker's run name.
    """

    stage: int = 1
    pretrained_model: str | None = RELEASE_BASE_MODEL
    vae: str | None = RELEASE_VAE
    stage1_checkpoint: str | None = None
    alignment_type: str | None = None
    lq_feature_source: str | None = None
    pretrain_alignment: bool = True
    freeze: list[str] = field(default_factory=list)

    train_manifest: str | None = None
    train_folders: list[str] = field(default_factory=list)
    hq_size: int = 512
    prepared_crops: str = "one_per_epoch"
    degradation: str | None = None
    captions: str = "none"
    caption_dropout: float = 0.2
    random_flip: bool = True
    drop_last: bool = False
    dataloader_num_workers: int = 4

    train_batch_size: int = 16
    gradient_accumulation_steps: int | None = None
    effective_batch_size: int | None = 256
    max_train_steps: int | None = None
    learning_rate: float = 5e-5
    lq_encoder_learning_rate: float = 5e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 300
    max_grad_norm: float | None = 1.0
    noise_offset: float = 0.02
    mixed_precision: str | None = "fp16"
    gradient_checkpointing: bool = True
    spatial_attention: bool = False
    allow_tf32: bool = True
    use_ema: bool = False
    ema_decay: float = 0.9999
    ema_update_interval: int = 100
    ema_counting: str = "diffusers"
    export_ema_weights: bool = False
    seed: int = 42

    output_dir: str = "faithdiff-training"
    checkpointing_steps: int = 2000
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_steps: int = 500
    validation_images: list[str] = field(default_factory=list)
    num_validation_images: int = 4
    validation_inference_steps: int = 20
    validation_guidance_scale: float = 5.0
    validation_upscale: float | None = None
    report_to: str = "tensorboard"
    tracker_project_name: str = "faithdiff"

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(
        cls, values: Mapping[str, Any], stage: int | None = None, overrides: Mapping[str, Any] | None = None
    ) -> "TrainingConfig":
        """Settings from a mapping (missing keys keep their defaults). Keys under ``stage1:``/``stage2:`` apply to that
        stage only, so one file can describe both stages; ``stage`` (e.g. from ``--stage``) picks the stage.
        ``overrides`` (e.g. from the command line) win over both."""
        if not isinstance(values, Mapping):
            raise TrainingSetupError(
                f"The training configuration must be a mapping of settings, got {type(values).__name__}."
            )
        chosen = stage if stage is not None else values.get("stage", 1)
        chosen = _coerce("stage", chosen, int)
        if chosen not in STAGES:
            raise TrainingSetupError(f"`stage` must be 1 or 2, got {chosen!r}.")
        merged = {k: v for k, v in values.items() if k not in STAGE_SECTIONS.values()}
        section = values.get(STAGE_SECTIONS[chosen]) or {}
        if not isinstance(section, Mapping):
            raise TrainingSetupError(f"`{STAGE_SECTIONS[chosen]}` must be a mapping of settings, got {section!r}.")
        merged.update(section)
        merged.update(overrides or {})
        merged["stage"] = chosen
        unknown = sorted(set(merged) - set(cls.field_names()))
        if unknown:
            raise TrainingSetupError(f"Unknown training settings {unknown}; valid settings are {cls.field_names()}.")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _coerce(name, value, hints[name]) for name, value in merged.items()})

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike, stage: int | None = None, overrides: Mapping[str, Any] | None = None
    ) -> "TrainingConfig":
        """Settings from a YAML file, then ``overrides`` (e.g. from the command line) on top, stage sections
        included."""
        import yaml

        if not os.path.isfile(path):
            raise TrainingSetupError(
                f"`--config` {os.fspath(path)!r} does not exist; expected a YAML file of training settings."
            )
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, Mapping):
            raise TrainingSetupError(
                f"`--config` {os.fspath(path)!r} must hold a YAML mapping, got {type(values).__name__}."
            )
        return cls.from_dict(values, stage=stage, overrides=overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------------------------------------- checks
    def resolve(self) -> "TrainingConfig":
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

    def with_processes(self, num_processes: int) -> "TrainingConfig":
        """A copy whose ``gradient_accumulation_steps`` makes batch x accumulation x ``num_processes`` equal the
        effective batch.

        Raises:
            TrainingSetupError: the batch sizes do not divide the effective batch, or contradict it.
        """
        return dataclasses.replace(self, gradient_accumulation_steps=self._accumulation(num_processes))

    def _check_model(self) -> None:
        if self.stage not in STAGES:
            raise TrainingSetupError(f"`stage` must be 1 or 2, got {self.stage!r}.")
        if not self.pretrained_model and not (self.stage == 2 and self.stage1_checkpoint):
            raise TrainingSetupError(
                "`pretrained_model` is required: an SDXL diffusers folder or Hub id, or a FaithDiff pipeline folder."
            )
        if self.stage1_checkpoint and self.stage != 2:
            raise TrainingSetupError(
                f"`stage1_checkpoint` is for stage 2 only, got {self.stage1_checkpoint!r} in stage {self.stage}; "
                "to continue a stage-1 run use `resume_from_checkpoint`."
            )

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
        _check_int(self.hq_size, "hq_size", 8)
        if self.hq_size % 8:
            raise TrainingSetupError(f"`hq_size` must be a multiple of 8 (the VAE's factor), got {self.hq_size}.")
        if self.prepared_crops not in PREPARED_CROPS:
            raise TrainingSetupError(
                f"`prepared_crops` must be one of {PREPARED_CROPS}, got {self.prepared_crops!r}."
            )
        if self.captions not in CAPTION_SOURCES:
            raise TrainingSetupError(f"`captions` must be one of {CAPTION_SOURCES}, got {self.captions!r}.")
        _check_probability(self.caption_dropout, "caption_dropout")
        _check_int(self.dataloader_num_workers, "dataloader_num_workers", 0)
        for path in self.validation_images:
            if not os.path.isfile(path):
                raise TrainingSetupError(
                    f"`validation_images` entry {path!r} does not exist; expected an LQ image file."
                )

    def _check_optimisation(self) -> None:
        _check_int(self.train_batch_size, "train_batch_size", 1)
        for name in ("gradient_accumulation_steps", "effective_batch_size", "max_train_steps"):
            if getattr(self, name) is not None:
                _check_int(getattr(self, name), name, 1)
        for name in ("learning_rate", "lq_encoder_learning_rate", "adam_epsilon"):
            _check_positive(getattr(self, name), name)
        for name in ("adam_beta1", "adam_beta2", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TrainingSetupError(f"`{name}` must lie in [0, 1), got {getattr(self, name)!r}.")
        if self.adam_weight_decay < 0:
            raise TrainingSetupError(f"`adam_weight_decay` must be >= 0, got {self.adam_weight_decay!r}.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise TrainingSetupError(f"`lr_scheduler` must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}.")
        _check_int(self.lr_warmup_steps, "lr_warmup_steps", 0)
        if self.max_grad_norm is not None:
            _check_positive(self.max_grad_norm, "max_grad_norm")
        if self.noise_offset < 0:
            raise TrainingSetupError(f"`noise_offset` must be >= 0, got {self.noise_offset!r}.")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise TrainingSetupError(
                f"`mixed_precision` must be one of {MIXED_PRECISION} or null, got {self.mixed_precision!r}."
            )
        _check_int(self.ema_update_interval, "ema_update_interval", 1)
        if self.ema_counting not in EMA_COUNTING:
            raise TrainingSetupError(f"`ema_counting` must be one of {EMA_COUNTING}, got {self.ema_counting!r}.")
        if self.export_ema_weights and not self.use_ema:
            raise TrainingSetupError("`export_ema_weights: true` needs `use_ema: true` (there is no EMA to export).")

    def _check_outputs(self) -> None:
        _check_int(self.checkpointing_steps, "checkpointing_steps", 1)
        if self.checkpoints_total_limit is not None:
            _check_int(self.checkpoints_total_limit, "checkpoints_total_limit", 1)
        _check_int(self.validation_steps, "validation_steps", 0)
        _check_int(self.num_validation_images, "num_validation_images", 1)
        _check_int(self.validation_inference_steps, "validation_inference_steps", 1)
        if self.validation_upscale is not None:
            _check_positive(self.validation_upscale, "validation_upscale")
        if not self.output_dir:
            raise TrainingSetupError("`output_dir` must name a folder, got an empty value.")

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


# ---------------------------------------------------------------------------------------------- coercion
def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as the field's type. YAML reads ``1e-5`` as a string and the command line gives strings only, so
    numbers, booleans and lists are parsed here, and ``null``/``none`` means None for optional fields."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~", ""))):
        return None
    if typing.get_origin(base) is list:
        return _coerce_list(name, value)
    if base is bool:
        return _coerce_bool(name, value)
    if base in (int, float):
        return _coerce_number(name, value, base)
    if base is str:
        if not isinstance(value, str):
            raise TrainingSetupError(f"`{name}` must be a string, got {value!r}.")
        return value
    return value


def _coerce_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TrainingSetupError(f"`{name}` must be a list of strings (or a comma-separated string), got {value!r}.")
    return list(value)


def _coerce_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.strip().lower() in ("true", "yes", "1", "on")
    raise TrainingSetupError(f"`{name}` must be true or false, got {value!r}.")


def _coerce_number(name: str, value: Any, kind: type) -> int | float:
    expected = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise TrainingSetupError(f"`{name}` must be {expected}, got {value!r}.")
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        raise TrainingSetupError(f"`{name}` must be {expected}, got {value!r}.") from None
    if not isinstance(number, (int, float)) or not math.isfinite(number):
        raise TrainingSetupError(f"`{name}` must be {expected}, got {value!r}.")
    if kind is int:
        if number != int(number):
            raise TrainingSetupError(f"`{name}` must be an integer, got {value!r}.")
        return int(number)
    return float(number)


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TrainingSetupError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _check_positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise TrainingSetupError(f"`{name}` must be a positive number, got {value!r}.")


def _check_probability(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise TrainingSetupError(f"`{name}` must be a probability in [0, 1], got {value!r}.")
