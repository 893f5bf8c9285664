"""Validation during training: restore a few fixed LQ images with the pipeline being trained, save and log them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator

from ..image_io import save_image
from ..pipeline_faithdiff_sdxl import FaithDiffSDXLPipeline
from .data import load_rgb


@dataclass(frozen=True)
class ValidationExample:
    """An LQ image to restore, its caption, and the name its results are saved under."""

    name: str
    image: PIL.Image.Image
    caption: str


def validation_examples(paths: Sequence[str], dataset: object, count: int) -> list[ValidationExample]:
    """The images given in ``paths`` (captions from their sidecars, if any), or else the first ``count`` LQ crops of
    the training ``dataset`` (its ``validation_pair(i)``), which are the same in every run with the same data."""
    if paths:
        from ..captioning import read_caption

        return [ValidationExample(Path(p).stem, load_rgb(p), read_caption(p) or "") for p in paths]
    examples = []
    for index in range(min(count, len(dataset))):
        image, caption = dataset.validation_pair(index)
        examples.append(ValidationExample(f"{index:02d}", image, caption))
    return examples


@torch.no_grad()
def restore_examples(
    pipe: FaithDiffSDXLPipeline,
    examples: Sequence[ValidationExample],
    upscale: float,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
) -> list[PIL.Image.Image]:
    """Restores each example with the pipeline's defaults otherwise, each from the same seed (float32: the
    vanilla SDXL VAE overflows in float16)."""
    pipe.set_progress_bar_config(disable=True)
    device = pipe._execution_device
    restored = []
    for example in examples:
        generator = torch.Generator(device=device).manual_seed(seed)
        output = pipe(
            example.image,
            prompt=example.caption,
            upscale=upscale,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
        )
        restored.append(output.images[0])
    return restored


def log_validation(
    accelerator: Accelerator,
    examples: Sequence[ValidationExample],
    images: Sequence[PIL.Image.Image],
    output_dir: str | Path,
    step: int,
) -> Path:
    """Saves the restored images under ``output_dir/validation/step-N/`` and sends them to the trackers that take
    images (TensorBoard, Weights & Biases). Returns the folder."""
    folder = Path(output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    for example, image in zip(examples, images):
        save_image(image, folder / f"{example.name}.png")
    for tracker in accelerator.trackers:
        for example, image in zip(examples, images):
            key = f"validation/{example.name}"
            if tracker.name == "tensorboard":
                tracker.log_images({key: np.asarray(image)[None]}, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({key: [image]}, step)
    return folder
