"""The two training stages: where they start, what they train, and the module the optimiser sees.

Stage 1 trains only the alignment module (zero-initialised, so training starts from the unchanged UNet) on top of a
frozen UNet and a frozen copy of the VAE encoder as LQ encoder. Stage 2 starts from stage 1 and trains the alignment
module, the whole UNet and the LQ encoder, the encoder at a tenth of the learning rate.

The paper's ablations change this: stage 2 may start from SDXL without stage 1 (``pretrain_alignment: false``) and
keep the UNet or the LQ encoder frozen (``freeze``), and a new model may have the "w/o align" alignment module
(``alignment_type: conv_add``) or the encoder's last-layer features (``lq_feature_source: last_layer``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.schedulers import SchedulerMixin
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..alignment import FaithDiffAlignmentModel, aligned_conv_in
from ..lq_features import FaithDiffLQEncoder, vae_feature_source
from ..pipeline_faithdiff_sdxl import FaithDiffSDXLPipeline
from .config import TrainingConfig, TrainingSetupError

TRAINABLE_COMPONENTS = ("unet", "alignment", "lq_encoder")
# The release's condition-embedding GroupNorm; narrower LQ features (the last layer's 8 channels) take a divisor.
RELEASE_NORM_GROUPS = 32
# The variant of a model built without settings: the release's.
DEFAULT_VARIANT = {"alignment_type": "transformer", "lq_feature_source": "mid_block"}


@dataclass(frozen=True)
class StageRecipe:
    """What a stage trains, and which learning rate each trained component gets (``learning_rate`` or
    ``lq_encoder_learning_rate``)."""

    stage: int
    trained: tuple[str, ...]
    learning_rates: dict[str, str]

    def without(self, frozen: Collection[str]) -> StageRecipe:
        """The recipe with the ``frozen`` components left untrained."""
        return StageRecipe(self.stage, tuple(name for name in self.trained if name not in frozen), self.learning_rates)


STAGE_RECIPES = {
    1: StageRecipe(1, ("alignment",), {"alignment": "learning_rate"}),
    2: StageRecipe(
        2,
        ("unet", "alignment", "lq_encoder"),
        {"unet": "learning_rate", "alignment": "learning_rate", "lq_encoder": "lq_encoder_learning_rate"},
    ),
}


# ------------------------------------------------------------------------------------------- starting point
def model_index(name_or_path: str) -> dict[str, Any] | None:
    """The ``model_index.json`` of a diffusers folder or Hub repository, or None if it has none."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "model_index.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    try:
        return DiffusionPipeline.load_config(name_or_path)
    except (OSError, ValueError):
        return None


def is_faithdiff_pipeline(name_or_path: str) -> bool:
    """Whether ``name_or_path`` holds a FaithDiff pipeline (it has an alignment module)."""
    index = model_index(name_or_path)
    return index is not None and "alignment" in index


def starting_point(config: TrainingConfig) -> tuple[str, bool]:
    """The folder or Hub id a stage starts from, and whether it is a FaithDiff pipeline (else an SDXL model).

    Raises:
        TrainingSetupError: a local path that does not exist, a ``stage1_checkpoint`` that is not a FaithDiff
            pipeline, stage 2 without a FaithDiff pipeline to start from (unless ``pretrain_alignment`` is false,
            which needs an SDXL model), or an ablation setting that contradicts the FaithDiff pipeline.
    """
    source = config.stage1_checkpoint or config.pretrained_model
    name = "stage1_checkpoint" if config.stage1_checkpoint else "pretrained_model"
    if _looks_local(source) and not os.path.isdir(source):
        raise TrainingSetupError(
            f"`{name}` {source!r} is not a folder; expected a diffusers model folder or a Hub id."
        )
    faithdiff = is_faithdiff_pipeline(source)
    if config.stage1_checkpoint and not faithdiff:
        raise TrainingSetupError(
            f"`stage1_checkpoint` {source!r} is not a FaithDiff pipeline folder; expected the `pipeline` folder of a "
            "stage-1 checkpoint, e.g. OUTPUT/checkpoint-6000/pipeline."
        )
    if not config.pretrain_alignment and faithdiff:
        raise TrainingSetupError(
            f"`pretrain_alignment: false` starts stage 2 from an SDXL model, but `pretrained_model` {source!r} is a "
            "FaithDiff pipeline (its alignment module is already trained); give an SDXL model."
        )
    if config.stage == 2 and config.pretrain_alignment and not faithdiff:
        raise TrainingSetupError(
            f"Stage 2 starts from a stage-1 checkpoint, but `pretrained_model` {source!r} is not a FaithDiff pipeline "
            "(it has no alignment module) and no `stage1_checkpoint` is set; run stage 1 first and set "
            "`stage1_checkpoint: OUTPUT/checkpoint-N/pipeline`, or set `pretrain_alignment: false` to start from "
            "this SDXL model without stage 1."
        )
    if faithdiff:
        _check_variant(config, name, source, pipeline_variant(source))
    return source, faithdiff


def pipeline_variant(source: str) -> dict[str, str]:
    """The ablation variant of a FaithDiff pipeline, read from its component configs: ``alignment_type`` and
    ``lq_feature_source`` (for a pipeline without an LQ encoder, the VAE encoder output as wide as the alignment
    module's ``lq_channels``, which is what the pipeline reads)."""
    alignment = FaithDiffAlignmentModel.load_config(source, subfolder="alignment")
    variant = {"alignment_type": alignment.get("alignment_type", DEFAULT_VARIANT["alignment_type"])}
    # An optional component the pipeline was saved without is listed as [null, null].
    if (model_index(source) or {}).get("lq_encoder", [None])[0] is not None:
        lq_encoder = FaithDiffLQEncoder.load_config(source, subfolder="lq_encoder")
        variant["lq_feature_source"] = lq_encoder.get("feature_source", DEFAULT_VARIANT["lq_feature_source"])
    else:
        vae = AutoencoderKL.load_config(source, subfolder="vae")
        variant["lq_feature_source"] = _vae_feature_source(vae, alignment.get("lq_channels"), source)
    return variant


def _vae_feature_source(vae_config: Any, lq_channels: int, source: str) -> str:
    """The VAE encoder output a FaithDiff pipeline without an LQ encoder feeds its alignment module."""
    try:
        return vae_feature_source(vae_config, lq_channels)
    except ValueError as error:
        raise TrainingSetupError(
            f"The alignment module of {source!r} fits no output of its VAE encoder: {error}"
        ) from None


def _check_variant(config: TrainingConfig, name: str, source: str, variant: dict[str, str]) -> None:
    for setting, found in variant.items():
        wanted = getattr(config, setting)
        if wanted is not None and wanted != found:
            raise TrainingSetupError(
                f"`{setting}` is {wanted!r}, but `{name}` {source!r} is a FaithDiff pipeline with {setting} "
                f"{found!r}; leave `{setting}` unset (null) to continue it, or start from an SDXL model."
            )


def load_starting_pipeline(config: TrainingConfig) -> FaithDiffSDXLPipeline:
    """The pipeline a stage starts from (see :func:`starting_point`), in float32 on the CPU.

    Stage 1 builds one from an SDXL model (new alignment module, zero-initialised; LQ encoder copied from the VAE
    encoder; both of the configured ablation variant) or continues from a FaithDiff pipeline. Stage 2 needs a
    FaithDiff pipeline: ``stage1_checkpoint``, or ``pretrained_model`` when it is one (e.g. the converted release,
    to fine-tune it); with ``pretrain_alignment`` false it builds one from an SDXL model as stage 1 does.
    """
    source, faithdiff = starting_point(config)
    vae = load_vae(config.vae) if config.vae else None
    pipe = _load_faithdiff(source, vae) if faithdiff else _build_from_sdxl(source, vae, config)
    _check_epsilon_prediction(pipe.scheduler, source)
    return pipe


def _looks_local(name_or_path: str) -> bool:
    """Whether a model name is meant as a path (Hub ids are ``owner/name``)."""
    return (
        os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") > 1
        or os.path.exists(name_or_path)
    )


def load_vae(name_or_path: str) -> AutoencoderKL:
    """A VAE from a folder or Hub id that holds one at its root or in a ``vae`` subfolder."""
    local_root = os.path.isdir(name_or_path) and os.path.isfile(os.path.join(name_or_path, "config.json"))
    if os.path.isdir(name_or_path) and not local_root and not os.path.isdir(os.path.join(name_or_path, "vae")):
        raise TrainingSetupError(
            f"`vae` {name_or_path!r} holds no VAE: expected a config.json at its root or a `vae` subfolder."
        )
    try:
        return AutoencoderKL.from_pretrained(name_or_path, subfolder=None if local_root else "vae")
    except OSError:
        if os.path.isdir(name_or_path):
            raise
        return AutoencoderKL.from_pretrained(name_or_path)


def _load_faithdiff(source: str, vae: AutoencoderKL | None) -> FaithDiffSDXLPipeline:
    pipe = FaithDiffSDXLPipeline.from_pretrained(source, **({"vae": vae} if vae is not None else {}))
    if pipe.lq_encoder is None:
        # The VAE encoder's output that the pipeline has been feeding the alignment module, now to be trained.
        feature_source = _vae_feature_source(pipe.vae.config, pipe.alignment.config.lq_channels, source)
        pipe.register_modules(lq_encoder=FaithDiffLQEncoder.from_vae(pipe.vae, feature_source))
    return pipe


def new_faithdiff_modules(
    vae: AutoencoderKL, unet: UNet2DConditionModel, config: TrainingConfig
) -> tuple[FaithDiffAlignmentModel, FaithDiffLQEncoder]:
    """A fresh alignment module (zero-initialised: the UNet starts unchanged) and an LQ encoder copied from
    ``vae.encoder``, of the variant ``config`` names (the release's where it names none)."""
    feature_source = config.lq_feature_source or DEFAULT_VARIANT["lq_feature_source"]
    lq_encoder = FaithDiffLQEncoder.from_vae(vae, feature_source)
    lq_channels = lq_encoder.feature_channels
    alignment = FaithDiffAlignmentModel(
        lq_channels=lq_channels,
        latent_channels=unet.config.block_out_channels[0],
        norm_num_groups=math.gcd(RELEASE_NORM_GROUPS, lq_channels),
        spatial_attention=config.spatial_attention,
        alignment_type=config.alignment_type or DEFAULT_VARIANT["alignment_type"],
    )
    return alignment, lq_encoder


def _build_from_sdxl(source: str, vae: AutoencoderKL | None, config: TrainingConfig) -> FaithDiffSDXLPipeline:
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        vae = vae if vae is not None else AutoencoderKL.from_pretrained(source, subfolder="vae")
        components = {
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2"),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
            "tokenizer_2": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
            "scheduler": _load_scheduler(source),
        }
    except (OSError, ValueError) as error:
        raise TrainingSetupError(
            f"`pretrained_model` {source!r} is not a usable SDXL model (expected the diffusers subfolders unet, vae, "
            f"text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler): {error}"
        ) from error
    alignment, lq_encoder = new_faithdiff_modules(vae, unet, config)
    return FaithDiffSDXLPipeline(vae=vae, unet=unet, alignment=alignment, lq_encoder=lq_encoder, **components)


def _load_scheduler(source: str) -> SchedulerMixin:
    # The pipeline samples with Euler, as the release does; training only reads the noise schedule from its config.
    return EulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler")


def _check_epsilon_prediction(scheduler: SchedulerMixin, source: str) -> None:
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise TrainingSetupError(
            f"The scheduler of {source!r} has prediction_type {prediction!r}; FaithDiff trains epsilon prediction, so "
            "start from an epsilon-prediction SDXL model."
        )


# -------------------------------------------------------------------------------------- the trained module
class FaithDiffTrainingModule(nn.Module):
    """The denoiser as training sees it: LQ encoder -> condition embedding -> UNet with the alignment module after
    ``conv_in``, exactly as the pipeline runs it at inference (one crop = one tile).

    Only the components a stage trains are registered as submodules; the frozen ones are held aside. So DDP,
    DeepSpeed and FSDP wrap, synchronise and checkpoint only what is trained, and accelerate's training state
    stays small in stage 1. Call it through the object ``accelerator.prepare`` returns, so that gradients are
    synchronised across processes.

    Args:
        unet, alignment, lq_encoder: the pipeline's components (the same objects: the pipeline sees the updates).
        trained: the names of the trained components (see ``TRAINABLE_COMPONENTS``).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        alignment: FaithDiffAlignmentModel,
        lq_encoder: FaithDiffLQEncoder,
        trained: Collection[str],
    ) -> None:
        super().__init__()
        unknown = sorted(set(trained) - set(TRAINABLE_COMPONENTS))
        if unknown:
            raise ValueError(f"`trained` may only name {TRAINABLE_COMPONENTS}, got {unknown}.")
        self.trained = tuple(name for name in TRAINABLE_COMPONENTS if name in trained)
        parts = {"unet": unet, "alignment": alignment, "lq_encoder": lq_encoder}
        for name in self.trained:
            self.add_module(name, parts[name])
        self._frozen = {name: module for name, module in parts.items() if name not in self.trained}

    def part(self, name: str) -> nn.Module:
        """A component, trained or frozen."""
        return self._modules[name] if name in self._modules else self._frozen[name]

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        lq_images: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        """The predicted noise for ``noisy_latents`` given the upscaled LQ images (``[B, 3, H, W]`` in [-1, 1]),
        the prompt embeddings and SDXL's micro-conditioning."""
        unet, alignment = self.part("unet"), self.part("alignment")
        with torch.set_grad_enabled(torch.is_grad_enabled() and "lq_encoder" in self.trained):
            lq_features = self.part("lq_encoder")(lq_images)
        condition = alignment.embed_condition(lq_features)
        with aligned_conv_in(unet, alignment, condition):
            return unet(
                noisy_latents,
                timesteps,
                encoder_hidden_states=prompt_embeds,
                added_cond_kwargs={"text_embeds": pooled_prompt_embeds, "time_ids": time_ids},
                return_dict=False,
            )[0]


def stage_recipe(stage: int, frozen: Collection[str] = ()) -> StageRecipe:
    """What ``stage`` trains, less the ``frozen`` components (stage 2's ``freeze`` setting)."""
    return STAGE_RECIPES[stage].without(frozen)


def training_module(
    pipe: FaithDiffSDXLPipeline, stage: int, gradient_checkpointing: bool, frozen: Collection[str] = ()
) -> FaithDiffTrainingModule:
    """Freezes what ``stage`` does not train (text encoders and VAE always, and the ``frozen`` components) and wraps
    the rest for the optimiser."""
    recipe = stage_recipe(stage, frozen)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        if module is not None:
            module.requires_grad_(False).eval()
    for name in TRAINABLE_COMPONENTS:
        getattr(pipe, name).requires_grad_(name in recipe.trained).train(name in recipe.trained)
    if gradient_checkpointing:
        # A frozen UNet (stage 1, or frozen in stage 2) still carries the gradient from the loss to the alignment
        # module.
        pipe.unet.enable_gradient_checkpointing()
        if "lq_encoder" in recipe.trained:
            pipe.lq_encoder.enable_gradient_checkpointing()
    return FaithDiffTrainingModule(pipe.unet, pipe.alignment, pipe.lq_encoder, recipe.trained)


def parameter_groups(module: FaithDiffTrainingModule, stage: int, config: TrainingConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per learning rate, named after what they hold (for logging), over the
    components ``module`` trains (frozen ones have none)."""
    recipe = STAGE_RECIPES[stage]
    groups: dict[str, dict[str, Any]] = {}
    for name in module.trained:
        rate_name = recipe.learning_rates[name]
        group = groups.setdefault(rate_name, {"name": "", "params": [], "lr": getattr(config, rate_name)})
        group["name"] = f"{group['name']}+{name}" if group["name"] else name
        group["params"] += [p for p in module.part(name).parameters() if p.requires_grad]
    return list(groups.values())
