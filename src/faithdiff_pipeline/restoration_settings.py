"""The settings of a restoration as the commands that restore take them (``faithdiff-upscale``, ``faithdiff-explain``
and the Ray engine): parsed once from the command line, they give both the pipeline's call arguments and the
parameters recorded in each result's metadata, so that what is run and what is recorded cannot drift apart."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any

from .image_io import DEFAULT_MAX_OUTPUT_PIXELS, OutputOptions

# The per-image entries of the recorded parameters, written around the settings' own: results of earlier versions
# carry them in this order, and a result is recognised as ours by the `faithdiff_pipeline` entry.
_INPUT_KEY, _PROMPT_KEY, _VERSION_KEY = "input", "prompt", "faithdiff_pipeline"


def _setting(default: Any, *, call: str | None = None, recorded: bool = False, recorded_unset: Any = None) -> Any:
    """A field of :class:`RestorationSettings`.

    Args:
        default: The value when the command line does not set it.
        call: The pipeline call argument the value is passed as; ``None`` when it is not passed.
        recorded: Whether the value is recorded in each result's parameters, under the field's name.
        recorded_unset: What the parameters record for a value of ``None``.
    """
    return field(default=default, metadata={"call": call, "recorded": recorded, "unset": recorded_unset})


@dataclass(frozen=True)
class RestorationSettings:
    """How every image of a restoring command is captioned, restored and written.

    The recorded fields come first, in the order the parameters of a result list them.

    Attributes:
        negative_prompt: The negative prompt of every image.
        upscale: The factor the image is enlarged by.
        steps: Denoising steps.
        guidance: Classifier-free guidance scale.
        seed: Seed of the sampling (and of the captioner's sampling).
        start_point: ``"lr"`` (denoising starts from the noised LQ latent) or ``"noise"``.
        tile_size: Latent tile size in pixels.
        tile_stride: Tile stride in pixels; ``None`` for half a tile.
        color_fix: ``"adain"``, ``"wavelet"`` or ``None`` for no colour correction.
        model: Converted pipeline folder or Hub id; ``None`` for the official release.
        tile_batch_size: Tiles per UNet call (1 under ``low_vram``).
        max_pixels: Largest result, width times height, that is accepted.
        caption: Where prompts come from: ``"auto"``, ``"sidecar"`` or ``"none"``.
        prompt: One fixed prompt for every image, instead of captions; ``None`` for captions.
        captioner: ``"auto"``, ``"none"``, or a LLaVA-family model id or folder.
        captioner_quantization: ``"auto"``, ``"half"``, ``"8bit"`` or ``"4bit"``.
        preclean: File of a restoration network that cleans what the captioner sees; ``None`` for none.
        device: ``"auto"`` or a torch device name.
        dtype: ``"auto"`` or a torch dtype name.
        offload: ``"none"``, ``"text-encoders"``, ``"model"`` or ``"sequential"``.
        compile: ``"none"``, ``"regional"`` or ``"full"``.
        fp8: ``"none"``, ``"weights"`` or ``"compute"``.
        low_vram: The release's low-memory set-up.
        vae_tiling: Tile the VAE and the LQ encoder.
        output: How result files are written.
    """

    negative_prompt: str = _setting("", call="negative_prompt", recorded=True)
    upscale: float = _setting(2.0, call="upscale", recorded=True)
    steps: int = _setting(20, call="num_inference_steps", recorded=True)
    guidance: float = _setting(5.0, call="guidance_scale", recorded=True)
    # Passed as the generator it seeds (see `call_arguments`).
    seed: int = _setting(42, recorded=True)
    start_point: str = _setting("lr", call="start_point", recorded=True)
    tile_size: int = _setting(1024, call="tile_size", recorded=True)
    tile_stride: int | None = _setting(None, call="tile_stride", recorded=True)
    color_fix: str | None = _setting("adain", call="color_fix", recorded=True, recorded_unset="none")
    model: str | None = _setting(None, recorded=True, recorded_unset="official release")
    tile_batch_size: int = _setting(4, call="tile_batch_size")
    max_pixels: int = _setting(DEFAULT_MAX_OUTPUT_PIXELS, call="max_output_pixels")
    caption: str = _setting("auto")
    prompt: str | None = _setting(None)
    captioner: str = _setting("auto")
    captioner_quantization: str = _setting("auto")
    preclean: str | None = _setting(None)
    device: str = _setting("auto")
    dtype: str = _setting("auto")
    offload: str = _setting("none")
    compile: str = _setting("none")
    fp8: str = _setting("none")
    low_vram: bool = _setting(False)
    vae_tiling: bool = _setting(False)
    output: OutputOptions = field(default_factory=OutputOptions)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, output: OutputOptions) -> RestorationSettings:
        """The settings of parsed command-line options, which carry every field by name (the command line's
        ``--color-fix none`` is ``None`` here); ``output`` is how results are written."""
        values = {item.name: getattr(args, item.name) for item in fields(cls) if item.name != "output"}
        values["color_fix"] = None if args.color_fix == "none" else args.color_fix
        # Part of the low-memory set-up: one tile at a time keeps the UNet's activations smallest.
        values["tile_batch_size"] = 1 if args.low_vram else args.tile_batch_size
        return cls(**values, output=output)

    def call_arguments(self, prompt: str) -> dict[str, Any]:
        """The pipeline call arguments of one image with ``prompt``, its sampling seeded by ``seed``."""
        import torch

        calls = [item for item in fields(self) if item.metadata.get("call")]
        arguments = {item.metadata["call"]: getattr(self, item.name) for item in calls}
        return {"prompt": prompt, **arguments, "generator": torch.Generator("cpu").manual_seed(self.seed)}

    def parameters(self, input_name: str, prompt: str) -> dict[str, Any]:
        """What a result of the image ``input_name``, restored with ``prompt``, records of how it was made."""
        from . import __version__

        recorded = {}
        for item in fields(self):
            if item.metadata.get("recorded"):
                value = getattr(self, item.name)
                recorded[item.name] = item.metadata["unset"] if value is None else value
        return {_INPUT_KEY: input_name, _PROMPT_KEY: prompt, **recorded, _VERSION_KEY: __version__}
