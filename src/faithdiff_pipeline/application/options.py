"""The option table: every setting of the commands that restore, each with its default, choices, command-line flag
and help written once.

The application layer names settings by their Python names (``tile_size``) and its errors name them as
`` `tile_size` ``; the command line builds its parser from this table and shows the same errors with the flags
(``--tile-size``), through :func:`as_flags`. Python users pass the same names as keyword arguments. Imports nothing
heavy, so that ``--help`` and every usage error answer at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .. import release_settings as release
from ..image_io import OUTPUT_FORMATS, PROFILE_CHOICES
from ..loading import CAPTIONER_PRECISIONS, COMPILE_MODES, DTYPE_NAMES, FP8_MODES, OFFLOAD_MODES
from ..provenance import DEFAULT_DIGITAL_SOURCE_TYPE, DIGITAL_SOURCE_TYPES

CAPTION_MODES = ("auto", "none", "sidecar")
ENGINES = ("local", "ray")
BIT_DEPTHS = ("auto", "8", "16")
_QUOTED_NAME = re.compile(r"`([a-z_]+)`")


@dataclass(frozen=True)
class Option:
    """One setting.

    Attributes:
        name: The Python name (a keyword argument, a field of the settings).
        default: The value when it is not given.
        help: What it does, as ``--help`` shows it.
        kind: The type a command-line value is parsed as: ``str``, ``int``, ``float`` or ``bool`` (a switch).
        choices: The accepted values, or ``None`` for any of ``kind``.
        metavar: The value's name in ``--help``.
        const: The value of the flag given without a value (an optional value), or ``None``.
        nargs: How many values the flag takes when more than one, or ``None``.
    """

    name: str
    default: Any
    help: str
    kind: type = str
    choices: tuple[Any, ...] | None = None
    metavar: str | tuple[str, ...] | None = None
    const: Any = None
    nargs: int | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _options(*options: Option) -> dict[str, Option]:
    return {option.name: option for option in options}


OPTIONS: dict[str, Option] = _options(
    # The job.
    Option("output_dir", "faithdiff-restored", "where results go (a folder, or a URI with --engine ray)"),
    Option("overwrite", False, "restore again where a result of ours exists (never an input, never a file of "
           "yours)", bool),
    Option("captions_only", False, "only write caption sidecars (IMAGE.json) for images that have none; restore "
           "nothing", bool),
    # The model and sampling.
    Option("model", None, "converted pipeline folder or Hub id (default: the official release, converted on first "
           "use)"),
    Option("upscale", release.UPSCALE, "the factor each photo is enlarged by", float),
    Option("steps", release.NUM_INFERENCE_STEPS, "denoising steps", int),
    Option("guidance", release.GUIDANCE_SCALE, "classifier-free guidance scale (1 or less: no guidance)", float),
    Option("seed", 42, "seed of the sampling and of the captioner's sampling", int),
    Option("start_point", release.START_POINT, "lr: start from the noised LQ latent (the release); noise: from pure "
           "noise", str, release.START_POINTS),
    Option("tile_size", release.TILE_SIZE, "latent tile size in pixels", int),
    Option("tile_stride", None, "tile stride in pixels (default: half a tile)", int),
    Option("tile_batch_size", release.TILE_BATCH_SIZE, "tiles per UNet call", int),
    Option("color_fix", release.COLOR_FIX, "colour correction against the input", str,
           (*release.COLOR_FIXES, "none")),
    Option("max_pixels", release.MAX_OUTPUT_PIXELS, f"largest result (width x height) accepted (default "
           f"{release.MAX_OUTPUT_PIXELS} = 8192x8192)", int),
    # Prompts and captions.
    Option("caption", "auto", "auto: the sidecar IMAGE.json if present, else a caption by the captioner (written as "
           "the sidecar), else no prompt; sidecar: every image needs IMAGE.json; none: no prompt", str, CAPTION_MODES),
    Option("prompt", None, "one fixed prompt for every image (instead of captions)"),
    Option("negative_prompt", "", "the negative prompt of every image"),
    Option("captioner", "auto", "auto (default): the release's llava-hf/llava-1.5-13b-hf on a CUDA GPU (about 28 GiB "
           "in half precision, 16 in 8-bit, 9 in 4-bit: the first that fits the free memory), no captions without "
           "one; llava-hf/llava-1.5-7b-hf needs about 15 / 8.5 / 5.5 GiB; any LLaVA-family id or folder; none: no "
           "captions. Images are all captioned first, then the captioner leaves the GPU before restoration starts"),
    Option("captioner_quantization", "auto", "captioner precision: auto (by free GPU memory), half, 8bit or 4bit "
           "(bitsandbytes, the [caption] extra)", str, ("auto", *CAPTIONER_PRECISIONS)),
    Option("preclean", None, "a restoration network (BSRNet, Real-ESRGAN, SwinIR, ...; .pth or .safetensors, loaded "
           "by spandrel: the [preclean] extra) that cleans what the captioner sees, as the release's --use_bsrnet; "
           "restoration still starts from the original", metavar="MODEL_FILE"),
    # Device, precision and memory.
    Option("device", "auto", "auto, cpu, cuda, cuda:1, mps"),
    Option("dtype", "auto", "auto: float16 on a GPU, float32 on the CPU", str, ("auto", *DTYPE_NAMES)),
    Option("offload", "none", "keep models in host memory, moved to the device as they run: text-encoders (the two "
           "text encoders, streamed in once per image), model (each model in turn) or sequential (layer by layer, "
           "slowest)", str, OFFLOAD_MODES),
    Option("compile", "none", "torch.compile the UNet: regional (the default of --compile: its repeated blocks, "
           "quick to compile) or full (the whole UNet, CUDA graphs on CUDA); compiled code is cached on disk for "
           "later runs", str, COMPILE_MODES, const="regional"),
    Option("fp8", "none", "float8 UNet (opt-in; the output deviates from the release's, see benchmarks/RESULTS.md): "
           "weights (stored in float8, computed in --dtype, half the UNet memory, any device) or compute (float8 "
           "matrix products, GPUs of compute capability 8.9+, the [fp8] extra; combine with --compile)", str,
           FP8_MODES),
    Option("low_vram", False, "the release's 5 GB set-up: float8 weights, text encoders offloaded, VAE/LQ-encoder "
           "tiling, one tile per UNet call", bool),
    Option("vae_tiling", False, "tile the VAE and LQ encoder (large images)", bool),
    # Result files.
    Option("format", "png", "file format of the results", str, tuple(OUTPUT_FORMATS)),
    Option("quality", 95, "JPEG/WebP quality, 1-100", int),
    Option("bit_depth", "auto", "auto: 16-bit where the input was (PNG and TIFF results), else 8", str, BIT_DEPTHS),
    Option("keep_colour", False, "write the results of greyscale inputs in colour (default: greyscale, the luminance "
           "of the result)", bool),
    Option("profile", "srgb", "srgb: results in sRGB with an sRGB profile; source: converted back to the input's "
           "embedded profile", str, PROFILE_CHOICES),
    Option("compare", False, "also write NAME_compare.png: LANCZOS | restored", bool),
    # Fidelity (docs/fidelity.md).
    Option("fidelity", False, "measure where each result stays true to its input: writes NAME_consistency.png and "
           "NAME_added_detail.png (heat maps over the result) and their 16-bit raw maps beside it, stores LR-PSNR, "
           "LR-SSIM and the share of added detail in the result's metadata and lists them in the summary", bool),
    Option("fidelity_threshold", None, "with --fidelity: mark results whose LR-PSNR (consistency with the input, in "
           "dB) is below this in the summary", float, metavar="DB"),
    Option("fail_below_threshold", False, "exit with status 3 when a result is below --fidelity-threshold", bool),
    Option("seeds", 1, "with --fidelity: restore each photo with N seeds (seed, seed+1, ...) and map where they "
           "disagree (NAME_spread.png); costs N restorations per photo; the result is the first seed's", int,
           metavar="N"),
    # Provenance (docs/provenance.md).
    Option("no_provenance", False, "write no XMP provenance (the IPTC digital source type, the edit in the history, "
           "the original the result derives from); the original's own XMP is then left out too, being one packet",
           bool),
    Option("digital_source_type", DEFAULT_DIGITAL_SOURCE_TYPE, "the IPTC Digital Source Type the results declare",
           str, DIGITAL_SOURCE_TYPES),
    Option("sign", None, "sign each result with C2PA Content Credentials (the [c2pa] extra): the PEM certificate "
           "chain and private key; an encrypted key's password is read from FAITHDIFF_SIGNING_KEY_PASSWORD",
           metavar=("CERT_CHAIN", "KEY"), nargs=2),
    # Attention maps (faithdiff-explain).
    Option("words", None, 'comma-separated words (or phrases) of the prompt to map, e.g. "beard,cap"; matched whole, '
           "in any case"),
    Option("record_steps", None, "denoising steps to record, counted from 0 (of --steps): numbers and ranges such as "
           "0-9,15 (default: all)", metavar="STEPS"),
    Option("layers", None, "comma-separated glob patterns of the cross-attention layers to record, by UNet module "
           "name, e.g. 'up_blocks.*,mid_block'; a block's name selects all its layers (default: all, as DAAM)",
           metavar="PATTERNS"),
    Option("downsampling", None, "record only the layers whose maps are the latent tile downsampled by these "
           "factors, e.g. 2,4 (SDXL at a 1024 px tile: 64x64 and 32x32 maps; default: all)", metavar="FACTORS"),
    # The engine.
    Option("engine", "local", "local (default): this process, or each process of `accelerate launch`; ray: a pool "
           "of Ray Data workers on this machine or a cluster, inputs and outputs local or URIs such as "
           "s3://bucket/prefix (the [ray] extra)", str, ENGINES),
    Option("ray_address", None, "the Ray cluster to join, e.g. ray://head:10001 or head:6379 (default: RAY_ADDRESS, "
           "else a cluster running on this machine, else a new one)", metavar="ADDR"),
    Option("workers", None, "Ray workers, each loading the pipeline once (default 1)", int, metavar="N"),
    Option("gpus_per_worker", None, "GPUs reserved per Ray worker, fractions share one (default: 1 where the "
           "cluster has GPUs, else 0)", float, metavar="G"),
)

RAY_OPTIONS = ("ray_address", "workers", "gpus_per_worker")


def defaults(names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The default of each named option."""
    return {name: OPTIONS[name].default for name in names}


def as_flags(message: str) -> str:
    """``message`` with every setting it names as `` `name` `` shown as the option's flag, for the command line;
    names that are no option (an argument of the pipeline, say) are left as they are."""
    return _QUOTED_NAME.sub(lambda m: OPTIONS[m[1]].flag if m[1] in OPTIONS else m[0], message).rstrip(".")
