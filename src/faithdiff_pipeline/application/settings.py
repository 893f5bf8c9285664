"""The settings of a restoration, checked once where they are made: how every image of a job is captioned, restored
and written. They give both the pipeline's call arguments and the parameters recorded in each result's metadata, so
that what is run and what is recorded cannot drift apart."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..checks import check_integer, check_tile_arguments, is_real
from ..image_io import OutputOptions
from ..loading import check_model_source, check_options
from .options import OPTIONS

if TYPE_CHECKING:
    from ..content_credentials import SigningCredentials

# The per-image entries of the recorded parameters, written around the settings' own: results of earlier versions
# carry them in this order, and a result is recognised as ours by the `faithdiff_pipeline` entry.
_INPUT_KEY, _PROMPT_KEY, _VERSION_KEY = "input", "prompt", "faithdiff_pipeline"
# The option names that make the output options: the files' own, then their provenance and signing.
PROVENANCE_OPTIONS = ("no_provenance", "digital_source_type", "sign")
OUTPUT_OPTIONS = ("format", "quality", "bit_depth", "keep_colour", "profile", *PROVENANCE_OPTIONS)


def _setting(name: str, *, call: str | None = None, recorded: bool = False, recorded_unset: Any = None) -> Any:
    """A field of :class:`RestorationSettings`, with the option table's default.

    Args:
        name: The field's name, an option of the table.
        call: The pipeline call argument the value is passed as; ``None`` when it is not passed.
        recorded: Whether the value is recorded in each result's parameters, under the field's name.
        recorded_unset: What the parameters record for a value of ``None``.
    """
    default = OPTIONS[name].default
    # The option table spells "no colour fix" as the command line does; the pipeline takes None.
    default = None if default == "none" and name == "color_fix" else default
    return field(default=default, metadata={"call": call, "recorded": recorded, "unset": recorded_unset})


@dataclass(frozen=True)
class RestorationSettings:
    """How every image of a job is captioned, restored and written; refused at construction when inconsistent, with a
    ``ValueError`` that names the setting.

    The recorded fields come first, in the order the parameters of a result list them. Every field is an option of
    :data:`~faithdiff_pipeline.application.options.OPTIONS`, whose help says what it does; ``color_fix`` is ``None``
    for no colour fix, and ``output`` gathers the options of the result files.
    """

    negative_prompt: str = _setting("negative_prompt", call="negative_prompt", recorded=True)
    upscale: float = _setting("upscale", call="upscale", recorded=True)
    steps: int = _setting("steps", call="num_inference_steps", recorded=True)
    guidance: float = _setting("guidance", call="guidance_scale", recorded=True)
    # Passed as the generator it seeds (see `call_arguments`).
    seed: int = _setting("seed", recorded=True)
    start_point: str = _setting("start_point", call="start_point", recorded=True)
    tile_size: int = _setting("tile_size", call="tile_size", recorded=True)
    tile_stride: int | None = _setting("tile_stride", call="tile_stride", recorded=True)
    color_fix: str | None = _setting("color_fix", call="color_fix", recorded=True, recorded_unset="none")
    model: str | None = _setting("model", recorded=True, recorded_unset="official release")
    tile_batch_size: int = _setting("tile_batch_size", call="tile_batch_size")
    max_pixels: int = _setting("max_pixels", call="max_output_pixels")
    caption: str = _setting("caption")
    prompt: str | None = _setting("prompt")
    captioner: str = _setting("captioner")
    captioner_quantization: str = _setting("captioner_quantization")
    preclean: str | None = _setting("preclean")
    device: str = _setting("device")
    dtype: str = _setting("dtype")
    offload: str = _setting("offload")
    compile: str = _setting("compile")
    fp8: str = _setting("fp8")
    low_vram: bool = _setting("low_vram")
    vae_tiling: bool = _setting("vae_tiling")
    fidelity: bool = _setting("fidelity")
    seeds: int = _setting("seeds")
    output: OutputOptions = field(default_factory=OutputOptions)
    # Content Credentials to sign each result with, or None.
    signing: SigningCredentials | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            option = OPTIONS.get(item.name)
            value = getattr(self, item.name)
            if option is not None and option.choices is not None and value is not None:
                choices = tuple(c for c in option.choices if not (item.name == "color_fix" and c == "none"))
                if value not in choices:
                    raise ValueError(f"`{item.name}` must be one of {', '.join(map(str, choices))}; got {value!r}.")
        self._check_sampling()
        self._check_prompts()
        check_tile_arguments(self.tile_size, self.tile_stride)
        check_options(self.offload, self.captioner_quantization, self.preclean, self.fp8, self.low_vram)
        check_model_source(self.model)
        if self.signing is not None and not self.output.provenance:
            raise ValueError("`sign` adds provenance, which `no_provenance` leaves out: choose one.")

    def _check_sampling(self) -> None:
        for name in ("upscale", "guidance"):
            value = getattr(self, name)
            if not is_real(value) or (name == "upscale" and value <= 0):
                expected = "a finite number > 0" if name == "upscale" else "a finite number"
                raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
        check_integer(self.steps, "steps", 1)
        check_integer(self.tile_batch_size, "tile_batch_size", 1)
        check_integer(self.max_pixels, "max_pixels", 1)
        check_integer(self.seed, "seed")
        check_integer(self.seeds, "seeds", 1)
        if self.seeds > 1 and not self.fidelity:
            raise ValueError(f"`seeds` {self.seeds} measures the spread of the results: add `fidelity`.")

    def _check_prompts(self) -> None:
        """The settings of prompts and captions, and the models' settings that depend on them."""
        if self.prompt is not None and self.caption != "auto":
            raise ValueError(f"`prompt` gives a fixed prompt; it conflicts with `caption` {self.caption}.")
        if self.prompt is not None and self.captioner not in ("auto", "none"):
            raise ValueError("`prompt` gives a fixed prompt; it conflicts with `captioner`.")
        if self.captioner == "none" and (self.captioner_quantization != "auto" or self.preclean):
            raise ValueError("`captioner` none writes no captions; drop `captioner_quantization` and `preclean`.")
        if self.compile != "none" and self.offload in ("model", "sequential"):
            raise ValueError(
                f"`compile` keeps the UNet on the device; use `offload` text-encoders, not {self.offload}."
            )

    @property
    def wants_captions(self) -> bool:
        """Whether images without a caption sidecar are captioned."""
        return self.prompt is None and self.caption == "auto" and self.captioner != "none"

    @classmethod
    def from_options(cls, **options: Any) -> RestorationSettings:
        """The settings of options named as in the option table (``color_fix="none"``, ``bit_depth="16"``, ``format``
        and the other result-file options flat), the others at their defaults; unknown names raise ``TypeError``."""
        names = {item.name for item in fields(cls)} - {"output"}
        unknown = sorted(set(options) - names - set(OUTPUT_OPTIONS))
        if unknown:
            raise TypeError(f"{', '.join(f'`{name}`' for name in unknown)} are not restoration settings.")
        values = {name: value for name, value in options.items() if name in names}
        if values.get("color_fix") == "none":
            values["color_fix"] = None
        if values.get("low_vram"):
            # Part of the low-memory set-up: one tile at a time keeps the UNet's activations smallest.
            values["tile_batch_size"] = 1
        output = {name: options[name] for name in OUTPUT_OPTIONS[:5] if name in options}
        if output.get("bit_depth") in ("auto", None):
            output["bit_depth"] = None
        elif isinstance(output.get("bit_depth"), str):
            output["bit_depth"] = int(output["bit_depth"])
        output["provenance"] = not options.get("no_provenance", False)
        if options.get("sign") is not None and not output["provenance"]:
            raise ValueError("`sign` adds provenance, which `no_provenance` leaves out: choose one.")
        output["digital_source_type"] = options.get("digital_source_type", OPTIONS["digital_source_type"].default)
        return cls(**values, output=OutputOptions(**output), signing=_signing(options.get("sign")))

    def call_arguments(self, prompt: str, restoration: int = 0) -> dict[str, Any]:
        """The pipeline call arguments of one image with ``prompt``, its sampling seeded by ``seed`` (counted on by
        ``restoration``, the index among :attr:`seeds` restorations)."""
        import torch

        calls = [item for item in fields(self) if item.metadata.get("call")]
        arguments = {item.metadata["call"]: getattr(self, item.name) for item in calls}
        generator = torch.Generator("cpu").manual_seed(self.seed + restoration)
        return {"prompt": prompt, **arguments, "generator": generator}

    def parameters(self, input_name: str, prompt: str) -> dict[str, Any]:
        """What a result of the image ``input_name``, restored with ``prompt``, records of how it was made."""
        from .. import __version__

        recorded = {}
        for item in fields(self):
            if item.metadata.get("recorded"):
                value = getattr(self, item.name)
                recorded[item.name] = item.metadata["unset"] if value is None else value
        return {_INPUT_KEY: input_name, _PROMPT_KEY: prompt, **recorded, _VERSION_KEY: __version__}


def _signing(files: Any) -> SigningCredentials | None:
    """The credentials of ``sign`` (a certificate chain and key file), read and checked now, before any model loads;
    an encrypted key's password comes from the environment."""
    if files is None:
        return None
    if isinstance(files, (str, os.PathLike)) or len(files) != 2:
        raise ValueError(f"`sign` takes two files, the certificate chain and the private key; got {files!r}.")
    from ..content_credentials import PASSWORD_VARIABLE, SigningCredentials

    return SigningCredentials.from_files(*files, password=os.environ.get(PASSWORD_VARIABLE))
